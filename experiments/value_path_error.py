"""How well RAP's value paths keep each layer's values, on held-out text.

For each ratio, RAP's plans (key_energy) with ``v_path=channels`` (V channel pruning, the paper's RAP), a whitened
low-rank V latent per KV head (``v_path=lowrank``, the same cache budget) and a joint latent over ``--group``
KV heads are made on calibration sequences. On held-out sequences (another seed) each layer's attention input x is
projected to its values V = x W_vᵀ, and each path's stand-in for V is compared with it: V with the dropped channels
zeroed, or the latent's reconstruction. Written: per ratio, layer and path, the relative error ||V̂ - V|| / ||V||
over all heads and tokens.

    python experiments/value_path_error.py --out docs/value_path_error.csv
"""

import torch
from common import layer_error_parser, preset_model_and_batches, write_rows

from rap.hooks import temporary_hooks
from rap.methods.rap import RAP


def stand_in(plan: dict, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Layer ``i``'s values as ``plan`` keeps them: the kept channels (the rest zero) or the latent's rebuild."""
    lp, d = plan["layers"][i], plan["head_dim"]
    if lp.get("v_rank"):
        down, up = plan["tensors"][f"v_down.{i}"], plan["tensors"][f"v_up.{i}"]
        latent = (x @ down.T).unflatten(-1, (up.shape[0], -1))  # (..., G, r)
        return torch.einsum("...gr,gcr->...gc", latent, up).flatten(-2)
    keep = torch.zeros_like(v)
    for h, channels in enumerate(lp["v_channels"]):
        idx = [h * d + c for c in channels]
        keep[..., idx] = v[..., idx]
    return keep


def layer_errors(model, plans: dict, batch: torch.Tensor) -> list[dict]:
    """Per layer and plan: the relative error of its values against the full V over ``batch``."""
    sums = [{name: [0.0, 0.0] for name in plans} for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(_m, args, kwargs, i=i, attn=layer.self_attn):
            x = kwargs.get("hidden_states", args[0] if args else None)
            v = x @ attn.v_proj.weight.T  # the bias is not part of the latent (it moves into W_o's bias)
            for name, plan in plans.items():
                sums[i][name][0] += (stand_in(plan, i, x, v) - v).pow(2).sum().item()
                sums[i][name][1] += v.pow(2).sum().item()
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    with temporary_hooks(handles), torch.no_grad():
        for row in batch:
            model(row[None], use_cache=False)
    return [{name: (e / n) ** 0.5 for name, (e, n) in s.items()} for s in sums]


def main():
    ap = layer_error_parser(__doc__, model="smollm2-135m")
    ap.add_argument("--group", type=int, default=3, help="KV heads per joint latent")
    a = ap.parse_args()
    model, calib, held = preset_model_and_batches(a.model, a.calib, a.held_out)
    rows = []
    for ratio in a.ratios:
        plans = {"channels": RAP(ratio=ratio, round_to=1).make_plan(model, calib),
                 "low-rank, per head": RAP(ratio=ratio, round_to=1, v_path="lowrank").make_plan(model, calib),
                 f"low-rank, g={a.group}": RAP(ratio=ratio, round_to=1, v_path="lowrank",
                                               group_size=a.group).make_plan(model, calib)}
        for i, err in enumerate(layer_errors(model, plans, held)):
            rows += [{"ratio": ratio, "layer": i, "v_path": name, "relative_error": round(e, 5)}
                     for name, e in err.items()]
        for name in plans:
            errs = [r["relative_error"] for r in rows if r["ratio"] == ratio and r["v_path"] == name]
            print(f"ratio {ratio} {name}: relative error of V, mean over {len(errs)} layers {sum(errs) / len(errs):.4f}"
                  f" (range {min(errs):.4f}-{max(errs):.4f})", flush=True)
    write_rows(rows, a.out)


if __name__ == "__main__":
    main()
