"""rap: KV-cache compression for RoPE language models."""
from .methods import apply_plan, compress, get_plan, save_plan

__all__ = ["compress", "apply_plan", "save_plan", "get_plan"]
