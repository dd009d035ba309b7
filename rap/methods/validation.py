"""Plans are untrusted input (a file from a colleague, a hand edit, a truncated copy): every field, index and
tensor is checked against the model before anything is changed. Pure checks; a failure is one ``PlanError``
sentence. Each method states what its plan must hold in ``Method.check_plan``; this module has the shared parts."""
from __future__ import annotations

from ..architecture import head_dim
from ..errors import PlanError

SIGNATURE_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                  "head_dim")


def model_signature(config) -> dict:
    """What a plan must agree with: recorded in every plan (``plan["model"]``), compared when it is applied."""
    sig = {k: getattr(config, k, None) for k in SIGNATURE_KEYS}
    sig["head_dim"] = head_dim(config)
    return sig


def entry(mapping: dict, key: str, where: str):
    if not isinstance(mapping, dict) or key not in mapping:
        raise PlanError(f"{where} has no '{key}'")
    return mapping[key]


def positive_int(value, what: str, high: int | None = None) -> int:
    if type(value) is not int or value < 1 or (high is not None and value > high):
        raise PlanError(f"{what}={value!r} is not an integer in [1, {high if high is not None else 'inf'}]")
    return value


def indices(values, limit: int, what: str) -> list[int]:
    """A list of distinct integers in [0, limit)."""
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise PlanError(f"{what} is not a list of integers")
    outside = [v for v in values if not 0 <= v < limit]
    if outside:
        raise PlanError(f"{what} has index {outside[0]} outside [0, {limit})")
    if len(set(values)) != len(values):
        raise PlanError(f"{what} repeats index {next(v for v in values if values.count(v) > 1)}")
    return values


def per_head_indices(per_head, n_heads: int, limit: int, what: str) -> int:
    """Per KV head, distinct indices in [0, limit), the same count for every head (>= 1); returns the count."""
    if not isinstance(per_head, list) or len(per_head) != n_heads:
        got = len(per_head) if isinstance(per_head, list) else type(per_head).__name__
        raise PlanError(f"{what} lists {got} heads, but the model has {n_heads} KV heads")
    counts = [len(indices(h, limit, f"{what} of KV head {i}")) for i, h in enumerate(per_head)]
    if len(set(counts)) > 1 or counts[0] < 1:
        raise PlanError(f"{what} keeps {counts} indices per KV head; they must be equal and at least 1")
    return counts[0]


def check_tensors(tensors, expected: dict[str, tuple]) -> None:
    """Exactly the ``expected`` names, each with that shape and a floating dtype."""
    if not expected:
        if tensors:
            raise PlanError(f"it has tensors ({', '.join(sorted(tensors)[:3])}, ...) that this plan does not use")
        return
    if not tensors or not isinstance(tensors, dict):
        raise PlanError("it has no tensors, but its method needs them (the .safetensors file beside the JSON)")
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise PlanError(f"it lacks tensor '{missing[0]}'" + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
    if extra:
        raise PlanError(f"it has unexpected tensor '{extra[0]}'")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise PlanError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.dtype.is_floating_point:
            raise PlanError(f"tensor '{name}' has dtype {t.dtype}, expected a floating-point type")


def check_plan(config, plan, method_cls) -> None:
    """Everything ``method_cls.apply`` relies on, against ``config``; raises ``PlanError`` (without the source)."""
    sig = model_signature(config)
    made_for = plan.get("model")
    if made_for is not None:
        if not isinstance(made_for, dict):
            raise PlanError("its 'model' entry is not a mapping")
        for k in SIGNATURE_KEYS:
            if k in made_for and made_for[k] != sig[k]:
                raise PlanError(f"it was made for a model with {k}={made_for[k]}, but this model has {k}={sig[k]}")
    ratio = entry(plan, "ratio", "the plan")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PlanError(f"its ratio={ratio!r} is not a number in [0, 1)")
    d = entry(plan, "head_dim", "the plan")
    if d != sig["head_dim"]:
        raise PlanError(f"it was made for head_dim={d}, but this model has head_dim={sig['head_dim']}")
    layers = entry(plan, "layers", "the plan")
    if not isinstance(layers, list) or len(layers) != sig["num_hidden_layers"]:
        got = len(layers) if isinstance(layers, list) else type(layers).__name__
        raise PlanError(f"it has {got} layers, but the model has {sig['num_hidden_layers']}")
    # healed weights are checked when the plan is applied
    own = {k: v for k, v in (plan.get("tensors") or {}).items() if not k.startswith("heal.")}
    check_tensors(own, method_cls.check_plan(config, plan))
