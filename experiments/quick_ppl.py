"""Quick perplexity comparison (SmolLM2 unless ``--model`` names another preset of conf/model): WikiText-2
perplexity (first N windows) of compressed models.

Each cell is ``method`` or ``method:key=value,...`` with the method's options (see ``conf/method``):

    python experiments/quick_ppl.py --ratios 0.2 0.3 --cells rap:criterion=key_energy rap:criterion=rope_blind
    python experiments/quick_ppl.py --ratios 0.2 --cells rap:criterion=key_energy,v_path=lowrank palu elitekv
    python experiments/quick_ppl.py --model gemma3-270m --ratios 0.3 --cells rap:qk_norm=exact rap:qk_norm=kept palu

Prints one line per cell and writes a CSV; the full pipeline (accuracy, costs) is ``run.py -m method=...``.
With ``--ratios`` empty and ``--windows 0`` it gives the full-test-set baseline perplexity.
"""
import argparse
import copy
import time
from pathlib import Path

import yaml

from rap import compress
from rap.data import calibration_batch, resolve_data_dir, wikitext2_test_text, window_bos
from rap.files import write_csv
from rap.harness.perplexity import perplexity
from rap.models import ModelSpec, load_model


def parse_cell(spec: str) -> tuple[str, dict]:
    """``rap:criterion=qk_energy,prune_v=false`` -> ("rap", {"criterion": "qk_energy", "prune_v": False})."""
    method, _, opts = spec.partition(":")
    return method, {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in opts.split(",") if o)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a preset of conf/model (gguf_package or tiny)")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3])
    ap.add_argument("--cells", nargs="+", default=["rap:criterion=key_energy", "rap:criterion=rope_blind"])
    ap.add_argument("--windows", type=int, default=12, help="first N windows; 0 = the whole test set")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=32, help="calibration sequences of 512 tokens")
    ap.add_argument("--out", default="quick_ppl.csv")
    a = ap.parse_args()
    a.windows = a.windows or None
    data_dir = resolve_data_dir()
    preset = yaml.safe_load((Path(__file__).parents[1] / "conf" / "model" / f"{a.model}.yaml").read_text())
    model, tok = load_model(ModelSpec(name=preset["name"], source=preset["source"], path=preset["path"],
                                      dtype="float32"))
    ids = tok(wikitext2_test_text(data_dir), return_tensors="pt").input_ids[0]
    calib = calibration_batch(tok, data_dir, "wiki", a.calib, 512)
    bos = window_bos(tok)
    base = perplexity(model, ids, a.seqlen, a.windows, bos_id=bos)
    rows = [{"cell": "none", "ratio": 0.0, "ppl": base["ppl"], "time_s": 0}]
    print(f"baseline: {base['tokens']} tokens in {base['windows']} windows of {a.seqlen}", flush=True)
    print(rows[-1], flush=True)
    for ratio in a.ratios:
        for spec in a.cells:
            method, opts = parse_cell(spec)
            t = time.time()
            c = compress(copy.deepcopy(model), method, ratio, calibration=calib, **opts)
            dt = time.time() - t
            ppl = perplexity(c, ids, a.seqlen, a.windows, bos_id=bos)["ppl"]
            rows.append({"cell": spec, "ratio": ratio, "ppl": ppl, "time_s": round(dt, 1)})
            print(rows[-1], f"(+{100 * (ppl / rows[0]['ppl'] - 1):.1f}%)", flush=True)
    write_csv(a.out, rows)


if __name__ == "__main__":
    main()
