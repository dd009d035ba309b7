"""Where a model runs: the configured device and dtype resolved, and the devices a loaded model occupies."""
from __future__ import annotations

import torch

from .errors import ModelError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device={device} was asked for but CUDA is not available; use device=auto or device=cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"Unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16.") from None



def model_device(model) -> torch.device:
    """Where inputs go: the input embedding's device (a model spread over devices takes its token ids there)."""
    return model.get_input_embeddings().weight.device


def model_devices(model) -> list[torch.device]:
    """Every device holding a parameter or buffer of ``model``, sorted (one for a model that is not spread)."""
    return sorted({t.device for t in (*model.parameters(), *model.buffers())}, key=str)
