"""StreamingLLM (Xiao et al., 2023): the first ``sinks`` tokens, which draw attention whatever they say, and the most
recent ones. kvpress's ``StreamingLLMPress`` keeps 4 sinks; so does rap."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, register


@register
@dataclass
class StreamingLLM(Press):
    """Attention sinks plus a recent window.

    Parameters
    ----------
    ratio : float
        Fraction of the context evicted: the window is what the sinks leave of the kept count.
    sinks : int
        Leading tokens always kept (4, as kvpress and the paper).
    """

    sinks: int = 4
    name = "streaming"

    def score(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b, h, n, _ = keys.shape
        position = torch.arange(n, device=keys.device, dtype=torch.float32)
        scores = torch.where(position < self.sinks, n + position, position)  # sinks first, then the most recent
        return scores.expand(b, h, n)
