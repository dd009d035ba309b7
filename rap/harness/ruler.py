"""Long-context retrieval through lm-eval's own RULER tasks, generated locally, answered by greedy generation through
the model's cache (the compressed one, quantized or not).

The tasks are the ones lm-eval synthesises without a download: needle-in-a-haystack on the "repeat" and "needle"
haystacks (``niah_single_1``, ``niah_multikey_2``, ``niah_multikey_3``), variable tracking (``ruler_vt``), common
and frequent word extraction (``ruler_cwe``, ``ruler_fwe``). The others read Paul Graham's essays or QA sets from
the network (``HUB_ONLY``). lm-eval sizes each prompt with a tokenizer it loads by name, so the model's tokenizer
is saved to a local folder first; nltk's ``punkt_tab`` is used only by the essay haystack, so it is not fetched.

Per length, a seeded sample of ``limit`` of lm-eval's 500 generated documents; lm-eval's own scorer
(``string_match_all``: the fraction of the expected values found in the answer). Keys
``ruler_<task>_<length>`` (mean score), ``ruler_avg_<length>``, ``n_ruler_<task>_<length>``, and per document for
paired comparisons.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

LOCAL_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
HUB_ONLY = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery",
            "ruler_qa_squad", "ruler_qa_hotpot")


def short_name(task: str) -> str:
    return task.removeprefix("ruler_")


@contextmanager
def no_nltk_download():
    """lm-eval's RULER module fetches nltk's ``punkt_tab`` on import when it is missing; only the essay haystack
    (hub-only tasks) uses it, so the fetch is skipped instead of reaching the network."""
    import nltk

    original = nltk.download
    nltk.download = lambda *a, **k: False
    try:
        yield
    finally:
        nltk.download = original


def check_tasks(tasks) -> list[str]:
    from ..errors import ConfigError

    tasks = list(tasks)
    hub = [t for t in tasks if t in HUB_ONLY]
    if hub:
        raise ConfigError(f"RULER task(s) {hub} need a download (essays or QA sets); the local ones are "
                          f"{list(LOCAL_TASKS)}.")
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown:
        raise ConfigError(f"Unknown RULER task(s) {unknown}; the local ones are {list(LOCAL_TASKS)}.")
    return tasks


def long_lengths(lengths, model) -> list[int]:
    """``eval.long.lengths``, or by default 1024, 2048, 4096, and on GPU doubling on up to the model's context."""
    from ..devices import model_device
    from ..errors import ConfigError

    limit = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    if lengths is None:
        lengths = [1024, 2048, 4096]
        if model_device(model).type == "cuda":
            while lengths[-1] * 2 <= min(limit, 32768):
                lengths.append(lengths[-1] * 2)
    lengths = sorted(int(n) for n in lengths)
    if lengths[-1] > limit or lengths[0] < 1:
        raise ConfigError(f"eval.long.lengths={lengths} must lie within the model's context of {limit} tokens.")
    return lengths


def cached_generation_lm(model, tokenizer, make_cache, max_length: int, batch_size: int = 1):
    """lm-eval's HFLM on the in-memory model, generating through a cache from ``make_cache()`` (default: the
    model's own DynamicCache)."""
    from lm_eval.models.huggingface import HFLM

    from ..compat import cache_kwargs

    class CachedHFLM(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if make_cache is not None:
                generation_kwargs.update(cache_kwargs(make_cache()))
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return CachedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate_long(model, tokenizer, tasks, lengths, limit: int | None, seed: int = 0, make_cache=None) -> dict:
    """RULER ``tasks`` at each of ``lengths`` (prompt tokens) on ``limit`` seeded documents per task and length.
    Returns the flat keys of the module docstring and ``ruler_per_doc`` = ``{task: {"doc_id", "length", "score"}}``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .zeroshot import sample_indices

    tasks, lengths = check_tasks(tasks), sorted(int(n) for n in lengths)
    with tempfile.TemporaryDirectory(prefix="rap_ruler_") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tokenizer.save_pretrained(tok_dir)
        with no_nltk_download():
            manager = TaskManager(metadata={"tokenizer": str(tok_dir), "max_seq_lengths": lengths})
            loaded = manager.load(tasks)["tasks"]
            samples = {}
            for t in tasks:
                by_length = {}
                for i, doc in enumerate(loaded[t].eval_docs):
                    by_length.setdefault(int(doc["max_length"]), []).append(i)
                samples[t] = sorted(by_length[n][j] for n in lengths
                                    for j in sample_indices(len(by_length[n]), limit, seed))
            gen = max(int(loaded[t].config.generation_kwargs.get("max_gen_toks", 128)) for t in tasks)
            lm = cached_generation_lm(model, tokenizer, make_cache, max_length=max(lengths) + gen)
            out = lm_eval.simple_evaluate(model=lm, tasks=[loaded[t] for t in tasks], task_manager=manager,
                                          samples=samples, log_samples=True, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed)
    flat, per_doc = {}, {}
    for t in tasks:
        rows = sorted(out["samples"][t], key=lambda r: r["doc_id"])
        lens = [int(r["doc"]["max_length"]) for r in rows]
        scores = [float(r[str(n)]) for r, n in zip(rows, lens)]
        per_doc[short_name(t)] = {"doc_id": [int(r["doc_id"]) for r in rows], "length": lens, "score": scores}
        for n in lengths:
            mine = [s for s, m in zip(scores, lens) if m == n]
            flat[f"ruler_{short_name(t)}_{n}"] = sum(mine) / len(mine)
            flat[f"n_ruler_{short_name(t)}_{n}"] = len(mine)
    for n in lengths:
        flat[f"ruler_avg_{n}"] = sum(flat[f"ruler_{short_name(t)}_{n}"] for t in tasks) / len(tasks)
    flat["ruler_per_doc"] = per_doc
    return flat
