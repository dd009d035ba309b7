"""``python -m analysis.paper`` rebuilds, from results/ and the benchmark CSVs alone, exactly the committed tables and
README blocks, and draws every figure."""
from conftest import REPO


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
    for source, names in FIGURES.items():
        if (REPO / "results" / source).is_dir():
            assert all(any(f.startswith(n.replace("kept_frequency", "method_frequency")) for f in figures)
                       for n in names)
