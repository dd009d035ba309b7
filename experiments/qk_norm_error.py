"""How far RAP's ``kept`` QK-norm is from the exact norm, layer by layer, on held-out text (QK-norm models only).

For each ratio, RAP's plan (key_energy) fixes the kept channels; on held-out calibration sequences each layer's
attention input is fed to three versions of its compressed attention that keep the same channels: ``exact`` (full
width projections, the original norm), ``kept`` (norm over the kept channels, the calibrated rho) and ``kept, rho=1``
(no correction). Printed: per layer kind, the mean relative error ||x - x_exact|| / ||x_exact|| of the normalised
queries and keys that RoPE rotates.

    python experiments/qk_norm_error.py --model gemma3-270m --ratios 0.2 0.3 --out docs/qk_norm_error.csv
"""

import torch
from common import layer_error_parser, preset_model_and_batches, write_rows

from rap.architecture import layer_kinds
from rap.hooks import temporary_hooks
from rap.methods.rap import RAP, PrunedAttention


def layer_errors(model, plan, batch) -> list[dict]:
    """Per layer: relative errors of the kept modes' normalised q and k against exact, over ``batch``."""
    t = plan["tensors"]
    sums = [{} for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        lp, attn = plan["layers"][i], layer.self_attn
        ones = (torch.ones_like(t[f"q_rho.{i}"]), torch.ones_like(t[f"k_rho.{i}"]))
        versions = {mode: PrunedAttention(attn, lp["k_channels"], lp["v_channels"], qk_norm=norm, qk_rho=rho)
                    for mode, norm, rho in (("exact", "exact", None),
                                            ("kept", "kept", (t[f"q_rho.{i}"], t[f"k_rho.{i}"])),
                                            ("kept_rho1", "kept", ones))}

        def hook(_m, args, kwargs, i=i, versions=versions):
            x = kwargs.get("hidden_states", args[0] if args else None)
            ref = versions["exact"].queries_keys(x)
            for mode in ("kept", "kept_rho1"):
                for name, a, b in zip("qk", versions[mode].queries_keys(x), ref):
                    s = sums[i].setdefault(f"{mode}_{name}", [0.0, 0.0])
                    s[0] += (a - b).float().pow(2).sum().item()
                    s[1] += b.float().pow(2).sum().item()
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    with temporary_hooks(handles), torch.no_grad():
        for row in batch:
            model(row[None], use_cache=False)
    return [{k: (v[0] / v[1]) ** 0.5 for k, v in s.items()} for s in sums]


def main():
    a = layer_error_parser(__doc__, model="gemma3-270m").parse_args()  # a model with QK-norm
    model, calib, held = preset_model_and_batches(a.model, a.calib, a.held_out)
    kinds = layer_kinds(model.config)
    rows = []
    for ratio in a.ratios:
        plan = RAP(ratio=ratio, qk_norm="kept").make_plan(model, calib)
        for i, err in enumerate(layer_errors(model, plan, held)):
            rows.append({"ratio": ratio, "layer": i, "kind": kinds[i], **{k: round(v, 5) for k, v in err.items()}})
        for kind in sorted(set(kinds)):
            sel = [r for r in rows if r["ratio"] == ratio and r["kind"] == kind]
            mean = {k: sum(r[k] for r in sel) / len(sel) for k in ("kept_q", "kept_k", "kept_rho1_q", "kept_rho1_k")}
            print(f"ratio {ratio} {kind} ({len(sel)} layers): relative error of normalised q / k against exact: "
                  f"kept {mean['kept_q']:.4f} / {mean['kept_k']:.4f}, "
                  f"kept without rho {mean['kept_rho1_q']:.4f} / {mean['kept_rho1_k']:.4f}", flush=True)
    write_rows(rows, a.out)


if __name__ == "__main__":
    main()
