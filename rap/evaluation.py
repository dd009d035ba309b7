"""Perplexity on WikiText-2 test (the common protocol: joined rows, non-overlapping windows, exp(mean CE))."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               desc: str = "perplexity") -> dict:
    """Token-level perplexity over non-overlapping windows of ``seqlen`` tokens.

    Parameters
    ----------
    model : transformers causal LM
    input_ids : 1-D LongTensor, the whole tokenized corpus.
    seqlen : window length; the tail shorter than a window is dropped, as in the GPTQ protocol.
    max_windows : evaluate only the first N windows (quick profile); ``None`` for all.

    Returns
    -------
    dict with ``ppl``, ``nll`` (mean CE in nats), ``tokens`` (predicted tokens), ``windows`` and
    ``window_nll`` (each window's mean CE, for paired comparisons: every window predicts the same count).
    """
    n_windows = input_ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"Corpus has {input_ids.numel()} tokens, fewer than one window of {seqlen}.")
    device = next(model.parameters()).device
    window_nll = []
    for w in tqdm(range(n_windows), desc=desc, leave=False):
        ids = input_ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        window_nll.append(F.cross_entropy(logits, ids[0, 1:]).item())
    nll = sum(window_nll) / n_windows
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_windows * (seqlen - 1), "windows": n_windows,
            "window_nll": window_nll}
