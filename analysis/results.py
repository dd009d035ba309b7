"""Copy finished runs into ``results/<sweep>/``: the files a table or figure is rebuilt from, and nothing else
(``analysis.paper`` reads them; git keeps them).

    python -m analysis.results outputs/gemma3_270m          # -> results/gemma3_270m/<run>/

Per run: ``config.yaml``, ``metrics.json``, ``per_sample.json`` and ``plan.json`` (left out over 1 MB); W&B folders,
logs and tensors stay behind. Unfinished runs (no ``metrics.json``) are skipped and named.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rap.harness.results import RunFolder

REPO = Path(__file__).resolve().parents[1]
MAX_PLAN_BYTES = 1 << 20


def export(sweep: Path, results: Path) -> list[Path]:
    """Copy each finished run of ``sweep`` to ``results/<sweep name>/<run>``; returns the run folders written."""
    written = []
    for run in (RunFolder(p) for p in sorted(sweep.iterdir()) if p.is_dir()):
        if not run.finished:
            print(f"[results] skipping {run.path}: not finished")
            continue
        target = results / sweep.name / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in RunFolder.FILES:
            src = run.path / name
            if src.exists() and not (src == run.plan_path and src.stat().st_size > MAX_PLAN_BYTES):
                shutil.copyfile(src, target / name)
        written.append(target)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep folders (outputs/<sweep>)")
    ap.add_argument("--results", default=str(REPO / "results"))
    a = ap.parse_args(argv)
    for sweep in a.sweeps:
        if not Path(sweep).is_dir():
            raise SystemExit(f"error: {sweep} is not a folder")
        print(f"[results] {len(export(Path(sweep), Path(a.results)))} runs of {sweep} in {a.results}")


if __name__ == "__main__":
    main()
