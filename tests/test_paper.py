"""``python -m analysis.paper`` rebuilds, from results/ and the benchmark CSVs alone, exactly the committed tables and
README blocks, and draws every figure."""
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
    for source, stems in FIGURES.items():
        if (REPO / "results" / source).is_dir():
            assert all(any(f.startswith(stem) for f in figures) for stem in stems.values())


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
