"""KVzap (arXiv 2601.07891): a small model per decoder layer reads the attention layer's input (the normed hidden
state) of each context token and predicts, per KV head, the log of the token's KVzip+ score; a press keeps each head's
highest predictions, so the context is scored in one cheap pass instead of KVzip's second one.

KVzip+ (the targets, ``kvzip_plus_targets``): the model repeats its context after KVzip's instruction, and context
token i of KV head g scores max over the repetition queries j and the query heads h of g of a_ji · ||W_o^h v_i|| /
||x_j||, with x_j the query token's normed hidden state. The value and W_o are the model's own, so on a compressed
model they are its narrower values and the matching W_o columns. The surrogate here is kvpress's linear kind,
``Linear(hidden → n_kv)``, fitted by ridge regression from running sums (``RidgeSums``: memory does not grow with the
samples). rap's press keeps a fixed fraction, so KVzap can be compared with the other presses at equal bytes; the
last ``window`` tokens are always kept, as KVzap keeps its last 128.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..compat import cache_kwargs
from ..errors import ConfigError
from .base import Press, register
from .kvzip import INSTRUCTION, KVzip, group_max, repetition_attention

EPS = 1e-12


class RidgeSums:
    """Running sums XᵀX and XᵀY of a linear fit with a bias, and its ridge solution (the bias is not penalised)."""

    def __init__(self, n_in: int, n_out: int):
        self.xtx = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(n_in + 1, n_out, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x`` (samples, n_in) and ``y`` (samples, n_out)."""
        x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        self.xtx += x1.T @ x1
        self.xty += x1.T @ y.double()

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (n_out, n_in), bias (n_out,)) minimising ||XW + b - Y||² + ridge·||W||²."""
        penalty = torch.eye(len(self.xtx), dtype=torch.float64) * ridge
        penalty[-1, -1] = 0.0
        w = torch.linalg.solve(self.xtx + penalty, self.xty)
        return w[:-1].T.float(), w[-1].float()


def _value_norms(attn, values: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens): ||W_o^h v_i|| for every query head h, with v_i the cached value of h's KV head (the
    model's own width, so a compressed model's narrower values and W_o columns)."""
    b, n_kv, n, w = values.shape
    heads = attn.o_proj.weight.shape[1] // w
    wo = attn.o_proj.weight.float().view(-1, heads, w)  # (hidden, heads, w)
    v = values.float().repeat_interleave(heads // n_kv, dim=1)  # (b, heads, n, w)
    return torch.einsum("bhnw,dhw->bhnd", v, wo).norm(dim=-1)


@torch.no_grad()
def kvzip_plus_targets(model, ids: torch.Tensor, instruction_ids: torch.Tensor) -> list[tuple]:
    """Per decoder layer, ``(x, y)``: the context tokens' attention inputs (batch·n, hidden) and their log KVzip+
    scores (batch·n, n_kv), from one pass over the context and one over its repetition."""
    from transformers import DynamicCache

    method = (getattr(model, "rap_plan", None) or {}).get("method")
    if method in ("palu", "elitekv"):
        raise ConfigError(f"KVzip+ targets weigh each token by its value through W_o, but {method} caches a latent "
                          "shared by several heads; fit KVzap on the uncompressed model, rap or kvlatent.")
    n, b = ids.shape[1], ids.shape[0]
    cache, recorder = DynamicCache(), KVzip()
    with recorder.capture_all(model, n):
        model(ids, use_cache=True, **cache_kwargs(cache))
    context = recorder._captured
    repeat = torch.cat([instruction_ids.to(ids.device).expand(b, -1), ids], 1)
    m = repeat.shape[1]
    with recorder.capture_all(model, m):
        model(repeat, use_cache=True, position_ids=torch.arange(n, n + m, device=ids.device).expand(b, -1),
              **cache_kwargs(cache))
    out = []
    for i, layer in enumerate(cache.layers):
        attn, n_kv = model.model.layers[i].self_attn, layer.keys.shape[1]
        probs = repetition_attention(attn, layer.keys, recorder._captured[i], n)
        weighted = probs * _value_norms(attn, layer.values[..., :n, :])[:, :, None, :]
        weighted = weighted / recorder._captured[i][0].float().norm(dim=-1)[:, None, :, None].clamp_min(EPS)
        score = group_max(weighted, n_kv)  # (b, n_kv, n)
        out.append((context[i][0].float().reshape(b * n, -1), score.clamp_min(EPS).log().transpose(1, 2)
                    .reshape(b * n, n_kv)))
    return out


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """1 - residual / total sum of squares, over every sample and head."""
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(EPS))


def fit_surrogate(model, texts: list[torch.Tensor], instruction_ids: torch.Tensor, ridge: float = 1e-3,
                  held_out: int = 1, other: dict | None = None) -> dict:
    """Ridge surrogates for every layer from KVzip+ targets on ``texts`` (each (1, n) token ids), the last
    ``held_out`` of them kept apart to score each layer's R². Returns ``{"weight": [(n_kv, hidden)], "bias":
    [(n_kv,)], "r2": [per layer]}``, and with ``other`` (a surrogate fitted elsewhere, e.g. on the uncompressed
    model) ``"r2_other"``: its R² on the same held-out targets of this model."""
    if len(texts) <= held_out:
        raise ConfigError(f"fitting KVzap needs more than {held_out} texts (the last {held_out} are held out).")
    sums, held = None, []
    for t, ids in enumerate(texts):
        pairs = kvzip_plus_targets(model, ids, instruction_ids)
        if t >= len(texts) - held_out:
            held.append(pairs)
            continue
        sums = sums or [RidgeSums(x.shape[1], y.shape[1]) for x, y in pairs]
        for s, (x, y) in zip(sums, pairs):
            s.add(x, y)
    weights, biases, r2, r2_other = [], [], [], []
    for i, s in enumerate(sums):
        w, b = s.solve(ridge)
        x = torch.cat([h[i][0] for h in held])
        y = torch.cat([h[i][1] for h in held])
        r2.append(r2_score(x @ w.T + b, y))
        if other is not None:
            r2_other.append(r2_score(x @ other["weight"][i].T + other["bias"][i], y))
        weights.append(w)
        biases.append(b)
    return {"weight": weights, "bias": biases, "r2": r2, **({"r2_other": r2_other} if other is not None else {})}


@register
@dataclass
class KVzap(Press):
    """The trained surrogate's predicted KVzip+ scores, at a fixed ratio.

    Parameters (and ``ratio``, as ``Press``)
    ----------
    surrogate : str or dict
        A file saved by ``python -m rap.harness.train_kvzap`` (or the dict ``fit_surrogate`` returns).
    window : int
        The last tokens always kept (KVzap keeps 128).
    """

    surrogate: str | dict | None = None
    window: int = 128
    name = "kvzap"
    needs_queries = True

    def _weights(self) -> dict:
        if isinstance(self.surrogate, dict):
            return self.surrogate
        if not self.surrogate:
            raise ConfigError("press=kvzap needs press.surrogate=<file saved by python -m rap.harness.train_kvzap>.")
        from .surrogates import load_surrogate

        self.surrogate = load_surrogate(self.surrogate)
        return self.surrogate

    @contextmanager
    def capture(self, model, last: int = 0):
        with self.capture_all(model, None):
            yield

    def check_model(self, model) -> None:
        """The surrogate must be fitted for this model's layers and KV heads."""
        s = self._weights()
        cfg = model.config
        if len(s["weight"]) != cfg.num_hidden_layers or s["weight"][0].shape != (cfg.num_key_value_heads,
                                                                                 cfg.hidden_size):
            raise ConfigError(f"press.surrogate was fitted for {len(s['weight'])} layers of "
                              f"{tuple(s['weight'][0].shape)} surrogates, not this model's {cfg.num_hidden_layers} "
                              f"layers of ({cfg.num_key_value_heads}, {cfg.hidden_size}).")

    def prepare(self, model, cache, ids) -> None:
        self.check_model(model)

    def layer_scores(self, attn, keys: torch.Tensor, captured) -> torch.Tensor:
        s = self._weights()
        hidden, _ = captured
        w, b = s["weight"][attn.layer_idx].to(hidden.device), s["bias"][attn.layer_idx].to(hidden.device)
        scores = (hidden.float() @ w.T + b).transpose(1, 2)  # (batch, n_kv, tokens)
        scores[..., -self.window:] = float("inf")  # the most recent tokens are always kept
        return scores


__all__ = ["INSTRUCTION", "KVzap", "RidgeSums", "fit_surrogate", "kvzip_plus_targets"]
