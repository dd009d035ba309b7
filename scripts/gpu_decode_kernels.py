"""GPU: one decode token of attention at Llama-3-8B heads (32 q / 8 KV), the matmul path against each SDPA backend,
at equal, unaligned and unequal widths. Wrote docs/bench/gpu_h100_decode_kernels.txt:
python scripts/gpu_decode_kernels.py"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rap.methods import attention as A

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
def matmul_path(q, k, v):  # the CPU path, forced
    b, nh, _, n = q.shape
    hk, t = k.shape[1], k.shape[2]
    s = (q.reshape(b, hk, nh // hk, n) @ k.transpose(-1, -2)).reshape(b, nh, t) * 0.088
    p = torch.softmax(s, -1, dtype=torch.float32).to(v.dtype)
    return (p.reshape(b, hk, nh // hk, t) @ v).reshape(b, 1, nh, v.shape[-1])
def timeit(f, n=50):
    for _ in range(5):
        f()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3
for t in (4096, 32768):
    for bsz in (1, 4, 16):
        for n, m in ((128, 128), (90, 90), (88, 88), (90, 128)):
            q = torch.randn(bsz, 32, 1, n, device=dev, dtype=dt)
            k = torch.randn(bsz, 8, t, n, device=dev, dtype=dt)
            v = torch.randn(bsz, 8, t, m, device=dev, dtype=dt)
            ref = matmul_path(q, k, v)
            row = {"matmul": timeit(lambda: matmul_path(q, k, v))}
            row["decode_attention"] = timeit(lambda: A.decode_attention(q, k, v, None, 0.088))
            err = (A.decode_attention(q, k, v, None, 0.088).float() - ref.float()).abs().max().item()
            for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                       SDPBackend.MATH):
                try:
                    with sdpa_kernel(be):
                        row[be.name] = timeit(
                            lambda: F.scaled_dot_product_attention(q, k, v, scale=0.088, enable_gqa=True))
                except Exception:
                    row[be.name] = None
            print(f"T={t:6d} b={bsz:2d} n={n:3d} m={m:3d} err={err:.3g} "
                  + " ".join(f"{k}={v:.0f}us" if v else f"{k}=NA" for k, v in row.items()), flush=True)
