"""The evaluations a job runs, one entry each: what it reads from ``conf/eval`` (its spec), the data it checks before
any model loads, how it runs (``-> (metrics, per_sample)``) and how two runs of it are paired (``analysis.report``).
The job loops over the configured ones (``EVALUATORS``, in order); a new kind of evaluation is one class here, its
block in ``conf/eval/base.yaml`` and its pairing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..cache import make_cache
from ..data import WIKITEXT_TEST, check_wikitext2_test, check_window, wikitext2_test_text, window_bos
from ..errors import ConfigError
from ..stats import Interval, paired_accuracy_difference, paired_perplexity_ratio
from .perplexity import WINDOW_CHOICES, perplexity


@dataclass(frozen=True)
class Context:
    """What an evaluation needs from the job besides the model: its data, cache and seed."""

    data_dir: Path | None
    cache: object  # rap.cache.CacheSpec
    seed: int
    ppl_mode: str  # forward | cached (Settings.ppl_mode)
    press: object = None  # rap.presses.Press or None


class Evaluator:
    """One kind of evaluation. ``key`` is its block in ``conf/eval`` and in ``per_sample.json``."""

    key = ""

    def spec(self, block) -> dict | None:
        """The block of ``conf/eval`` as plain values, or None when this evaluation is off."""
        raise NotImplementedError

    def check(self, spec: dict, data_dir: Path | None) -> None:
        """Read the data files it will use, so a bad one fails before any model loads."""

    def run(self, model, tok, spec: dict, ctx: Context) -> tuple[dict, dict]:
        """``(metrics, per_sample)``: flat keys for ``metrics.json`` and this evaluation's part of
        ``per_sample.json``."""
        raise NotImplementedError

    @staticmethod
    def pair(a: dict, b: dict) -> dict[str, Interval]:
        """Run ``b`` against run ``a`` from their ``per_sample.json`` parts, where both have them."""
        return {}


class Perplexity(Evaluator):
    """WikiText-2 test perplexity over windows (``rap.harness.perplexity``)."""

    key = "ppl"

    def spec(self, block) -> dict:
        windows = block.get("windows") or "first"  # results from before the choice read the first windows
        if windows not in WINDOW_CHOICES:
            raise ConfigError(f"eval.ppl.windows={windows!r} is not one of {', '.join(WINDOW_CHOICES)}.")
        # the mode (forward or cached) is resolved with the cache and the press: Settings.ppl_mode
        return {"seqlen": block.seqlen, "max_windows": block.max_windows, "chunk": block.get("chunk"),
                "windows": windows}

    def check(self, spec, data_dir):
        if data_dir is not None:
            check_wikitext2_test(data_dir, spec["seqlen"])

    def run(self, model, tok, spec, ctx):
        ids = tok(wikitext2_test_text(ctx.data_dir), return_tensors="pt").input_ids[0]
        check_window(ids.numel(), spec["seqlen"], "WikiText-2 test" if ctx.data_dir is None
                     else ctx.data_dir / WIKITEXT_TEST)
        chunk = (spec["chunk"] or 256) if ctx.ppl_mode == "cached" else None
        bos = window_bos(tok)
        ppl = perplexity(model, ids, seqlen=spec["seqlen"], max_windows=spec["max_windows"], chunk=chunk,
                         make_cache=lambda: make_cache(ctx.cache, model), bos_id=bos, windows=spec["windows"],
                         press=ctx.press)
        metrics = {"ppl_wikitext2": ppl["ppl"], "ppl_nll": ppl["nll"], "ppl_tokens": ppl["tokens"],
                   "ppl_windows": ppl["windows"], "ppl_window_choice": spec["windows"], "ppl_seqlen": spec["seqlen"],
                   "ppl_dataset": "wikitext-2-raw-v1", "ppl_split": "test", "ppl_mode": ctx.ppl_mode,
                   **({"ppl_chunk": chunk} if chunk else {}), **({"ppl_bos": True} if bos is not None else {})}
        return metrics, {"window_nll": ppl["window_nll"], "window_index": ppl["window_index"],
                         "seqlen": spec["seqlen"]}

    @staticmethod
    def pair(a, b):
        a, b = a.get("ppl") or {}, b.get("ppl") or {}
        if a.get("window_nll") and len(a["window_nll"]) == len(b.get("window_nll") or []):
            return {"ppl_ratio": paired_perplexity_ratio(a["window_nll"], b["window_nll"])}
        return {}


class ZeroShot(Evaluator):
    """lm-eval's multiple-choice and LAMBADA tasks on local files (``rap.harness.zeroshot``)."""

    key = "zeroshot"

    def spec(self, block) -> dict | None:
        if not block.tasks:
            return None
        return {"tasks": list(block.tasks), "limit": block.limit, "batch_size": block.batch_size}

    def check(self, spec, data_dir):
        if data_dir is not None:
            from .zeroshot import check_task_files

            check_task_files(data_dir, spec["tasks"])

    def run(self, model, tok, spec, ctx):
        import tempfile

        from .zeroshot import evaluate_zero_shot

        with tempfile.TemporaryDirectory(prefix="rap_tasks_") as work:
            zs = evaluate_zero_shot(model, tok, spec["tasks"], ctx.data_dir, limit=spec["limit"], seed=ctx.seed,
                                    batch_size=spec["batch_size"], work_dir=work)
        per_doc = zs.pop("zs_per_doc")
        return {**zs, "zs_limit": spec["limit"], "zs_seed": ctx.seed}, per_doc

    @staticmethod
    def pair(a, b):
        if a.get("zeroshot") and b.get("zeroshot"):
            return {"acc_diff": paired_accuracy_difference(a["zeroshot"], b["zeroshot"])}
        return {}


def by_length(long: dict) -> dict:
    """``per_sample.json["long"]`` ({task: doc_id, length, score}) as one task per task and length, the shape
    ``paired_accuracy_difference`` takes: the mean over (task, length) cells, as ``ruler_avg``."""
    out = {}
    for task, d in long.items():
        for doc, length, score in zip(d["doc_id"], d["length"], d["score"]):
            cell = out.setdefault(f"{task}_{length}", {"doc_id": [], "score": []})
            cell["doc_id"].append(doc)
            cell["score"].append(score)
    return out


class Long(Evaluator):
    """RULER long-context retrieval through the job's cache (``rap.harness.ruler``)."""

    key = "long"

    def spec(self, block) -> dict | None:
        if block is None or not block.tasks:
            return None
        from .ruler import check_tasks

        check_tasks(block.tasks)
        return {"tasks": list(block.tasks), "lengths": block.get("lengths"), "limit": block.limit}

    def run(self, model, tok, spec, ctx):
        from .ruler import evaluate_long, long_lengths

        lengths = long_lengths(spec["lengths"], model)
        lr = evaluate_long(model, tok, spec["tasks"], lengths, spec["limit"], seed=ctx.seed,
                           make_cache=lambda: make_cache(ctx.cache, model))
        per_doc = lr.pop("ruler_per_doc")
        return {**lr, "ruler_limit": spec["limit"], "ruler_lengths": lengths}, per_doc

    @staticmethod
    def pair(a, b):
        if a.get("long") and b.get("long"):
            return {"long_diff": paired_accuracy_difference(by_length(a["long"]), by_length(b["long"]), "score")}
        return {}


EVALUATORS: dict[str, Evaluator] = {e.key: e for e in (Perplexity(), ZeroShot(), Long())}


def eval_specs(eval_cfg) -> dict[str, dict]:
    """The configured evaluations of a ``conf/eval`` profile, in ``EVALUATORS`` order: key -> spec."""
    specs = {key: e.spec(eval_cfg.get(key)) for key, e in EVALUATORS.items()}
    return {k: v for k, v in specs.items() if v is not None}


def pair_runs(a: dict | None, b: dict | None) -> dict[str, Interval]:
    """Run ``b``'s intervals against run ``a`` from their ``per_sample.json``, each evaluation by its own rule."""
    if a is None or b is None:
        return {}
    return {name: iv for e in EVALUATORS.values() for name, iv in e.pair(a, b).items()}
