"""rap: KV-cache compression for RoPE language models.

The library is ``rap`` (methods, attention, statistics, costs, caches, plans); the experiment harness that runs,
measures and records jobs is ``rap.harness``, which the library never imports."""
from importlib import import_module

__version__ = "0.2.0"
__all__ = ["compress", "apply_plan", "save_plan", "load_plan", "get_plan"]


def __getattr__(name):
    # Lazy: `import rap.harness.resolvers` (run.py, before Hydra parses the command line) must not import torch.
    if name in __all__:
        return getattr(import_module(".plans", __name__), name)
    raise AttributeError(f"module 'rap' has no attribute {name!r}")
