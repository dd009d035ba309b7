"""Zero-shot accuracy with lm-eval on local copies of the standard task files (no hub access needed).

The task YAMLs in ``rap/harness/tasks/`` mirror the stock lm-eval tasks (same prompts, targets, choices and
metrics, so numbers are comparable to stock lm-eval) but read a JSON file through ``dataset_path: json``.
At run time ``build_local_tasks`` converts the original-format files in ``data_dir`` to the HF field
names the stock prompts use, fills the absolute file path into each YAML and writes both to ``work_dir``;
``evaluate_zero_shot`` then runs lm-eval on an in-memory model with those tasks.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from ..errors import DataError, RapError

TEMPLATE_DIR = Path(__file__).parent / "tasks"

# Stock lm-eval names, used when no data_dir is given (online users).
STOCK_NAMES = {"hellaswag": "hellaswag", "piqa": "piqa", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
               "winogrande": "winogrande", "openbookqa": "openbookqa", "boolq": "boolq",
               "lambada_openai": "lambada_openai"}
# Accuracy a model scores by guessing, per task: 1 / choices for multiple choice (HellaSwag 4, PIQA 2, ARC's mostly 4,
# WinoGrande 2, OpenBookQA 4, BoolQ 2); LAMBADA's open-vocabulary last word has none to speak of.
CHANCE = {"hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "winogrande": 0.5,
          "openbookqa": 0.25, "boolq": 0.5, "lambada_openai": 0.0}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):  # noqa: B007 (n names the bad line in the error)
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {n} is not valid JSON ({e.msg}); the file is truncated or corrupt, so restore it "
                        "from its source (see the data README).") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; restore it from its source (see the data README).") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path} holds no JSON records (one object per line); restore it from its source.")
    return rows


def _read_labels(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path} holds a label that is not an integer; restore it from its source.") from None


def _labelled(paths: list[Path]) -> list[dict]:
    records, labels = _read_jsonl(paths[0]), _read_labels(paths[1])
    if len(records) != len(labels):
        raise DataError(f"{paths[1]} has {len(labels)} labels but {paths[0]} has {len(records)} records; the two "
                        "files do not match, so restore both from their source.")
    return [dict(r, label=y) for r, y in zip(records, labels)]


def _mc(question: dict) -> dict:
    """Original ARC/OpenBookQA choices list -> HF ``choices{text,label}``."""
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


# task -> (original files relative to data_dir, converter from those files to HF-schema records).
CONVERTERS = {
    "hellaswag": (["hellaswag/hellaswag_val.jsonl"], lambda p: _read_jsonl(p[0])),
    "piqa": (["piqa/valid.jsonl", "piqa/valid-labels.lst"], _labelled),
    "arc_easy": (["arc_easy/ARC-Easy-Test.jsonl"],
                 lambda p: [{"id": r["id"], "question": r["question"]["stem"], "choices": _mc(r["question"]),
                             "answerKey": r["answerKey"]} for r in _read_jsonl(p[0])]),
    "arc_challenge": (["arc_challenge/ARC-Challenge-Test.jsonl"],
                      lambda p: [{"id": r["id"], "question": r["question"]["stem"], "choices": _mc(r["question"]),
                                  "answerKey": r["answerKey"]} for r in _read_jsonl(p[0])]),
    "winogrande": (["winogrande/dev.jsonl"], lambda p: _read_jsonl(p[0])),
    "openbookqa": (["openbookqa/test.jsonl"],
                   lambda p: [{"id": r["id"], "question_stem": r["question"]["stem"], "choices": _mc(r["question"]),
                               "answerKey": r["answerKey"]} for r in _read_jsonl(p[0])]),
    "boolq": (["boolq/dev.jsonl"],
              lambda p: [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                         for i, r in enumerate(_read_jsonl(p[0]))]),
    "lambada_openai": (["lambada_openai/lambada_test.jsonl"],
                       lambda p: [{"text": r["text"]} for r in _read_jsonl(p[0])]),
}
TASKS = tuple(CONVERTERS)


def _check_tasks(tasks) -> list[str]:
    bad = [t for t in tasks if t not in CONVERTERS]
    if bad:
        raise RapError(f"Unknown zero-shot task(s) {', '.join(bad)}; valid tasks are {', '.join(TASKS)}.")
    return list(tasks)


def task_records(data_dir, task: str) -> list[dict]:
    """The task's documents in the HF schema, read from its original files; a missing, truncated or mismatched
    file is one ``DataError`` sentence naming it."""
    rel_files, convert = CONVERTERS[task]
    paths = [Path(data_dir) / r for r in rel_files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"Zero-shot data file {p} is missing; set data.dir=... or the env var RAP_DATA_DIR "
                            f"to the folder that holds {rel_files[0].split('/')[0]}/.")
    try:
        return convert(paths)
    except (KeyError, TypeError, IndexError) as e:
        raise DataError(f"{paths[0]} has a record without the expected field {e}; it is not in the {task} format, "
                        "so restore it from its source.") from None


def check_task_files(data_dir, tasks) -> None:
    """Read every task's files (before a model is loaded), so a bad file fails the job at once."""
    for task in _check_tasks(tasks):
        task_records(data_dir, task)


def build_local_tasks(data_dir, work_dir, tasks, sample=None) -> dict[str, str]:
    """Write HF-schema JSONL files and filled task YAMLs (plus utils.py) for ``tasks`` into ``work_dir``.

    ``sample`` is an optional ``{task: [indices]}``: only those records are written (a fallback for
    lm-eval versions without ``simple_evaluate(samples=...)``, and a way to keep tests small).
    Returns ``{task: lm-eval task name}``, e.g. ``{"piqa": "piqa_local"}``.
    """
    tasks = _check_tasks(tasks)
    data_dir, work_dir = Path(data_dir).resolve(), Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATE_DIR / "utils.py", work_dir / "utils.py")
    names = {}
    for task in tasks:
        records = task_records(data_dir, task)
        if sample and task in sample:
            records = [records[i] for i in sorted(sample[task])]
        out = work_dir / f"{task}.jsonl"
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        # Plain replace, not str.format: the templates are full of Jinja {{...}}. The datasets cache goes
        # under work_dir, else every new work_dir would leave another Arrow copy in ~/.cache/huggingface.
        yaml_text = ((TEMPLATE_DIR / f"{task}.yaml").read_text().replace("{data_file}", out.as_posix())
                     .replace("{cache_dir}", (work_dir / "hf_cache").as_posix()))
        (work_dir / f"{task}.yaml").write_text(yaml_text)
        names[task] = f"{task}_local"
    return names


def sample_indices(n_docs: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random sample of ``limit`` doc indices, sorted (lm-eval iterates docs in file order)."""
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    return sorted(random.Random(seed).sample(range(n_docs), limit))


def evaluate_zero_shot(model, tokenizer, tasks, data_dir, limit=None, seed=0, batch_size=8, work_dir=None) -> dict:
    """Zero-shot lm-eval of an in-memory HF model on ``tasks``; returns a flat metrics dict.

    ``data_dir=None`` uses the stock lm-eval tasks (needs the hub). ``limit`` evaluates a seeded random
    sample of that many docs per task, not lm-eval's first N. Keys: ``acc_<task>``, ``acc_norm_<task>``
    (tasks whose stock definition has it: not winogrande/boolq), ``acc_stderr_<task>``, ``n_<task>``,
    ``acc_avg`` (mean acc), ``acc_norm_avg`` (mean of acc_norm, taking acc for tasks without acc_norm, the
    usual convention for a mixed average), and ``zs_per_doc`` = ``{task: {"doc_id": [...], "acc": [...],
    "acc_norm": [...]}}``: each evaluated document's index in the task file and its 0/1 scores, sorted by index,
    so that two models evaluated on the same documents can be compared paired (``rap.stats``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = _check_tasks(tasks)
    tmp = None
    if data_dir is None:
        names, task_manager = {t: STOCK_NAMES[t] for t in tasks}, TaskManager()
    else:
        if work_dir is None:
            work_dir = tmp = tempfile.mkdtemp(prefix="rap_zs_")
        names = build_local_tasks(data_dir, work_dir, tasks)
        # include_defaults=False: indexing the ~hundreds of stock task folders costs ~15 s and isn't needed.
        task_manager = TaskManager(include_path=str(work_dir), include_defaults=False)
    try:
        # Load the tasks once here to learn each doc count, then hand the same Task objects to lm-eval.
        loaded = task_manager.load([names[t] for t in tasks])["tasks"]
        n_docs = {t: len(loaded[names[t]].eval_docs) for t in tasks}
        picked = {t: sample_indices(n_docs[t], limit, seed) for t in tasks}
        # lm-eval's `samples` selects exact doc indices per task (its `limit` would take the first N). Tasks
        # evaluated in full are left out: lm-eval tests `i in samples` per doc, quadratic on a full list.
        samples = {names[t]: picked[t] for t in tasks if len(picked[t]) < n_docs[t]}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[loaded[names[t]] for t in tasks], task_manager=task_manager,
            samples=samples or None, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    flat, accs, norms = {}, [], []
    for t in tasks:
        r = out["results"][names[t]]
        flat[f"acc_{t}"] = float(r["acc,none"])
        stderr = r.get("acc_stderr,none")
        flat[f"acc_stderr_{t}"] = float(stderr) if isinstance(stderr, (int, float)) else float("nan")  # "N/A" if n=1
        if "acc_norm,none" in r:
            flat[f"acc_norm_{t}"] = float(r["acc_norm,none"])
        if "perplexity,none" in r:  # LAMBADA: perplexity of the target words
            flat[f"ppl_{t}"] = float(r["perplexity,none"])
        flat[f"n_{t}"] = int(out["n-samples"][names[t]]["effective"])
        accs.append(flat[f"acc_{t}"])
        norms.append(flat.get(f"acc_norm_{t}", flat[f"acc_{t}"]))
    flat["acc_avg"] = sum(accs) / len(accs)
    flat["acc_norm_avg"] = sum(norms) / len(norms)
    flat["zs_per_doc"] = {t: per_doc_scores(out["samples"][names[t]]) for t in tasks}
    return flat


def per_doc_scores(logged: list[dict]) -> dict:
    """lm-eval's logged samples of one task -> ``{"doc_id": [...], "acc": [...], "acc_norm": [...]}`` by doc id."""
    rows = sorted(logged, key=lambda r: r["doc_id"])
    out = {"doc_id": [int(r["doc_id"]) for r in rows], "acc": [float(r["acc"]) for r in rows]}
    if rows and "acc_norm" in rows[0]:
        out["acc_norm"] = [float(r["acc_norm"]) for r in rows]
    return out
