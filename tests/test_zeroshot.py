"""Zero-shot lm-eval on the local data files: conversion, task loading, a tiny end-to-end run, errors."""
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets/transformers are imported: never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from rap.errors import DataError, RapError
from rap.harness.zeroshot import TASKS, build_local_tasks, evaluate_zero_shot, sample_indices

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RAP_DATA_DIR") or REPO.parent / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA_DIR / "README.md").is_file(),
                                reason=f"local eval data not found at {DATA_DIR}; set RAP_DATA_DIR")

# Record counts from shared/data/README.md and the HF-schema fields the stock prompts read.
EXPECTED = {
    "hellaswag": (10042, {"activity_label", "ctx_a", "ctx_b", "endings", "label"}),
    "piqa": (1838, {"goal", "sol1", "sol2", "label"}),
    "arc_easy": (2376, {"question", "choices", "answerKey"}),
    "arc_challenge": (1172, {"question", "choices", "answerKey"}),
    "winogrande": (1267, {"sentence", "option1", "option2", "answer"}),
    "openbookqa": (500, {"question_stem", "choices", "answerKey"}),
    "boolq": (3270, {"passage", "question", "label"}),
    "lambada_openai": (5153, {"text"}),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("zs_tasks")
    return work, build_local_tasks(DATA_DIR, work, TASKS)


@needs_data
def test_converted_files(built):
    work, names = built
    assert names == {t: f"{t}_local" for t in TASKS}
    for task, (count, fields) in EXPECTED.items():
        recs = [json.loads(line) for line in open(work / f"{task}.jsonl", encoding="utf-8")]
        assert len(recs) == count, task
        assert fields <= set(recs[0]), (task, set(recs[0]))
        assert "{data_file}" not in (work / f"{task}.yaml").read_text()
    assert (work / "utils.py").is_file()
    boolq = [json.loads(line) for line in open(work / "boolq.jsonl")]
    assert sum(r["label"] for r in boolq) == 2033 and {r["label"] for r in boolq} == {0, 1}
    arc = json.loads(open(work / "arc_easy.jsonl").readline())
    assert isinstance(arc["question"], str) and set(arc["choices"]) == {"text", "label"}


@needs_data
def test_yamls_load_in_lm_eval(built):
    from lm_eval.tasks import TaskManager

    work, names = built
    tm = TaskManager(include_path=str(work), include_defaults=False)
    loaded = tm.load(list(names.values()))["tasks"]
    for task, name in names.items():
        t = loaded[name]
        docs = t.eval_docs
        assert len(docs) == EXPECTED[task][0]
        for i in range(0, len(docs), max(1, len(docs) // 50)):  # ~50 docs per task, spread over the file
            doc = docs[i]
            if task == "lambada_openai":  # open vocabulary: the target is the passage's last word
                assert t.doc_to_target(doc) == " " + doc["text"].split(" ")[-1]
                continue
            choices, target = t.doc_to_choice(doc), t.doc_to_target(doc)
            if task == "winogrande":  # partial scoring: the gold index comes from doc_to_text
                target = t.doc_to_text(doc)
            assert isinstance(target, int) and 0 <= target < len(choices), (task, i, target, choices)


@needs_data
def test_sample_option_writes_subset(tmp_path):
    build_local_tasks(DATA_DIR, tmp_path, ["piqa"], sample={"piqa": [5, 1, 3]})
    recs = [json.loads(line) for line in open(tmp_path / "piqa.jsonl")]
    goals = [json.loads(line)["goal"] for line in open(DATA_DIR / "piqa" / "valid.jsonl")]
    assert [r["goal"] for r in recs] == [goals[1], goals[3], goals[5]]


@needs_data
def test_evaluate_zero_shot_tiny(tmp_path):
    from rap.models import build_tiny

    model, tok = build_tiny("tiny-llama")
    r = evaluate_zero_shot(model, tok, ["piqa", "winogrande"], DATA_DIR, limit=5, seed=0, work_dir=tmp_path / "a")
    for t in ("piqa", "winogrande"):
        assert 0.0 <= r[f"acc_{t}"] <= 1.0 and r[f"n_{t}"] == 5
        docs = r["zs_per_doc"][t]
        assert len(docs["doc_id"]) == 5 and docs["doc_id"] == sorted(docs["doc_id"])
        assert set(docs["acc"]) <= {0.0, 1.0} and sum(docs["acc"]) / 5 == pytest.approx(r[f"acc_{t}"])
        assert math.isfinite(r[f"acc_stderr_{t}"])
    assert 0.0 <= r["acc_norm_piqa"] <= 1.0 and "acc_norm_winogrande" not in r
    assert r["acc_avg"] == pytest.approx((r["acc_piqa"] + r["acc_winogrande"]) / 2)
    assert r["acc_norm_avg"] == pytest.approx((r["acc_norm_piqa"] + r["acc_winogrande"]) / 2)
    assert r["zs_per_doc"]["piqa"]["doc_id"] == sample_indices(1838, 5, 0)
    assert sum(r["zs_per_doc"]["piqa"]["acc_norm"]) / 5 == pytest.approx(r["acc_norm_piqa"])

    # Same seed -> same docs and same scores; another seed -> other docs.
    r2 = evaluate_zero_shot(model, tok, ["piqa"], DATA_DIR, limit=5, seed=0)
    assert r2["zs_per_doc"]["piqa"] == r["zs_per_doc"]["piqa"] and r2["acc_piqa"] == r["acc_piqa"]
    r3 = evaluate_zero_shot(model, tok, ["piqa"], DATA_DIR, limit=5, seed=1)
    assert r3["zs_per_doc"]["piqa"]["doc_id"] != r["zs_per_doc"]["piqa"]["doc_id"] and r3["n_piqa"] == 5


def test_sample_indices():
    assert sample_indices(10, None, 0) == list(range(10))
    assert sample_indices(3, 5, 0) == [0, 1, 2]
    s = sample_indices(1000, 20, 7)
    assert s == sorted(s) and len(set(s)) == 20 and s == sample_indices(1000, 20, 7) != sample_indices(1000, 20, 8)


def test_missing_data_names_file(tmp_path):
    with pytest.raises(DataError) as e:
        build_local_tasks(tmp_path / "nowhere", tmp_path / "work", ["piqa"])
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "piqa" / "valid.jsonl") in msg
    assert "data.dir=" in msg and "RAP_DATA_DIR" in msg


def test_unknown_task(tmp_path):
    with pytest.raises(RapError, match="valid tasks are hellaswag"):
        build_local_tasks(tmp_path, tmp_path / "work", ["piqa", "mmlu"])


def test_lambada_uses_lm_evals_own_prompt_and_reports_accuracy_and_perplexity(tmp_path):
    from pathlib import Path

    import lm_eval
    import yaml

    from rap.harness.zeroshot import TEMPLATE_DIR
    from rap.models import build_tiny

    stock = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml").read_text())
    local = yaml.safe_load((TEMPLATE_DIR / "lambada_openai.yaml").read_text())
    for key in ("output_type", "doc_to_text", "doc_to_target", "metric_list"):
        assert local[key] == stock[key], key
    model, tok = build_tiny("tiny-llama")
    r = evaluate_zero_shot(model, tok, ["lambada_openai"], DATA_DIR, limit=4, seed=0, work_dir=tmp_path)
    docs = r["zs_per_doc"]["lambada_openai"]
    assert r["n_lambada_openai"] == 4 and set(docs["acc"]) <= {0.0, 1.0}
    assert sum(docs["acc"]) / 4 == pytest.approx(r["acc_lambada_openai"])
    assert math.isfinite(r["ppl_lambada_openai"]) and r["ppl_lambada_openai"] > 1.0
