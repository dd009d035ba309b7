"""The latency benchmark on a tiny layer shape: structure and ordering of its rows only (no timing thresholds)."""
import csv

import pytest

from rap.files import write_csv
from rap.harness import bench


def test_layer_grid_rows_structure_and_ordering(tmp_path):
    rows = bench.layer_rows("tiny", ["prefill", "decode"], [16], [32], [1, 2], ["dynamic", "static"],
                            ["rap", "palu", "elitekv"], [0.25, 0.5], [1], rounds=2, warmup=1,
                            prefill_caches=["dynamic", "static"])
    # stock, rap-full and 3 methods x 2 ratios; cells: prefill x 2 caches + decode x 2 batches x 2 caches
    assert len(rows) == 8 * 6
    assert len({(r["variant"], r["mode"], r["batch"], r["cache"]) for r in rows}) == 8 * 6
    # Every variant fits both caches (EliteKV packs its cache into single-head tensors).
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 8 * 6
    for r in ok:
        assert r["ratio_to_full_q1"] <= r["ratio_to_full"] <= r["ratio_to_full_q3"] and r["median_ms"] > 0
        if r["variant"] == "rap-full":
            assert r["ratio_to_full"] == 1.0 and r["ideal_ratio"] == 1.0
        if r["variant"] == "stock":
            assert r["ratio_to_stock"] == 1.0 and r["ideal_ratio"] == 1.0
    ideal = {(r["method"], r["ratio"]): r["ideal_ratio"] for r in ok
             if r["mode"] == "decode" and r["cache"] == "dynamic"}
    # Equal KV budgets at each ratio (head_dim 16: 6 pairs + 12 V channels, then 4 pairs + 8 V channels).
    assert ideal[("rap", 0.25)] == ideal[("palu", 0.25)] == ideal[("elitekv", 0.25)] == 0.75
    assert ideal[("rap", 0.5)] == ideal[("palu", 0.5)] == 0.5
    rap = next(r for r in ok if r["variant"] == "rap-r0.25")
    assert (rap["k_width"], rap["v_width"], rap["aligned8"]) == (12, 12, False)
    assert any(r["kernel"] == "matmul" for r in ok if r["variant"] == "rap-r0.25" and r["mode"] == "decode")
    room = {r["variant"]: r for r in bench.headroom(rows)}
    assert room["rap-r0.5"]["tokens_24GiB"] > room["rap-r0.25"]["tokens_24GiB"] > room["rap-full"]["tokens_24GiB"]
    assert room["rap-full"]["kv_bytes_per_token"] == 2 * 2 * 16 * 4 * 2  # K and V x 2 KV heads x 16 x fp32 x 2 layers
    write_csv(tmp_path / "b.csv", rows)
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_bench_cli_rejects_bad_grid(capsys):
    import pytest

    with pytest.raises(SystemExit, match="must be positive"):
        bench.main(["layer", "--shapes", "tiny", "--contexts", "0"])
    with pytest.raises(SystemExit, match="unknown shape"):
        bench.main(["layer", "--shapes", "gpt5", "--modes", "decode", "--contexts", "8", "--batches", "1", "--rounds",
                    "1", "--out", "/nonexistent/x.csv"])


def test_bench_csv_feeds_the_latency_figures(tmp_path):
    from analysis import figures

    rows = bench.layer_rows("tiny", ["prefill", "decode"], [8, 16], [16, 32], [1], ["dynamic"], ["rap", "palu"], [0.3],
                            [1], rounds=1, warmup=0)
    write_csv(tmp_path / "b.csv", rows)
    figures.main(["--latency", str(tmp_path / "b.csv"), "--out", str(tmp_path / "fig")])
    assert {p.name for p in (tmp_path / "fig").glob("*.png")} == {"latency_decode.png", "latency_prefill.png"}
    from analysis.bench_table import bench_table

    table = bench_table(tmp_path / "b.csv", ratio=0.3)
    assert len(table) == 4 and {"rap", "palu", "ideal rap", "rap-full / stock"} <= set(table.columns)  # one row a cell
    rap = next(r for r in rows if r["variant"] == "rap-r0.3" and r["mode"] == "decode" and r["length"] == 32)
    cell = table[(table["mode"] == "decode") & (table["length"] == 32)]["rap"].iloc[0]
    assert cell.startswith(f"{rap['ratio_to_full']:.3f} [") and cell.endswith(f" / {rap['ratio_to_stock']:.3f}")

    from analysis.bench_table import Quote, quoted_table

    decode = [r for r in rows if r["variant"] == "rap-r0.3" and r["mode"] == "decode"]
    quotes = (Quote("one", "rap-r0.3", {"mode": "decode", "length": 32}),
              Quote("both", "rap-r0.3", {"mode": "decode", "length": (16, 32)}))
    one, both = quoted_table(tmp_path / "b.csv", quotes).to_dict("records")
    assert one["cells"] == "1" and one["/ rap-full"] == cell.split(" / ")[0]  # one cell: median [IQR]
    lo, hi = sorted(r["ratio_to_full"] for r in decode)
    assert both["cells"] == "2" and both["/ rap-full"] == f"{lo:.3f}-{hi:.3f}"  # several: the range of medians
    with pytest.raises(SystemExit, match="no cell .* matches the quote 'none'"):
        quoted_table(tmp_path / "b.csv", (Quote("none", "rap-r0.3", {"length": 999}),))


def test_a_target_is_met_only_when_the_interquartile_range_lies_below_it():
    from analysis.bench_table import verdict

    assert verdict(0.60, 0.70, 0.72) == "met"
    assert verdict(0.47, 0.75, 0.72).startswith("unresolved")  # a median below the target is not enough
    assert verdict(0.74, 0.79, 0.72) == "missed"


def test_bench_cli_resumes_finished_cells_and_refuses_other_settings(tmp_path, capsys):
    import pytest

    out = tmp_path / "b.csv"
    args = ["layer", "--shapes", "tiny", "--modes", "decode", "--contexts", "8", "16", "--batches", "1",
            "--caches", "dynamic", "--methods", "rap", "--ratios", "0.5", "--round-to", "1", "--rounds", "1",
            "--warmup", "0", "--decode-steps", "1", "--threads", "1", "--out", str(out)]
    bench.main(args[:7] + args[8:])  # context 8 only, as if the run had stopped there
    first = out.read_text()
    assert len(bench.read_rows(out)) == 3  # stock, rap-full, rap-r0.5
    bench.main(args)
    assert "resuming" in capsys.readouterr().out
    rows = bench.read_rows(out)
    assert out.read_text().startswith(first)  # the finished cell's rows are kept as they were, not re-measured
    assert [r["length"] for r in rows] == ["8"] * 3 + ["16"] * 3
    assert (tmp_path / "b_headroom.csv").exists()
    other = args.copy()
    other[other.index("--rounds") + 1] = "3"
    with pytest.raises(SystemExit, match=r"other settings \(rounds\)"):
        bench.main(other)
