"""Scale benchmark: compression of real-shaped layers (Llama-3-8B, Llama-3-70B, Qwen2.5-7B) with 1 and 2 layers,
each stage's wall time and peak working memory measured (``rap.memory``: tensors allocated by the stage, the model's
weights excluded), then extrapolated to the real layer count. Random weights and random token ids: what is
measured is cost, which does not depend on the values.

    python experiments/scale.py                                   # llama3-8b, every method, 1 and 2 layers
    python experiments/scale.py --shapes llama3-8b llama3-70b --runs rap:key_energy palu
    python experiments/scale.py --threads                         # eigh/SVD with 1 thread against torch's default

Writes ``<out>/scale.csv`` (one row per shape x run x layers x stage) and ``<out>/scale.md`` (the extrapolation,
``analysis.bench_table.scale_table``: per stage, seconds per layer and the peak at 1 and 2 layers, then the estimate
at the real layer count); ``--threads`` writes ``<out>/threads.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.bench_table import scale_extrapolated, scale_table  # noqa: E402
from rap.calibration import GradientSettings  # noqa: E402
from rap.files import write_csv  # noqa: E402
from rap.harness.bench import SHAPES  # noqa: E402
from rap.memory import recording, stage  # noqa: E402
from rap.methods import lowrank, make_method  # noqa: E402
from rap.models import tiny_config  # noqa: E402
from rap.modules import swapped_attention  # noqa: E402
from rap.plans import validate_plan  # noqa: E402

INTERMEDIATE = {"llama3-8b": 14336, "mistral-7b": 14336, "qwen2.5-7b": 18944, "llama3-70b": 28672,
                "smollm2-135m": 1536, "tiny": 128}
# method:criterion -> options. Each method's published recipe (RAP's criteria; Palu whitened, Fisher ranks, g=4;
# EliteKV greedy elite pairs with its r searched over 3 candidates on held-out sequences).
RUNS = {"rap:key_energy": ("rap", {"criterion": "key_energy"}), "rap:fisher": ("rap", {"criterion": "fisher"}),
        "rap:attn_error": ("rap", {"criterion": "attn_error"}), "palu": ("palu", {}), "elitekv": ("elitekv", {}),
        "rap:fisher+checkpointing": ("rap", {"criterion": "fisher"})}


def scaled_model(shape: str, layers: int, vocab: int):
    """A ``layers``-layer model with ``shape``'s attention and MLP sizes and random weights (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    arch, overrides, _ = SHAPES[shape]
    cfg = tiny_config(arch, **{**overrides, "num_hidden_layers": layers, "intermediate_size": INTERMEDIATE[shape],
                               "vocab_size": vocab, "max_position_embeddings": 1 << 16})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()


def measure(model, run: str, ratio: float, calibration: torch.Tensor) -> list[dict]:
    """Make the plan and build the compressed modules under ``recording``; the model's own modules are put back."""
    name, options = RUNS[run]
    gradients = GradientSettings(checkpointing=run.endswith("+checkpointing"))
    method = make_method(name, ratio, shared={"gradients": gradients}, **options)
    t0 = time.perf_counter()
    with recording() as stages:
        with stage("total"):
            plan = method.make_plan(model, calibration)
            with swapped_attention(model), stage("apply plan"):
                validate_plan(model.config, plan).apply(model, plan)
    del plan
    rows = [dict(r) for r in stages.rows.values()]
    print(f"  {run}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def thread_rows(shape: str, rounds: int) -> list[dict]:
    """One whitened factorisation of a K block of ``shape`` (4 KV heads, as Palu g=4) with eigh/SVD on 1 thread
    against torch's default thread count, interleaved."""
    _, o, _ = SHAPES[shape]
    h, rows = o["hidden_size"], 4 * o["head_dim"]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, h, generator=g)
    x = torch.randn(2 * h, h, generator=g, dtype=torch.float64)
    gram = x.T @ x
    out, default = [], torch.get_num_threads()
    for r in range(rounds):
        for threads in (1, None):
            t0 = time.perf_counter()
            lowrank.factorize(w, rows * 3 // 4, gram, threads=threads)
            out.append({"shape": shape, "round": r, "linalg_threads": threads or default,
                        "seconds": time.perf_counter() - t0})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=sorted(SHAPES))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000, help="the head's cost is per model, not per layer")
    ap.add_argument("--threads", action="store_true", help="time eigh/SVD threads instead")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "scale")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.threads:
        rows = [r for s in a.shapes for r in thread_rows(s, rounds=3)]
        write_csv(a.out / "threads.csv", rows)
        for s in a.shapes:
            for t in sorted({r["linalg_threads"] for r in rows}):
                secs = sorted(r["seconds"] for r in rows if r["shape"] == s and r["linalg_threads"] == t)
                print(f"{s}: eigh/SVD on {t} thread(s): median {secs[len(secs) // 2]:.2f} s over {len(secs)} rounds")
        return
    calibration = torch.randint(0, a.vocab, (a.samples, a.seqlen), generator=torch.Generator().manual_seed(0))
    rows = []
    for shape in a.shapes:
        for layers in a.layers:
            model = scaled_model(shape, layers, a.vocab)
            print(f"{shape}, {layers} layer(s), {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters",
                  flush=True)
            for run in a.runs:
                for r in measure(model, run, a.ratio, calibration):
                    rows.append({"shape": shape, "layers_real": SHAPES[shape][2], "run": run, "layers": layers,
                                 "ratio": a.ratio,
                                 "calibration_tokens": a.samples * a.seqlen, "threads": torch.get_num_threads(), **r})
                write_csv(a.out / "scale.csv", rows)  # after every run: a long grid keeps what it has
            del model
    import pandas as pd

    write_csv(a.out / "scale_extrapolated.csv", scale_extrapolated(pd.DataFrame(rows)).to_dict("records"))
    text = scale_table(a.out / "scale.csv").to_markdown(index=False, disable_numparse=True)
    (a.out / "scale.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
