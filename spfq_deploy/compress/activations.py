"""Live activations of the sequential engine, held under a memory budget.

The sequential engine keeps, for every calibration batch, the tensors that are live across the
current cut of the graph (for the float and the compressed model). Once the tensors held in RAM
pass `budget` bytes, further tensors are written to memory-mapped files in a private temporary
folder and read back through the mapping. Their pages are dropped from the process (madvise
DONTNEED) after writing and again after each use (settle), so the process's RSS holds the
budget plus the batch being worked on; the kernel's page cache decides what stays in memory
and re-reads the rest from the file. Each file is unlinked as soon as it is mapped, so
nothing is left on disk even after a kill.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np
import torch

DEFAULT_BUDGET = 4 * 2 ** 30  # bytes; README: --memory-budget

_NUMPY = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
          torch.uint8, torch.bool}


class ActivationStore:
    """Counts the bytes of the tensors it keeps (once per storage) and spills beyond budget.

    rss_limit (bytes; the engine passes the process's RSS when the run starts + budget): a
    tensor is also spilled when the process's resident set plus three more tensors of its size
    would pass it (room for the next node's spilled input read back, its output and this one),
    so the whole run, not only the activations it counts, stays under the limit (one batch's
    working tensors are in the RSS too). Measured from the start, not from the model's size: the
    runtime, both models and the calibration data are resident before the first activation
    (SmolLM2: ~5 GB, so a limit of budget + model size spilled every activation, 176 GB)."""

    def __init__(self, budget: int = DEFAULT_BUDGET, rss_limit: int | None = None):
        self.budget = int(budget)
        self.rss_limit = rss_limit
        self.resident = 0  # bytes of kept tensors held in RAM
        self.peak = 0
        self.spilled = 0  # bytes written to mapped files over the run
        self._refs: dict[int, list] = {}  # storage pointer -> [bytes, references, mapped?]
        self._dir: tempfile.TemporaryDirectory | None = None
        self._n = 0
        self._maps: dict[int, mmap.mmap] = {}  # storage pointer -> mapping of a spilled tensor

    def keep(self, value):
        """Register a node's value for one batch; returns it (a tensor maybe moved to a mapping)."""
        if isinstance(value, torch.Tensor):
            return self._keep_tensor(value)
        if type(value) in (tuple, list):  # plain containers only (not named tuples)
            return type(value)(self.keep(v) for v in value)
        return value

    def release(self, value) -> None:
        if isinstance(value, torch.Tensor):
            ref = self._refs.get(self._ptr(value))
            if ref is None:
                return
            ref[1] -= 1
            if ref[1] == 0:
                del self._refs[self._ptr(value)]
                self._maps.pop(self._ptr(value), None)
                if not ref[2]:
                    self.resident -= ref[0]
        elif type(value) in (tuple, list):
            for v in value:
                self.release(v)

    def settle(self, value) -> None:
        """A spilled tensor was just read: drop its pages from this process again."""
        if isinstance(value, torch.Tensor):
            m = self._maps.get(self._ptr(value)) if value.device.type == "cpu" else None
            if m is not None:
                _drop(m)
        elif type(value) in (tuple, list):
            for v in value:
                self.settle(v)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    @staticmethod
    def _ptr(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def _keep_tensor(self, t: torch.Tensor) -> torch.Tensor:
        ptr = self._ptr(t)
        ref = self._refs.get(ptr)
        if ref is not None:  # a view of (or the same as) a tensor already kept
            ref[1] += 1
            return t
        nbytes = t.untyped_storage().nbytes()
        owns = t._base is None and t.is_contiguous() and nbytes == t.numel() * t.element_size()
        over = self.resident + nbytes > self.budget or \
            (self.rss_limit is not None and rss() + 3 * nbytes > self.rss_limit)
        if over and owns and t.dtype in _NUMPY and t.numel() > 0:
            t = self._spill(t)
            self._refs[self._ptr(t)] = [nbytes, 1, True]
            self.spilled += nbytes
            return t
        self._refs[ptr] = [nbytes, 1, False]
        self.resident += nbytes
        self.peak = max(self.peak, self.resident)
        return t

    def _spill(self, t: torch.Tensor) -> torch.Tensor:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="spfq-activations-")
        self._n += 1
        path = os.path.join(self._dir.name, f"{self._n}.bin")
        arr = t.numpy()
        mm = np.memmap(path, dtype=arr.dtype, mode="w+", shape=arr.shape)
        mm[...] = arr
        os.unlink(path)  # the mapping keeps the data; nothing stays on disk after the process
        out = torch.from_numpy(mm)
        self._maps[self._ptr(out)] = mm._mmap
        _drop(mm._mmap)
        return out


def rss() -> int:
    """Resident bytes of this process now (Linux /proc; 0 elsewhere: only the budget counts)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _drop(m: mmap.mmap) -> None:
    """Unmap a shared file mapping's pages from this process (the data stays in the page cache
    / the file; the next read faults it back in)."""
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)
