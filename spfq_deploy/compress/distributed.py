"""Compression over torch.distributed ranks (torchrun): who owns which batches and candidates.

`torchrun --nproc-per-node N -m spfq_deploy compress ...` starts N processes; each one runs
the float and the compressed model on its share of the calibration batches only (contiguous
leaves, see below), the Gram matrices are summed in one fixed order along the ranks, and the
candidates of every layer's scale / sparsity search are split over the ranks; rank 0 alone
writes the file. The output is byte-identical to a single-process run with the same number of
threads per process, because every floating-point operation has the same operands and shapes
whatever the rank count:
- a leaf is a run of consecutive batches with >= LEAF_SAMPLES samples (it depends on the
  batches only); each leaf's Grams are one buffered GEMM sequence on the rank that owns it;
- the total is ((P_0 + P_1) + P_2) + ... in leaf order: rank r receives the running sum from
  rank r - 1, adds its own leaves in order and passes it on; the last rank broadcasts it;
- the units of path following are (candidate, row half) pairs, each run on its own (never
  batched with others; layer.PARTS), on whichever rank owns it; only per-row errors and zero
  counts, and the winner's codes, travel, each written by one rank into zeros and summed
  (Comm.merge: exact).
Without torchrun (WORLD_SIZE unset or 1) a Comm of one rank does all of this locally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import SpfqError

LEAF_SAMPLES = 64  # samples per leaf of the Gram sum (a GEMM of a few thousand rows)


@dataclass
class Comm:
    """This process's place in the run: rank of world (0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def root(self) -> bool:
        return self.rank == 0

    def span(self, n: int, rank: int | None = None) -> range:
        """The contiguous share [n r / W, n (r + 1) / W) of n items that a rank owns."""
        r = self.rank if rank is None else rank
        return range(n * r // self.world, n * (r + 1) // self.world)

    def gather(self, obj) -> list:
        """obj of every rank, in rank order (pickled; small objects only)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        """t, in place, with every rank's entries: each entry is written by at most one rank
        and is zero on the others, so the sum over ranks is exact (x + 0 = x) and one
        all_reduce replaces a pickled gather (14 ms for a few tensors on gloo, vs 2 ms). Float
        zeros are made +0.0 on one rank too, as the sum makes them on several."""
        if self.world > 1:
            torch.distributed.all_reduce(t)
        elif t.is_floating_point():
            t.add_(0.0)
        return t

    def close(self) -> None:
        """End of the run: wait for every rank (rank 0 has written the file), then leave the
        process group, so no rank exits with a peer still connected (gloo aborts then)."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def check(self, error: BaseException | None) -> None:
        """A collective barrier that also carries failures: if any rank failed, every rank
        raises the first failing rank's one-line error (so none waits forever)."""
        msgs = self.gather(None if error is None else str(error))
        for m in msgs:
            if m is not None:
                exc = error if error is not None else SpfqError(m)
                exc.reported_by_root = True  # rank 0 prints it (cli.main); the others stay quiet
                raise exc

    def ordered_sum(self, first, parts: list, add):
        """Fold this rank's leaf partials (in leaf order) into the running sum from the rank
        before, pass it on, and return the total on every rank. `first` is this rank's
        running sum when it owns leaf 0 (already folded), `add(acc, part)` the fold; sums are
        tuples of tensors."""
        if self.world == 1:
            return first
        acc = first
        if self.rank > 0:
            acc = _recv(self.rank - 1)
            if first is not None:  # this rank owns leaf 0: the ranks before it had no leaf
                acc = first
            for p in parts:
                acc = p if acc is None else add(acc, p)
        if self.rank < self.world - 1:
            _send(acc, self.rank + 1)
        return _broadcast(acc, self.world - 1)


def _send(obj: tuple | None, dst: int) -> None:
    """A tuple of tensors (or None) to rank dst: their shapes and dtypes pickled, the data as
    tensors (pickling 50 MB of Grams costs ~10x the raw transfer on gloo)."""
    dist = torch.distributed
    dist.send_object_list([None if obj is None else [(t.shape, t.dtype) for t in obj]], dst=dst)
    for t in obj or ():
        dist.send(t.contiguous(), dst=dst)


def _recv(src: int) -> tuple | None:
    dist = torch.distributed
    box = [None]
    dist.recv_object_list(box, src=src)
    if box[0] is None:
        return None
    out = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in box[0])
    for t in out:
        dist.recv(t, src=src)
    return out


def _broadcast(obj: tuple | None, src: int) -> tuple | None:
    """The tuple of tensors (or None) of rank src on every rank, sent as in _send."""
    dist = torch.distributed
    me = dist.get_rank() == src
    box = [None if not me or obj is None else [(t.shape, t.dtype) for t in obj]]
    dist.broadcast_object_list(box, src=src)
    if box[0] is None:
        return None
    out = tuple(t.contiguous() for t in obj) if me else tuple(torch.empty(s, dtype=d) for s, d in box[0])
    for t in out:
        dist.broadcast(t, src=src)
    return out


def leaves(counts: list[int]) -> list[int]:
    """Leaf index of every batch: consecutive batches until a leaf holds >= LEAF_SAMPLES samples."""
    out, leaf, filled = [], 0, 0
    for c in counts:
        if filled >= LEAF_SAMPLES:
            leaf, filled = leaf + 1, 0
        out.append(leaf)
        filled += c
    return out


_COMM: Comm | None = None


def current() -> Comm:
    """The run's Comm once from_env() made it, else a single process."""
    return _COMM or Comm()


def from_env() -> Comm:
    """The run's Comm: a gloo process group when torchrun started this process (the
    compression arithmetic runs on the CPU, so gloo carries it, on one host or many)."""
    global _COMM
    if _COMM is not None:
        return _COMM
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        _COMM = Comm()
        return _COMM
    dist = torch.distributed
    if not dist.is_available():
        raise SpfqError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    _COMM = Comm(dist.get_rank(), dist.get_world_size())
    return _COMM
