import json
import sys

import pandas as pd
import pytest

from analysis.report import add_quiet_latency


def test_quiet_latency_joins_by_run_folder(tmp_path):
    csv = tmp_path / "latency.csv"
    pd.DataFrame({"run": ["baseline (before)", "out/b/m_rap_r0.2", "baseline (after)"],
                  "latency_decode_attention_ms": [60.0, 40.0, 70.0]}).to_csv(csv, index=False)
    runs = pd.DataFrame({"method": ["none", "rap", "rap"],
                         "path": ["out/default/m_none", "out/b/m_rap_r0.2", "out/other/m_rap_r0.2"]})
    got = add_quiet_latency(runs, csv)["quiet_latency_decode_attention_ms"].tolist()
    assert got[:2] == [65.0, 40.0]  # baseline: mean of before and after
    assert pd.isna(got[2])  # same folder name under another root: not re-timed, never borrowed


def test_report_cli_rejects_missing_latency_file(tmp_path, monkeypatch):
    from analysis import report

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"method": "none", "ppl_wikitext2": 20.0}))
    monkeypatch.setattr(sys, "argv", ["report", str(tmp_path), "--latency", str(tmp_path / "nope.csv")])
    with pytest.raises(SystemExit, match="does not exist"):
        report.main()


def test_report_flags_runs_from_different_environments(tmp_path, monkeypatch, capsys):
    from analysis import report

    for name, tf in (("a", "5.23.0"), ("b", "5.24.0"), ("c", "5.24.0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"method": "none", "ratio": 0.0, "ppl_wikitext2": 20.0, "env_transformers": tf, "env_torch": "2.13.0"}))
    monkeypatch.setattr(sys, "argv", ["report", str(tmp_path)])
    report.main()
    out, err = capsys.readouterr()
    assert "env_transformers" in err and "env_torch" not in err
    assert "5.23.0" in out and "env_torch" not in out
    monkeypatch.setattr(sys, "argv", ["report", str(tmp_path / "b"), str(tmp_path / "c"), "--env"])
    report.main()
    out, err = capsys.readouterr()
    assert err == "" and "env_torch" in out
