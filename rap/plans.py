"""The public API: compress a model, and save, load, validate and apply the plan that rebuilds it."""
from __future__ import annotations

import json
from pathlib import Path

from .architecture import check_model
from .errors import ConfigError, PlanError
from .files import atomic_path, write_atomic
from .heal import HEAL_PREFIX, expected_heal_tensors, load_healed
from .memory import stage
from .methods import METHODS, Method, make_method
from .methods.validation import check_plan, check_tensors, model_signature
from .modules import swap_attention


def compress(model, method: str = "rap", ratio: float = 0.3, calibration=None, **options):
    """Compress ``model`` in place and return it; the plan is kept on ``model.rap_plan``.

    ``calibration`` is a (n, seqlen) LongTensor of token ids (see ``rap.data.calibration_batch``);
    ``options`` are the method's dataclass fields (e.g. ``criterion="qk_energy"``).
    """
    m = make_method(method, ratio, **options)
    check_model(model)  # before any statistic is gathered: an unsupported model is refused, never changed
    return apply_plan(model, m.make_plan(model, calibration))


def load_plan(path: str | Path) -> dict:
    """A plan saved by ``save_plan``: the JSON, plus its tensors (factor or map matrices) if it has any. Only JSON
    and safetensors are read (no pickle); a file that cannot be read is one ``PlanError`` sentence."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"Plan file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"Plan file {path} is not readable JSON (truncated or edited?): {e}.") from None
    if not isinstance(plan, dict):
        raise PlanError(f"Plan file {path} holds a JSON {type(plan).__name__}, not a plan object.")
    name = plan.get("tensors_file")
    if name:
        tensors_path = path.parent / str(name)
        if Path(str(name)).name != name or not tensors_path.is_file():
            raise PlanError(f"Plan file {path} names tensors file '{name}', which is not a file beside it.")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            plan["tensors"] = load_file(tensors_path)
        except (SafetensorError, OSError, ValueError) as e:
            raise PlanError(f"Plan tensors file {tensors_path} cannot be read as safetensors (truncated?): "
                            f"{e}.") from None
    plan["source"] = str(path)
    return plan


def validate_plan(model_config, plan: dict) -> type[Method]:
    """Check ``plan`` against the model before anything is changed; returns its method class. ``PlanError``
    names the plan's file (``plan["source"]``) and what is wrong."""
    source = plan.get("source") if isinstance(plan, dict) else None
    try:
        if not isinstance(plan, dict) or plan.get("method") not in METHODS:
            got = plan.get("method") if isinstance(plan, dict) else plan
            raise PlanError(f"its method {got!r} is not one of {', '.join(METHODS)}")
        cls = METHODS[plan["method"]]
        check_plan(model_config, plan, cls)
    except PlanError as e:
        raise PlanError(f"{f'Plan {source}' if source else 'The plan'} does not fit this model: {e}.") from None
    return cls


def apply_plan(model, plan: dict | str | Path):
    """Rebuild the compressed model from an uncompressed one and a plan (dict or path saved by ``save_plan``).
    The plan is validated against the model first (``validate_plan``); a fresh plan gets the model's signature."""
    if not isinstance(plan, dict):
        plan = load_plan(plan)
    if getattr(model, "rap_plan", None):
        raise ConfigError("This model is compressed already; apply a plan to an uncompressed model.")
    check_model(model)
    if plan.get("method") in METHODS:
        METHODS[plan["method"]].check_supported(model.config)
    originals = [layer.self_attn for layer in model.model.layers]
    with stage("apply plan"):
        validate_plan(model.config, plan).apply(model, plan)
    healed = {k: v for k, v in (plan.get("tensors") or {}).items() if k.startswith(HEAL_PREFIX)}
    if healed or plan.get("heal"):
        try:  # the healed values must fit the modules just built; if not, put the original modules back
            check_tensors(healed, expected_heal_tensors(model))
        except PlanError as e:
            swap_attention(model, originals)
            source = plan.get("source")
            raise PlanError(f"{f'Plan {source}' if source else 'The plan'} does not fit this model: its healed "
                            f"weights: {e}.") from None
        load_healed(model, healed)
    plan.setdefault("model", model_signature(model.config))
    model.rap_plan = plan  # on the module, not the config: it may hold tensors
    return model


def get_plan(model) -> dict | None:
    return getattr(model, "rap_plan", None)


def plan_json(plan: dict, tensors_file: str | None = None) -> str:
    """The plan as JSON; its tensors (if any) are referenced by ``tensors_file``, not inlined."""
    meta = {k: v for k, v in plan.items() if k not in ("tensors", "source")}
    if plan.get("tensors"):
        meta["tensors_file"] = tensors_file
    return json.dumps(meta, indent=1)


def save_plan(model, path: str | Path) -> None:
    """Write ``path`` (JSON) and, when the plan has tensors, ``<path stem>.safetensors`` beside it, each atomically."""
    plan = get_plan(model)
    if plan is None:
        raise ConfigError("The model carries no compression plan; compress it first.")
    path = Path(path)
    tensors_file = path.with_suffix(".safetensors").name
    if plan.get("tensors"):
        from safetensors.torch import save_file

        with atomic_path(path.parent / tensors_file) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in plan["tensors"].items()}, str(tmp))
    write_atomic(path, plan_json(plan, tensors_file))
