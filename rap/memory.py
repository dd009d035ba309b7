"""Peak tensor memory on any device, CPU included, and where it goes: what the scale benchmark and the memory
tests measure. ``torch.cuda.max_memory_allocated`` exists only on CUDA, and a process's resident memory mixes
in the allocator's caching; counting the storages that operators create is exact and works on CPU."""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated while the mode is active and still alive (``live``), and their peak
    (``peak``). Tensors that existed before (the model's weights) are not counted, so this is the working memory
    of what runs inside. Storages are counted once however many views share them, and leave the count when they
    are freed.

    >>> with TensorMemory() as mem:
    ...     y = x @ x.T
    >>> mem.peak
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        if outs:
            # Views and in-place results share an input's storage: not an allocation (it may predate the mode).
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in outs:
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._count(storage)
        return out

    def _count(self, storage) -> None:
        key = id(storage)
        if key in self._alive:
            return
        n = storage.nbytes()
        self._alive.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= n

    def reset_peak(self) -> int:
        """Start a new peak from what is alive now; returns the bytes alive now."""
        self.peak = self.live
        return self.live


class Stages:
    """Wall time and peak working memory of named stages (``with stages("whiten statistics"): ...``), each peak
    counted from what was alive when the stage began. Stages may nest; a stage seen again adds up its time and
    keeps its largest peak."""

    def __init__(self, memory: TensorMemory | None = None):
        self.memory = memory
        self.rows: dict[str, dict] = {}

    @contextmanager
    def __call__(self, name: str):
        mem = self.memory
        start_live = mem.live if mem else 0
        outer_peak = mem.peak if mem else 0
        if mem:
            mem.reset_peak()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            row = self.rows.setdefault(name, {"stage": name, "seconds": 0.0, "peak_bytes": 0, "calls": 0})
            row["seconds"] += time.perf_counter() - t0
            row["calls"] += 1
            if mem:
                row["peak_bytes"] = max(row["peak_bytes"], mem.peak - start_live)
                mem.peak = max(outer_peak, mem.peak)  # the enclosing stage's peak includes this one


_STAGES: Stages | None = None


@contextmanager
def stage(name: str):
    """Mark a stage of compression (a no-op unless ``recording`` is active)."""
    if _STAGES is None:
        yield
    else:
        with _STAGES(name):
            yield


@contextmanager
def recording(memory: bool = True):
    """Record every ``stage`` run inside the block; yields the ``Stages`` (its ``rows``, in first-seen order)."""
    global _STAGES
    mem = TensorMemory() if memory else None
    stages, before = Stages(mem), _STAGES
    _STAGES = stages
    try:
        if mem:
            with mem:
                yield stages
        else:
            yield stages
    finally:
        _STAGES = before
