"""``metrics.json``: every key a job writes, its kind and its meaning, in one table. ``check_metrics`` holds each
finished result to it before the commit, so a key nothing documents cannot reach a result file (every committed run
in ``results/`` passes it: ``tests/test_job.py``).

Kinds: ``number`` (int, float or bool), ``text``, ``list``, or alternatives (``number|text``); every value may be
null (a measurement that does not apply). Patterns use ``*`` for a task, a length, a phase or a cost key.
``per_sample.json`` holds each window's NLL (``ppl``), each document's scores (``zeroshot``, ``long``) and the heal
curves (``heal``), for paired comparisons.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

KINDS = {"number": (int, float, bool), "text": (str,), "list": (list,)}


@dataclass(frozen=True)
class Key:
    pattern: str
    kind: str
    meaning: str


METRICS = (
    # the run
    Key("model", "text", "the model preset's name"),
    Key("method", "text", "the method, none at ratio 0 whatever the configured one"),
    Key("ratio", "number", "fraction of KV-cache dims removed"),
    Key("eval_profile", "text", "the conf/eval profile"),
    Key("seed", "number", "the job's seed (documents, calibration windows)"),
    Key("run_name", "text", "the run's folder name"),
    Key("status", "text", "complete"),
    Key("wall_time_s", "number", "the whole job"),
    Key("time_*_s", "number", "a phase: load, baseline, compress, heal, measure, latency, and each evaluation"),
    Key("model_devices", "text", "the devices holding the weights, comma-separated"),
    Key("round_to", "number", "the plan's rounding as it ran (auto resolved)"),
    Key("value_path", "text", "EliteKV's value path as it ran (auto resolved)"),
    Key("qk_norm", "text", "the QK-norm mode on a QK-norm model, as it ran"),
    # healing (rap.heal); a replayed healed plan carries the outcome of the run that trained it
    Key("heal", "text", "the heal mode"),
    Key("heal_*", "number", "its budget and outcome (source, n_samples, seqlen, tokens, steps, batch_size, lr, params, "
                            "time_s, loss_before, loss_after, replayed)"),
    Key("heal_source", "text", "the heal's calibration text"),
    Key("heal_lr", "number|text", "the learning rate, or auto when each layer picked its own (heal_lr_chosen)"),
    Key("heal_lr_chosen", "list", "each layer's learning rate, with heal.lr=auto"),
    # environment (rap.harness.environment)
    Key("env_*", "text", "versions, device, dtype, platform"),
    Key("env_git_dirty", "number", "the tree had uncommitted changes"),
    Key("env_threads", "number", "torch threads"),
    # perplexity (rap.harness.evaluators.Perplexity)
    Key("ppl_wikitext2", "number", "WikiText-2 test perplexity"),
    Key("ppl_*", "number", "its nll, tokens, windows, seqlen, chunk, bos"),
    Key("ppl_window_choice", "text", "spread over the text or the first N"),
    Key("ppl_dataset", "text", "wikitext-2-raw-v1"),
    Key("ppl_split", "text", "test"),
    Key("ppl_mode", "text", "forward, or cached through the job's cache"),
    # zero-shot (rap.harness.zeroshot)
    Key("acc_*", "number", "a task's accuracy, acc_norm and stderr, and the averages acc_avg, acc_norm_avg"),
    Key("ppl_lambada_openai", "number", "LAMBADA's perplexity of the target words"),
    Key("n_*", "number", "documents scored per task (and per RULER task and length)"),
    Key("zs_limit", "number", "documents per task"),
    Key("zs_seed", "number", "the documents' seed"),
    # long context (rap.harness.ruler)
    Key("ruler_*", "number", "a task's score at a length, and the average per length"),
    Key("ruler_limit", "number", "documents per task and length"),
    Key("ruler_lengths", "list", "prompt lengths"),
    # costs at context_len (rap.measure, rap.costs)
    Key("context_len", "number", "the context the costs are measured at"),
    Key("kv_bytes*", "number", "bytes the cache holds (its parts, allocated, per token), measured and _formula"),
    Key("kv_cache", "text", "fp or the quantized cache's label"),
    Key("press_kept_fraction", "number", "tokens a press kept over tokens seen, from the cache"),
    Key("params_*", "number", "parameters (total, attention), measured and _formula"),
    Key("flops_*", "number", "FLOPs of one decode step (model, attention), measured and _formula"),
    Key("sdpa_kernel*", "text", "the attention kernels of the decode step and of the prefill"),
    Key("base_*", "number", "the uncompressed model's cost or latency, for the ratios"),
    Key("*_ratio", "number", "a cost or latency over the uncompressed model's"),
    # latency (rap.measure.measure_latency; ms, medians)
    Key("latency_*", "number", "prefill and decode latency, whole model and attention"),
    Key("latency_device", "text", "every device the model uses"),
    Key("latency_dtype", "text", "the dtype timed"),
    Key("attn_implementation", "text", "the attention implementation the model ran with (sdpa)"),
)


def key_for(name: str) -> Key | None:
    """The most specific entry for ``name``: an exact one first, then the longest pattern."""
    matches = [k for k in METRICS if fnmatchcase(name, k.pattern)]
    return max(matches, key=lambda k: ("*" not in k.pattern, len(k.pattern)), default=None)


def check_metrics(results: dict) -> None:
    """Raise ``ValueError`` naming every key that the table does not document or whose value is not of its kind."""
    problems = []
    for name, value in results.items():
        key = key_for(name)
        if key is None:
            problems.append(f"{name} is not in rap.harness.schema.METRICS")
        elif value is not None and not isinstance(value, tuple(t for k in key.kind.split("|") for t in KINDS[k])):
            problems.append(f"{name}={value!r} is not {key.kind} ({key.pattern})")
    if problems:
        raise ValueError("metrics.json would break its schema: " + "; ".join(problems))
