"""Measured memory of a batch: live tensor bytes, overall and per stage (the memory plan's check).

``LiveTensorBytes`` measures what a forward holds: a ``TorchDispatchMode`` that sees every op's
outputs, counts each new storage's bytes while it lives (a weakref on the storage drops it when
it is freed) and keeps the peak, overall and per stage. Storages that exist before the mode is
entered (the weights, the inputs) are not counted: an op's output that shares an input's storage
(a view, an in-place op) is not new. On CPU this is the only honest figure for tiny models (RSS
moves by more than their whole forward); on CUDA ``measure`` also reads
``torch.cuda.max_memory_allocated`` (which adds the allocator's rounding and kernels' workspaces,
invisible to the mode). ``flmm.memory`` estimates what this measures; ``bench/memory.py``
compares the two.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

T = TypeVar("T")


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of the storages that ops create while the mode is on, and their peaks.

    ``peak``: the most bytes live at once since entering; ``stages``: stage name → the peak
    between the previous ``mark`` (or entering) and the ``mark(stage)`` call that names it;
    ``current``: bytes live now. ``device``: count only storages on this device type
    (``"cpu"``, ``"cuda"``); None counts all. Use as a context manager::

        with torch.inference_mode(), LiveTensorBytes() as tracked:
            out = model(inputs); tracked.mark("forward")
    """

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device
        self.current = 0
        self.peak = 0
        self.stages: dict[str, int] = {}
        self._stage_peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) → (ref, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(s) for s in _storages((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        for storage in _storages(out):
            key = id(storage)
            if key in inputs and key not in self._live:
                continue  # a view or in-place result of a storage made before the mode
            if self.device is not None and storage.device.type != self.device:
                continue
            self._count(storage, key)
        return out

    def _count(self, storage: torch.UntypedStorage, key: int) -> None:
        """Start counting ``storage`` (or update its size: a resized output)."""
        size = storage.nbytes()
        if key in self._live:
            ref, old = self._live[key]
            self._live[key] = (ref, size)
            self._add(size - old)
            return
        ref = weakref.ref(storage, lambda _, key=key: self._drop(key))
        self._live[key] = (ref, size)
        self._add(size)

    def _drop(self, key: int) -> None:
        _, size = self._live.pop(key, (None, 0))
        self.current -= size

    def _add(self, size: int) -> None:
        self.current += size
        self.peak = max(self.peak, self.current)
        self._stage_peak = max(self._stage_peak, self.current)

    def mark(self, stage: str) -> None:
        """Close a stage: its peak is the most bytes live since the previous mark."""
        self.stages[stage] = max(self.stages.get(stage, 0), self._stage_peak)
        self._stage_peak = self.current


def _storages(tree) -> list[torch.UntypedStorage]:
    """The distinct untyped storages of the tensors in a pytree of op arguments or outputs."""
    out, seen = [], set()
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
            storage = leaf.untyped_storage()
            if id(storage) not in seen:
                seen.add(id(storage))
                out.append(storage)
    return out


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (distinct storages: tied weights once)."""
    storages = {id(t.untyped_storage()): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.untyped_storage().nbytes() for t in storages.values())


@dataclass(frozen=True)
class Measured:
    """One measured run: ``tensors`` the peak of live tensor bytes the run created,
    ``stages`` that peak per stage (``LiveTensorBytes.stages``), ``cuda`` the run's
    ``torch.cuda.max_memory_allocated`` above what was allocated before it (None on CPU)."""

    tensors: int
    stages: dict[str, int]
    cuda: int | None = None


def measure(run: Callable[[LiveTensorBytes], T], device: torch.device) -> tuple[T, Measured]:
    """``run(tracker)`` under ``torch.inference_mode`` and a ``LiveTensorBytes`` (``run`` may
    ``mark`` its stages on it) → its result and what it held at its peaks, counting the
    storages on ``device``'s type only. On CUDA the allocator's peak is read too (reset first;
    the device synchronised)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), LiveTensorBytes(device.type) as tracker:
        result = run(tracker)
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    return result, Measured(tracker.peak, dict(tracker.stages), peak)
