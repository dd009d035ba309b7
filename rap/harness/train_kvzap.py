"""Fit a KVzap surrogate for a model, uncompressed or compressed, on the calibration text, and save it:

    python -m rap.harness.train_kvzap model=smollm2-135m --out surrogates/smollm2-135m.safetensors
    python -m rap.harness.train_kvzap model=smollm2-135m method=rap ratio=0.3 --out surrogates/smollm2_rap.safetensors

Positional arguments are the job's Hydra overrides (model, method, ratio, criterion, calibration.source, data.dir):
the model is loaded and compressed as a job would, then ``--texts`` windows of ``--seqlen`` tokens of the calibration
text give the KVzip+ targets (``rap.presses.kvzap``), the last ``--held-out`` of them scoring each layer's R². The file
records the model and the plan it was fitted for, and the R² per layer, which the command prints.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the job config, e.g. model=smollm2-135m")
    ap.add_argument("--texts", type=int, default=8, help="calibration windows (the last --held-out score the fit)")
    ap.add_argument("--seqlen", type=int, default=1000, help="tokens per window (KVzap: 750-1250)")
    ap.add_argument("--held-out", type=int, default=2)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a surrogate fitted elsewhere (e.g. on the uncompressed model): its R² on this "
                                      "model's held-out targets is recorded beside the new fit's")
    a = ap.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from ..data import calibration_batches
    from ..errors import RapError
    from ..models import load_model
    from ..plans import apply_plan
    from ..presses.kvzap import INSTRUCTION, fit_surrogate
    from ..presses.surrogates import load_surrogate, save_surrogate
    from . import resolvers  # noqa: F401  (the configs' resolvers)
    from .environment import git_state
    from .settings import read_settings

    state = git_state()  # read before the work: a published surrogate comes from a clean commit
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            s = read_settings(compose(config_name="config", overrides=["tracking=none", *a.overrides]))
        model, tok = load_model(s.model)
        plan = None
        if s.method is not None:
            calib = calibration_batches(tok, s.data_dir, s.calibration_source, s.calibration, seed=s.seed)
            plan = s.method.make_plan(model, calib if s.method.needs_calibration(model.config) else None)
            apply_plan(model, plan)
        texts = calibration_batches(tok, s.data_dir, s.calibration_source, {"kvzap": (a.texts, a.seqlen)},
                                    seed=s.seed + 1)["kvzap"]
        instruction = tok(INSTRUCTION, add_special_tokens=False, return_tensors="pt").input_ids
        other = load_surrogate(a.compare) if a.compare else None
        fitted = fit_surrogate(model, [t[None].to(model.device) for t in texts], instruction, a.ridge, a.held_out,
                               other)
    except RapError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    fitted_for = {"model": s.model.name, "plan": None if plan is None else {"method": plan["method"],
                                                                          "ratio": plan["ratio"]},
                  "source": s.calibration_source, "texts": a.texts, "seqlen": a.seqlen, "held_out": a.held_out,
                  "ridge": a.ridge, "compare": Path(a.compare).name if a.compare else None, **state}
    path = save_surrogate(fitted, a.out, fitted_for)
    print(f"[kvzap] wrote {path}; held-out R² per layer: " + " ".join(f"{r:.3f}" for r in fitted["r2"]))
    if other is not None:
        print(f"[kvzap] {a.compare} on the same targets: " + " ".join(f"{r:.3f}" for r in fitted["r2_other"]))


if __name__ == "__main__":
    main()
