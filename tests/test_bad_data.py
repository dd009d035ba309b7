"""A bad data file fails the job with one sentence naming it, before any model is loaded, and leaves no result."""
import pytest
from conftest import compose

from rap.errors import DataError
from rap.harness import job as job_module
from rap.harness.job import run_job


def data_with(tmp_path, data_dir, rel: str, content: bytes):
    """A data dir that is ``data_dir`` (linked) except ``rel``, which holds ``content``."""
    root = tmp_path / "data"
    root.mkdir()
    folder, name = rel.split("/")
    for entry in data_dir.iterdir():
        if entry.name != folder:
            (root / entry.name).symlink_to(entry)
    (root / folder).mkdir()
    for f in (data_dir / folder).iterdir():
        if f.name != name:
            (root / folder / f.name).symlink_to(f)
    (root / rel).write_bytes(content)
    return root, root / rel


def head(path, n_bytes):
    return path.read_bytes()[:n_bytes]


CASES = {
    "truncated task JSONL": ("piqa/valid.jsonl", lambda d: head(d / "piqa/valid.jsonl", 5000),
                             r"line \d+ is not valid JSON"),
    "label file of the wrong length": ("piqa/valid-labels.lst", lambda d: b"0\n1\n1\n",
                                       r"has 3 labels but .*valid.jsonl has \d+ records"),
    "records without the task's fields": ("arc_easy/ARC-Easy-Test.jsonl", lambda d: b'{"id": "x"}\n' * 3,
                                          r"without the expected field 'question'"),
    "empty calibration text": ("calibration/wiki.utf8", lambda d: b"",
                               r"holds no document of more than 200 characters"),
    "WikiText shorter than one window": ("wikitext-2-raw/wiki.test.raw", lambda d: b" = A = \n",
                                         r"holds 8 bytes, fewer than one perplexity window of 64 tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_file_fails_before_loading(tmp_path, data_dir, monkeypatch, case):
    rel, content, pattern = CASES[case]
    root, bad = data_with(tmp_path, data_dir, rel, content(data_dir))
    monkeypatch.setattr(job_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = compose("model=tiny-llama", "eval=smoke", "tracking=none", f"out_dir={tmp_path}", f"data.dir={root}",
                  "ratio=0.25", "calibration.n_samples=2", "calibration.seqlen=32",
                  f"eval.zeroshot.tasks=[{rel.split('/')[0] if rel.startswith('arc') else 'piqa'}]")
    with pytest.raises(DataError, match=pattern) as err:
        run_job(cfg, tmp_path / "job")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "job" / "metrics.json").exists()
