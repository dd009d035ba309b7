"""Latency and memory benchmark at real layer shapes, as ratios measured within one run.

One attention layer with random weights of a real model's shapes (SmolLM2-135M, Llama-3-8B, Mistral-7B,
Qwen2.5-7B, Gemma 3 270M's global and local layers), compressed through the public API (``rap.compress``), so the
code timed is the code evaluated.
Variants, all timed in the same process in interleaved rounds (A B C ... A B C ...) after a warm-up:

- ``stock``: the model's own transformers attention;
- ``rap-full``: rap's attention path at full width (RAP at ratio 0), the reference of every ratio;
- RAP, Palu-style and EliteKV-style at each ratio and ``round_to`` (EliteKV has no rounding option).

Decode steps run against a cache filled with ``context`` random tokens of the variant's own cached tensors
(the timing does not depend on their values), append one token and crop back, so every step sees exactly
``context`` cached tokens; ``dynamic`` is transformers' DynamicCache, ``static`` a preallocated StaticCache.
Prefill runs ``seqlen`` tokens into a fresh cache. Per variant a row gives the median over rounds of its
per-round ratio to ``rap-full`` (and to ``stock``) with the interquartile range, plus what decides the
ratio: the kept widths and their alignment, the SDPA kernel, the measured KV bytes and the ideal ratio.

    python -m rap.harness.bench layer --shapes llama3-8b --modes decode --contexts 4096 8192 --batches 1 4 \
        --out bench.csv
    python -m rap.harness.bench model --contexts 512 2048 8192 --out model.csv          # SmolLM2 decode tokens/s
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
from pathlib import Path

import torch

from ..files import write_csv
from ..methods import METHODS
from .timing import build_variants, decode_op, prefill_op, quartiles, time_cell, use, widths

# name: (tiny architecture to build from, its config at the real shape, layers of the real model)
SHAPES = {
    "tiny": ("tiny-llama", {}, 2),
    "smollm2-135m": ("tiny-llama", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                        rope_theta=1e5), 30),
    "llama3-8b": ("tiny-llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     rope_theta=5e5), 32),
    "mistral-7b": ("tiny-mistral", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                        rope_theta=1e6), 32),
    "qwen2.5-7b": ("tiny-qwen2", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                                      rope_theta=1e6), 28),
    "llama3-70b": ("tiny-llama", dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                      rope_theta=5e5), 80),
    # Gemma 3 270M: a global layer (3 of its 18) and a local one (512-token window, 15 of 18); QK-norm, so EliteKV is
    # left out of its variants.
    "gemma3-270m": ("tiny-gemma3", dict(hidden_size=640, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                        query_pre_attn_scalar=256, sliding_window=512,
                                        layer_types=["full_attention"]), 18),
    "gemma3-270m-local": ("tiny-gemma3", dict(hidden_size=640, num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=256,
                                              query_pre_attn_scalar=256, sliding_window=512,
                                              layer_types=["sliding_attention"]), 18),
}
BUDGETS = {"24GiB": 24 * 2**30, "80GB": 80 * 10**9}


def one_layer_model(shape: str, dtype=torch.float32, device="cpu"):
    """A one-layer model of ``shape`` with random weights (tiny MLP and vocabulary: only the attention is timed)."""
    from transformers import AutoModelForCausalLM

    from ..models import tiny_config

    if shape not in SHAPES:
        raise SystemExit(f"error: unknown shape '{shape}'; choose one of {', '.join(SHAPES)}")
    arch, overrides, _ = SHAPES[shape]
    cfg = tiny_config(arch, **{**overrides, "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 259,
                               "max_position_embeddings": 1 << 16})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(device).eval()


CELL = ("shape", "mode", "length", "batch", "cache")  # one timed cell: every variant in interleaved rounds
SETTINGS = ("dtype", "device", "threads", "rounds", "warmup", "decode_steps")  # what a resumed grid must share


def grid_cells(modes, lengths, contexts, batches, caches, prefill_caches) -> list[tuple]:
    cells = [("prefill", n, 1, c) for n in lengths for c in prefill_caches if "prefill" in modes]
    return cells + [("decode", n, b, c) for n in contexts for b in batches for c in caches if "decode" in modes]


def cell_key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in CELL)


def layer_rows(shape: str, modes, lengths, contexts, batches, caches, methods, ratios, round_tos, rounds: int,
               warmup: int, device="cpu", dtype=torch.float32, log=print, decode_steps: int = 4,
               prefill_caches=("dynamic",), done=frozenset(), emit=None) -> list[dict]:
    """The grid for one layer shape: one row per variant x mode x length x batch x cache kind. Cells whose
    ``cell_key`` is in ``done`` are skipped; ``emit`` receives each finished cell's rows."""
    cells = [c for c in grid_cells(modes, lengths, contexts, batches, caches, prefill_caches)
             if cell_key(dict(zip(CELL, (shape, *c)))) not in done]
    if not cells:
        return []
    model = one_layer_model(shape, dtype, device)
    variants = build_variants(model, methods, ratios, round_tos)
    dims = {}
    for v in variants:
        use(model, v)
        dims[v.name] = widths(model)
    use(model, variants[0])
    common = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": str(model.device),
              "device_name": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "rounds": rounds, "warmup": warmup, "decode_steps": decode_steps}
    rows = []
    for mode, n, b, kind in cells:
        start = len(rows)
        make = (lambda: decode_op(model, b, n, kind)) if mode == "decode" else (lambda: prefill_op(model, b, n, kind))
        usable, ops = [], {}
        for v in variants:  # a variant whose cache the kind cannot hold is reported, not dropped
            use(model, v)
            try:
                with torch.no_grad():
                    ops[v.name] = make()
                usable.append(v)
            except Exception as e:  # noqa: BLE001
                rows.append({**common, "mode": mode, "length": n, "batch": b, "cache": kind, "variant": v.name,
                             "method": v.method, "ratio": v.ratio, "round_to": v.round_to,
                             "status": f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        use(model, variants[0])
        inner = 1 if mode == "prefill" else decode_steps
        res = time_cell(model, usable, ops, rounds, warmup, inner)
        del ops
        full, stock = res["rap-full"], res.get("stock")
        for v in usable:
            r = res[v.name]
            to_full = [a / f for a, f in zip(r["times"], full["times"])]
            to_stock = [a / s for a, s in zip(r["times"], stock["times"])] if stock else [float("nan")]
            q1, med, q3 = quartiles(to_full)
            k_w, v_w = dims[v.name]
            rows.append({**common, "mode": mode, "length": n, "batch": b, "cache": kind, "variant": v.name,
                         "method": v.method, "ratio": v.ratio, "round_to": v.round_to, "status": "ok",
                         "median_ms": statistics.median(r["times"]), "ratio_to_full": med, "ratio_to_full_q1": q1,
                         "ratio_to_full_q3": q3, "ratio_to_stock": statistics.median(to_stock),
                         "ideal_ratio": r["kv_bytes_per_token_layer"] / full["kv_bytes_per_token_layer"],
                         "kv_bytes_per_token_layer": r["kv_bytes_per_token_layer"], "k_width": k_w, "v_width": v_w,
                         "aligned8": k_w % 8 == 0 and v_w % 8 == 0, "kernel": r["kernel"], "memory_mb": r["memory_mb"]})
        log(f"[bench] {shape} {mode} {n} b{b} {kind}: " + ", ".join(
            f"{x['variant']} {x['ratio_to_full']:.3f}" for x in rows if x.get("status") == "ok" and x["mode"] == mode
            and x["length"] == n and x["batch"] == b and x["cache"] == kind))
        if emit is not None:
            emit(rows[start:])
    return rows


def model_rows(contexts, batches, methods, ratios, rounds: int, warmup: int, device="cpu", log=print) -> list[dict]:
    """SmolLM2-135M (the embedded model, all 30 layers) decode tokens per second at each context, per variant."""
    from ..models import SMOLLM2, load_model

    model, _ = load_model(dataclasses.replace(SMOLLM2, device=device))
    variants = build_variants(model, methods, ratios, [1])
    common = {"shape": "smollm2-135m (whole model)", "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "device": str(model.device), "threads": torch.get_num_threads(), "rounds": rounds, "warmup": warmup}
    rows = []
    for n in contexts:
        for b in batches:
            ops = {}
            for v in variants:
                use(model, v)
                with torch.no_grad():
                    ops[v.name] = decode_op(model, b, n, "dynamic")
            use(model, variants[0])
            res = time_cell(model, variants, ops, rounds, warmup, inner=2, scope="model")
            del ops
            for v in variants:
                r, full = res[v.name], res["rap-full"]
                q1, med, q3 = quartiles([a / f for a, f in zip(r["times"], full["times"])])
                step = statistics.median(r["times"])
                rows.append({**common, "mode": "decode", "length": n, "batch": b, "cache": "dynamic", "variant": v.name,
                             "method": v.method, "ratio": v.ratio, "status": "ok", "median_ms": step,
                             "tokens_per_s": b * 1000 / step, "ratio_to_full": med, "ratio_to_full_q1": q1,
                             "ratio_to_full_q3": q3,
                             "ideal_ratio": r["kv_bytes_per_token_layer"] / full["kv_bytes_per_token_layer"],
                             "kv_bytes_per_token_layer": r["kv_bytes_per_token_layer"]})
            log(f"[bench] whole model decode {n} b{b}: " + ", ".join(
                f"{x['variant']} {x['tokens_per_s']:.1f} tok/s" for x in rows if x["length"] == n and x["batch"] == b))
    return rows


def headroom(rows: list[dict]) -> list[dict]:
    """Tokens of KV cache that fit in each memory budget (the cache alone, weights excluded), per shape and
    variant, from the measured KV bytes per token of one layer times the real model's layer count."""
    out, seen = [], set()
    for r in rows:
        key = (r["shape"], r["variant"])
        if r.get("status") != "ok" or key in seen:
            continue
        seen.add(key)
        per_token = float(r["kv_bytes_per_token_layer"]) * SHAPES[r["shape"]][2]
        out.append({"shape": r["shape"], "variant": r["variant"], "method": r["method"], "ratio": r["ratio"],
                    "dtype": r["dtype"], "kv_bytes_per_token": per_token,
                    **{f"tokens_{name}": int(budget // per_token) for name, budget in BUDGETS.items()}})
    return out


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier (possibly interrupted) run, as written (strings), or none."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", choices=["layer", "model"],
                    help="layer: one attention layer at real shapes; model: SmolLM2 decode tokens/s (whole model)")
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3-8b", "mistral-7b", "qwen2.5-7b"])
    ap.add_argument("--modes", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096], help="prefill tokens")
    ap.add_argument("--contexts", nargs="+", type=int,
                    default=[512, 1024, 2048, 4096, 8192] + ([16384, 32768] if cuda else []), help="decode contexts")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--caches", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"],
                    help="decode cache kinds")
    ap.add_argument("--prefill-caches", nargs="+", default=["dynamic"], choices=["dynamic", "static"],
                    help="prefill cache kinds (prefill writes its cache once)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    ap.add_argument("--round-to", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=4, help="decode steps per variant per round (their mean is "
                                                                "timed)")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="outputs/bench/layer.csv",
                    help="CSV, written after every cell; an existing one is resumed (its finished cells are skipped)")
    ap.add_argument("--wandb", metavar="PROJECT", help="also log the rows as a W&B table (offline unless WANDB_MODE)")
    a = ap.parse_args(argv)
    if a.rounds < 1 or any(x < 1 for x in a.lengths + a.contexts + a.batches):
        raise SystemExit("error: rounds, lengths, contexts and batches must be positive")
    return a


def resumed_rows(out: Path, settings: dict) -> list[dict]:
    """The rows of an earlier run into ``out``, if it was measured with the same ``settings``."""
    rows = read_rows(out)
    same = lambda k, x: str(x).split(":")[0] == str(settings[k]).split(":")[0]  # noqa: E731  (cuda:0 is cuda)
    clash = sorted({k for r in rows for k in SETTINGS if not same(k, r.get(k))})
    if clash:
        raise SystemExit(f"error: {out} holds a grid measured with other settings ({', '.join(clash)}); "
                         f"pass another --out or remove it")
    return rows


def log_to_wandb(out: Path, project: str, rows: list[dict], room: list[dict]) -> None:
    import wandb

    from .tracking import init_wandb_run

    run = init_wandb_run(out.parent, project=project, group="bench", name=out.stem, job_type="bench")
    run.log({"bench": wandb.Table(data=[[r.get(k) for k in rows[0]] for r in rows], columns=list(rows[0])),
             "headroom": wandb.Table(data=[list(r.values()) for r in room], columns=list(room[0]))})
    run.finish()


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    out = Path(a.out)
    if a.grid == "model":
        rows = model_rows(a.contexts, a.batches, a.methods, a.ratios, a.rounds, a.warmup, a.device)
        write_csv(out, rows)
        print(f"[bench] wrote {out} ({len(rows)} rows)")
        return
    rows = resumed_rows(out, {"dtype": a.dtype, "device": a.device, "threads": torch.get_num_threads(),
                              "rounds": a.rounds, "warmup": a.warmup, "decode_steps": a.decode_steps})
    done = {cell_key(r) for r in rows}
    if done:
        print(f"[bench] resuming {out}: {len(done)} cells already measured are skipped")

    def emit(cell_rows):
        rows.extend(cell_rows)
        write_csv(out, rows)  # after every cell: a stopped run keeps what it finished

    for shape in a.shapes:
        layer_rows(shape, a.modes, a.lengths, a.contexts, a.batches, a.caches, a.methods, a.ratios, a.round_to,
                   a.rounds, a.warmup, a.device, getattr(torch, a.dtype), decode_steps=a.decode_steps,
                   prefill_caches=a.prefill_caches, done=done, emit=emit)
    room = headroom(rows)
    write_csv(out.with_name(out.stem + "_headroom.csv"), room)
    print(f"[bench] wrote {out} ({len(rows)} rows) and {out.stem}_headroom.csv")
    if a.wandb:
        log_to_wandb(out, a.wandb, rows, room)


if __name__ == "__main__":
    main()
