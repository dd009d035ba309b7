"""Human-readable summary of one job's metrics (the files stay the source of truth)."""
from __future__ import annotations

ROWS = [
    ("WikiText-2 perplexity", "ppl_wikitext2", "{:.3f}"),
    ("  tokens / windows", ("ppl_tokens", "ppl_windows"), "{} / {}"),
    ("zero-shot acc (avg)", "acc_avg", "{:.4f}"),
    ("zero-shot acc_norm (avg)", "acc_norm_avg", "{:.4f}"),
    ("KV bytes / token", "kv_bytes_per_token", "{:,.0f}"),
    ("params total", "params_total", "{:,}"),
    ("params attention", "params_attention", "{:,}"),
    ("decode FLOPs / token", "flops_decode", "{:,}"),
    ("decode attention FLOPs / token", "flops_decode_attention", "{:,}"),
    ("prefill latency ms (attention)", ("latency_prefill_ms", "latency_prefill_attention_ms"), "{:.1f} ({:.1f})"),
    ("decode latency ms (attention)", ("latency_decode_ms", "latency_decode_attention_ms"), "{:.2f} ({:.2f})"),
    ("wall time s", "wall_time_s", "{:.0f}"),
]


def format_summary(m: dict) -> str:
    lines = [f"== {m.get('run_name', '')}  (context {m.get('context_len')}, {m.get('latency_device')}, "
             f"{m.get('latency_dtype')})"]
    for label, keys, fmt in ROWS:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if all(k in m and m[k] is not None for k in keys):
            lines.append(f"{label:34s} {fmt.format(*(m[k] for k in keys))}")
    for k in sorted(m):
        if k.startswith("acc_") and not k.startswith(("acc_stderr", "acc_avg", "acc_norm_avg")):
            lines.append(f"  {k:32s} {m[k]:.4f}")
    return "\n".join(lines)


def print_summary(m: dict) -> None:
    print(format_summary(m), flush=True)
