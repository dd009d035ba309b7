"""KVzap surrogate files: one safetensors file holding each layer's ridge weights and bias, with what they were fitted
for (the model's signature and the compression plan's method and ratio) and each layer's held-out R² in its metadata.
A surrogate is refused for a model whose layers or heads it does not fit (``KVzap.check_model``)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def save_surrogate(surrogate: dict, path, fitted_for: dict) -> Path:
    """Write ``surrogate`` (``fit_surrogate``'s dict) and ``fitted_for`` (model, plan, texts) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{k}.{i}": t.contiguous() for k in ("weight", "bias") for i, t in enumerate(surrogate[k])}
    meta = {"fitted_for": json.dumps(fitted_for), "r2": json.dumps(surrogate["r2"])}
    if "r2_other" in surrogate:
        meta["r2_other"] = json.dumps(surrogate["r2_other"])
    save_file(tensors, str(path), metadata=meta)
    return path


def load_surrogate(path) -> dict:
    """``{"weight": [...], "bias": [...], "r2": [...], "fitted_for": {...}}`` from a file ``save_surrogate`` wrote."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"press.surrogate={path} does not exist; fit one with python -m rap.harness.train_kvzap.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            n = len([k for k in f.keys() if k.startswith("weight.")])
            out = {k: [f.get_tensor(f"{k}.{i}") for i in range(n)] for k in ("weight", "bias")}
        return {**out, "r2": json.loads(meta.get("r2", "[]")), "fitted_for": json.loads(meta.get("fitted_for", "{}")),
                **({"r2_other": json.loads(meta["r2_other"])} if "r2_other" in meta else {})}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"press.surrogate={path} is not a KVzap surrogate file ({e}).") from None
