"""Key norm (Devoto et al., 2024): keys of small L2 norm draw more attention, so each head keeps its lowest-norm
keys. As kvpress's ``KnormPress``: the score is the negative norm of the cached (rotated) key."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, register


@register
@dataclass
class KeyNorm(Press):
    """Each KV head keeps the context tokens whose cached keys have the smallest L2 norm (``ratio``: ``Press``)."""

    name = "knorm"
    reads_keys = True

    def score(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
