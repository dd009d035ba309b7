"""What every experiment driver does: run its Hydra preset as one multirun, then the analysis that draws it."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # drivers import analysis.*


def run_single(overrides: list[str]) -> None:
    """One job: ``python run.py <overrides>`` (skipped when finished)."""
    cmd = [sys.executable, "run.py", *overrides]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit("error: the job failed")


def option(overrides: list[str], key: str, default: str) -> str:
    """The value an override list gives ``key`` (``key=value``), else ``default``."""
    for o in overrides:
        if o.startswith(f"{key}="):
            return o.split("=", 1)[1]
    return default


def run_preset(name: str, overrides: list[str]) -> Path:
    """``python run.py -m +experiment=<name> <overrides>``; returns the sweep folder. Finished jobs are skipped."""
    start = time.time()
    cmd = [sys.executable, "run.py", "-m", f"+experiment={name}", *overrides]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"error: the {name} sweep failed; finished jobs are kept, rerun to resume")
    print(f"[{name}] sweep wall time {time.time() - start:.0f} s", flush=True)
    return REPO / option(overrides, "out_dir", "outputs") / option(overrides, "sweep", name)


def analyse(roots: list[Path], report: Path | None = None, figures: Path | None = None, report_args=(),
            only: tuple[str, ...] = ()) -> None:
    """The paper table (Markdown, printed and written to ``report``) and the figures (into ``figures``)."""
    roots = [str(r) for r in roots]
    if report is not None:
        cmd = [sys.executable, "-m", "analysis.report", *roots, "--out", str(report), *report_args]
        subprocess.run(cmd, cwd=REPO, check=True)
    if figures is not None:
        cmd = [sys.executable, "-m", "analysis.figures", *roots, "--out", str(figures)]
        subprocess.run(cmd + (["--only", *only] if only else []), cwd=REPO, check=True)


def preset_model_and_batches(model: str, n_fit: int, n_held_out: int, seqlen: int = 512):
    """A ``conf/model`` preset in float32, its calibration batch (seed 0) and held-out sequences of the calibration
    text (seed 1), for the per-layer error studies."""
    import yaml

    from rap.data import calibration_batch, resolve_data_dir
    from rap.models import ModelSpec, load_model

    preset = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())
    net, tok = load_model(ModelSpec(name=preset["name"], source=preset["source"], path=preset["path"],
                                    dtype="float32"))
    data = resolve_data_dir()
    fit = calibration_batch(tok, data, "wiki", n_fit, seqlen, seed=0)
    return net, fit, calibration_batch(tok, data, "wiki", n_held_out, seqlen, seed=1)


def layer_error_parser(doc: str, model: str) -> argparse.ArgumentParser:
    """The per-layer error studies' command line: the model preset, the ratios, the fit and held-out batch sizes, and
    the CSV to write."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=model, help="a preset of conf/model")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--calib", type=int, default=32, help="calibration sequences of 512 tokens (as the job's default)")
    ap.add_argument("--held-out", type=int, default=4, help="held-out sequences of 512 tokens (another seed)")
    ap.add_argument("--out", default=None, help="CSV of the per-layer errors")
    return ap


def write_rows(rows: list[dict], out: str | None) -> None:
    """The per-layer rows as a CSV at ``out``, when one is given."""
    from rap.files import write_csv

    if out:
        write_csv(out, rows)
        print(Path(out))
