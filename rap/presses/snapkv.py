"""SnapKV (Li et al., 2024): the attention that the last ``window`` queries of the context pay to each earlier token,
averaged over those queries and the query heads of each KV head, smoothed by a 1-D average pool of ``kernel`` tokens;
the window itself is always kept. As kvpress's ``SnapKVPress`` (window 64, kernel 5). The queries are recomputed from
the window's inputs to each attention layer, captured while the context is encoded (``Press.capture``)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .base import Press, register


def window_queries(attn, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(batch, heads, window, width) queries of ``attn`` for ``hidden`` (the window's inputs), as its forward makes
    them: a compressed module's own ``project``, else q_proj, the head view, q_norm where it has one, then RoPE."""
    if hasattr(attn, "project"):
        return attn.project(hidden, position_embeddings)[0]
    q = attn.q_proj(hidden).view(*hidden.shape[:-1], -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    cos, sin = position_embeddings
    return apply_rotary_pos_emb(q, q, cos, sin)[0]


@register
@dataclass
class SnapKV(Press):
    """Keeps the tokens the end of the context attends to.

    Parameters (and ``ratio``, as ``Press``)
    ----------
    window : int
        The last ``window`` context tokens whose queries score the rest; they are always kept (64, as kvpress).
    kernel : int
        Width of the average pool over neighbouring tokens' scores (5, as kvpress).
    """

    window: int = 64
    kernel: int = 5
    name = "snapkv"
    reads_keys = True
    needs_queries = True

    @contextmanager
    def capture(self, model, last: int | None = None):
        with super().capture(model, last or self.window):
            yield

    def layer_scores(self, attn, keys: torch.Tensor, captured: tuple) -> torch.Tensor:
        hidden, position_embeddings = captured
        q = window_queries(attn, hidden, position_embeddings).float()
        b, heads, w, _ = q.shape
        n, n_kv = keys.shape[-2], keys.shape[1]
        k = keys.float().repeat_interleave(heads // n_kv, dim=1)
        logits = q @ k.transpose(-1, -2) * attn.scaling
        causal = torch.arange(n, device=keys.device)[None, :] > torch.arange(n - w, n, device=keys.device)[:, None]
        probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
        scores = F.avg_pool1d(probs.mean(2), self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        scores = scores.view(b, n_kv, heads // n_kv, n).mean(2)
        scores[..., n - w:] = scores.max() + 1  # the window itself is always kept
        return scores
