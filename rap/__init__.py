"""rap: KV-cache compression for RoPE language models."""
from importlib import import_module

__version__ = "0.2.0"
__all__ = ["compress", "apply_plan", "save_plan", "get_plan"]


def __getattr__(name):
    # Lazy: `import rap.config` (run.py, before Hydra parses the command line) must not import torch.
    if name in __all__:
        return getattr(import_module(".methods", __name__), name)
    raise AttributeError(f"module 'rap' has no attribute {name!r}")
