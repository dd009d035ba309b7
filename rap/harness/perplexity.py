"""Perplexity on WikiText-2 test (the common protocol: joined rows, non-overlapping windows, exp(mean CE))."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..devices import model_device


def window_logits(model, ids: torch.Tensor, chunk: int | None = None, make_cache=None, press=None) -> torch.Tensor:
    """Logits of one window (1, n): one forward without a cache, or, with ``chunk``, fed through the cache ``chunk``
    tokens at a time, each chunk attending to what the cache holds of the earlier ones (``make_cache()`` gives a
    fresh cache; default DynamicCache). Equal for any method that changes only weights; a quantized cache makes
    every later chunk read dequantized keys and values. With a ``press`` (``rap.presses``) the window's first half
    is the context: encoded in one forward, pressed, and the second half read after it in chunks, at its own
    positions, attending to the entries the press kept."""
    if chunk is None:
        return model(ids, use_cache=False).logits
    from transformers import DynamicCache

    from ..compat import cache_kwargs
    from ..presses import advance, next_positions

    cache = make_cache() if make_cache is not None else DynamicCache()
    start, out = 0, []
    if press is not None:
        start = ids.shape[1] // 2
        with press.capture(model):
            out.append(model(ids[:, :start], use_cache=True, **cache_kwargs(cache)).logits)
        press.compress(model, cache, ids[:, :start])
    for i in range(start, ids.shape[1], chunk):
        part = ids[:, i:i + chunk]
        positions = {"position_ids": next_positions(cache, part.shape[1])} if press is not None else {}
        out.append(model(part, use_cache=True, **cache_kwargs(cache), **positions).logits)
        advance(cache, part.shape[1])
    return torch.cat(out, 1)


WINDOW_CHOICES = ("spread", "first")


def window_indices(n_total: int, n: int | None, choice: str = "spread") -> list[int]:
    """Which of the corpus's ``n_total`` windows to read: all of them, or ``n`` of them, either ``spread`` evenly over
    the whole text (window i of n at the middle of its n-th of the corpus: neighbouring windows, which share an
    article, are rarely both read) or the ``first`` n (contiguous, a handful of articles; results from before the
    choice existed)."""
    if choice not in WINDOW_CHOICES:
        raise ValueError(f"eval.ppl.windows={choice!r} is not one of {', '.join(WINDOW_CHOICES)}.")
    if n is None or n >= n_total:
        return list(range(n_total))
    if choice == "first":
        return list(range(n))
    return [int((i + 0.5) * n_total / n) for i in range(n)]


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               desc: str = "perplexity", chunk: int | None = None, make_cache=None, bos_id: int | None = None,
               windows: str = "spread", press=None) -> dict:
    """Token-level perplexity over non-overlapping windows of ``seqlen`` tokens.

    Parameters
    ----------
    model : transformers causal LM
    input_ids : 1-D LongTensor, the whole tokenized corpus.
    seqlen : window length; the tail shorter than a window is dropped, as in the GPTQ protocol.
    max_windows : evaluate only N windows (``None`` for all), chosen as ``windows`` says (``window_indices``).
    chunk, make_cache, press : cache-in-the-loop perplexity (``window_logits``), with the window's first half pressed
        when ``press`` is given; ``chunk`` None: one forward per window.
    bos_id : when set (``rap.data.window_bos``), every window is this token followed by ``seqlen - 1`` corpus tokens
        (the corpus's own leading BOS dropped), so each window starts as the model's texts do; the count predicted per
        window stays ``seqlen - 1``.

    Returns
    -------
    dict with ``ppl``, ``nll`` (mean CE in nats), ``tokens`` (predicted tokens), ``windows`` and
    ``window_nll`` (each window's mean CE, for paired comparisons: every window predicts the same count) and
    ``window_index`` (which windows of the corpus, in order).
    """
    if bos_id is not None:
        corpus = input_ids[1:] if input_ids[:1].tolist() == [bos_id] else input_ids
        width = seqlen - 1
    else:
        corpus, width = input_ids, seqlen
    if corpus.numel() // width == 0:
        raise ValueError(f"Corpus has {input_ids.numel()} tokens, fewer than one window of {seqlen}.")
    index = window_indices(corpus.numel() // width, max_windows, windows)
    n_windows = len(index)
    device = model_device(model)
    window_nll = []
    for w in tqdm(index, desc=desc, leave=False):
        ids = corpus[w * width:(w + 1) * width]
        if bos_id is not None:
            ids = torch.cat([ids.new_tensor([bos_id]), ids])
        ids = ids.unsqueeze(0).to(device)
        logits = window_logits(model, ids, chunk, make_cache, press)[0, :-1].float()
        window_nll.append(F.cross_entropy(logits, ids[0, 1:]).item())
    nll = sum(window_nll) / n_windows
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_windows * (seqlen - 1), "windows": n_windows,
            "window_nll": window_nll, "window_index": index}
