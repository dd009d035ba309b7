"""StreamingLLM (Xiao et al., 2023): the first ``sinks`` tokens, which draw attention whatever they say, and the most
recent ones. kvpress's ``StreamingLLMPress`` keeps 4 sinks; so does rap."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, register


@register
@dataclass
class StreamingLLM(Press):
    """Attention sinks plus a recent window: the first ``sinks`` tokens (4, as kvpress and the paper) and the most
    recent ones, as many as ``ratio`` (``Press``) leaves."""

    sinks: int = 4
    name = "streaming"

    def score(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b, h, n, _ = keys.shape
        position = torch.arange(n, device=keys.device, dtype=torch.float32)
        scores = torch.where(position < self.sinks, n + position, position)  # sinks first, then the most recent
        return scores.expand(b, h, n)
