"""``python -m analysis.paper`` rebuilds, from results/ and the benchmark CSVs alone, exactly the committed tables,
README blocks and figures (compared pixel by pixel), and stops in one sentence when a source is missing or dirty."""
import json
import shutil

import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # rebuilds every generated doc from results/


def test_regeneration_reproduces_the_committed_docs_byte_for_byte(tmp_path):
    from analysis.paper import FIGURES, main

    main(["--out", str(tmp_path)])
    tables = sorted(p for p in (tmp_path / "docs").rglob("*") if p.suffix in (".md", ".tex"))
    assert tables, "no table was generated"
    for p in tables:
        committed = REPO / p.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is generated but not committed"
        assert p.read_bytes() == committed.read_bytes(), f"{committed} differs from its regeneration"
    assert (tmp_path / "README.md").read_bytes() == (REPO / "README.md").read_bytes()
    figures = {p.stem for p in (tmp_path / "docs" / "figures").glob("*.png") if p.stat().st_size > 0}
    assert {"latency_decode", "latency_prefill"} <= figures
    for stems in FIGURES.values():
        assert all(any(f.startswith(stem) for f in figures) for stem in stems.values())
    from matplotlib.image import imread

    for p in sorted((tmp_path / "docs" / "figures").glob("*.png")):
        committed = REPO / p.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is drawn but not committed"
        assert np.array_equal(imread(p), imread(committed)), f"{committed} differs from its redrawing"


@pytest.fixture
def results_copy(tmp_path):
    """A copy of results/ to break."""
    shutil.copytree(REPO / "results", tmp_path / "results")
    return tmp_path / "results"


def rebuild_error(results, out) -> str:
    from analysis.paper import main

    with pytest.raises(SystemExit) as err:
        main(["--results", str(results), "--out", str(out), "--no-figures"])
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_a_missing_source_stops_the_rebuild_and_names_it(results_copy, tmp_path):
    shutil.rmtree(results_copy / "main_table")
    assert f"{results_copy / 'main_table'} holds no finished run" in rebuild_error(results_copy, tmp_path / "out")


def test_a_run_from_a_dirty_tree_stops_the_rebuild_and_names_it(results_copy, tmp_path):
    metrics = next((results_copy / "main_table").glob("*/metrics.json"))
    m = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**m, "env_git_dirty": True}))
    message = rebuild_error(results_copy, tmp_path / "out")
    assert "uncommitted changes" in message and metrics.parent.name in message


def test_a_replayed_healed_plan_takes_the_heal_time_of_the_run_that_trained_it(tmp_path):
    import json

    import pandas as pd

    from analysis.paper import with_replayed_heal_times

    trainer = tmp_path / "heal_quick" / "rap_r0.2-heal_quick"
    trainer.mkdir(parents=True)
    (trainer / "metrics.json").write_text(json.dumps({"heal_time_s": 1234.5}))
    df = pd.DataFrame({"cfg.plan": [f"/elsewhere/{trainer.name}/plan.json", None, "/elsewhere/unknown/plan.json"],
                       "heal_time_s": [float("nan"), 99.0, float("nan")]})
    out = with_replayed_heal_times(df, tmp_path)
    assert out["heal_time_s"].iloc[0] == 1234.5  # from the trainer, found by folder name
    assert out["heal_time_s"].iloc[1] == 99.0  # a run that healed keeps its own
    assert pd.isna(out["heal_time_s"].iloc[2])  # no trainer under results/: left empty, never guessed
    assert pd.isna(df["heal_time_s"].iloc[0])  # the input frame is not changed
