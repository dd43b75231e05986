"""CPU schedules for the float part of the TVM export: what TVM 0.27 leaves as plain loops.

Relax's CPU pipeline legalizes every float op (attention matmuls, softmax, GELU, LayerNorm,
pooling, residual adds, transposes) to TIR without a schedule: scalar loops, one intermediate
buffer per op inside a fused function. MetaSchedule cannot run with the pinned packages
(tuning.py), TVM ships no CPU BLAS route in the wheel, and dlight's CPU rules cover only
softmax / LayerNorm-like reductions (scalarised by lane predicates on a symbolic row length:
slower than no schedule) and GEMV. So the export applies rules of its own, dlight style
(s_tir.dlight.ApplyDefaultSchedule: the first rule that fits a function schedules it), written
with TVM's schedule API and deterministic (no sampling: same module, same bytes):

  Matmul       C[.., i, j] += A[.., i, k] * B[.., k, j] (the attention matmuls): the i / j
               domain padded to whole register tiles (pad_einsum: the sequence axes are
               symbolic, and a predicate inside a tile would scalarise it), MR x NR output tiles
               held in vector registers, B rows loaded as vectors, A broadcast; an elementwise
               epilogue fused in (a bias) vectorised after it;
  Rows         row reductions (softmax, LayerNorm): lanes of partial results (rfactor), every
               block vectorised along the row;
  Elementwise  every block inlined into the last one, the innermost axis vectorised; a symbolic
               axis gets a partition hint so LoopPartition splits off the tail and the body
               vectorises without lane predicates.

A function no rule fits (or whose schedule TVM rejects) keeps TVM's loops: pooling, for one
(memory-bound here: channels in vector lanes measured no faster). Vector widths come from the
target's CPU features (128 bits for the generic x86-64 and arm64 dicts: SSE2, NEON). Softmax and
GELU are legalized by fastmath.py first (libm's expf / erff have no vector form).
"""

from __future__ import annotations

import re

MR = 4  # rows of a matmul register tile
NR_VECTORS = 2  # vectors per tile row: MR * NR_VECTORS accumulators fit 16 vector registers
HINT = "pragma_loop_partition_hint"


def vector_lanes(target) -> int:
    """float32 lanes of the target's widest vector register, from the CPU features LLVM enables
    for it (llvm_get_vector_width answers for the host, whatever the target dict says)."""
    from tvm.target.codegen import llvm_get_cpu_features

    features = set(llvm_get_cpu_features(target))
    return 16 if "avx512f" in features else 8 if "avx" in features else 4


def _static(e) -> int | None:
    from tvm import tirx

    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _var_index(region) -> list:
    """The block vars a buffer region is indexed by, or None where an index is not a bare var."""
    from tvm import tirx

    out = []
    for r in region.region:
        if not isinstance(r.min, tirx.Var) or _static(r.extent) != 1:
            return None
        out.append(r.min)
    return out


def _same(xs: list, ys: list) -> bool:
    """Element-wise same_as of two lists of TIR vars (== on vars builds an expression)."""
    return len(xs) == len(ys) and all(x.same_as(y) for x, y in zip(xs, ys))


class _Guarded:
    """A rule whose schedule TVM rejects leaves the function to the next rule / TVM's loops."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        from tvm import s_tir

        try:
            return self.rule.apply(func, target, tunable)
        except s_tir.ScheduleError:
            return None


def _inline_single_use(sch, blocks: list) -> list:
    """Inline injective blocks read by one block only (an op's intermediate values), keeping
    those read twice (softmax's exp: computed once, read by the sum and the division)."""
    from tvm import s_tir

    kept = []
    for b in blocks[:-1]:
        if b.is_injective() and len(sch.get_consumers(b.block_rv)) == 1:
            try:
                sch.compute_inline(b.block_rv)
                continue
            except s_tir.ScheduleError:
                pass
        kept.append(b)
    kept.append(blocks[-1])
    if len(kept) > 1 and kept[-1].is_injective() and len(sch.get_producers(kept[-1].block_rv)) == 1:
        try:  # a trailing copy (broadcast_to after softmax) into its producer
            sch.reverse_compute_inline(kept[-1].block_rv)
            kept.pop()
        except s_tir.ScheduleError:
            pass
    return kept


def _rules(symbolic_rows: bool = True):
    from tvm import s_tir
    from tvm.s_tir import dlight

    class Matmul(dlight.ScheduleRule):
        """Batched C = A @ B with B's last axis the output's last: register-tiled, vectorised."""

        def apply(self, func, target, _tunable):
            if target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            blocks = dlight.normalize_prim_func(sch)
            if blocks is None:
                return None
            blocks = dlight.try_inline(sch, blocks)
            if blocks[0].is_injective() or not all(b.is_injective() for b in blocks[1:]):
                return None
            block = blocks[0].block_rv
            axes = self._axes(sch.get(block))
            if axes is None:
                return None
            vl = vector_lanes(target)
            self._schedule(sch, block, axes, vl)
            for epilogue in blocks[1:]:
                vectorize_inner(sch, epilogue.block_rv, vl)
            return sch

        @staticmethod
        def _axes(stmt):
            """(batch vars, i, j, k) of an einsum matmul block, else None."""
            iters = list(stmt.iter_vars)
            reduce = [iv.var for iv in iters if iv.iter_type == 2]
            if len(reduce) != 1 or len(stmt.writes) != 1 or stmt.init is None:
                return None
            out = _var_index(stmt.writes[0])
            reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
            if out is None or len(out) < 2 or len(reads) != 2 or not _same([iv.var for iv in iters[:-1]], out):
                return None
            k, (i, j) = reduce[0], out[-2:]
            a, b = (_var_index(r) for r in reads)
            if a is None or b is None:
                return None
            if _same(b[-2:], [i, k]):
                a, b = b, a
            if not (_same(a[-2:], [i, k]) and _same(b[-2:], [k, j]) and _same(a[:-2], out[:len(a) - 2])
                    and _same(b[:-2], out[:len(b) - 2])):
                return None
            return out[:-2], i, j, k

        @staticmethod
        def _schedule(sch, block, axes, vl):
            batch, _, _, _ = axes
            nr = NR_VECTORS * vl
            loops = sch.get_loops(block)
            ext_i, ext_j = (_static(sch.get(lp).extent) for lp in loops[-3:-1])
            pad = [1] * len(batch) + [1 if ext_i is not None and ext_i % MR == 0 else MR,
                                      1 if ext_j is not None and ext_j % nr == 0 else nr, 1]
            copies_in, copies_out = [], []
            if pad != [1] * len(pad):
                sch.pad_einsum(block, pad)
                copies_in, copies_out = sch.get_producers(block), sch.get_consumers(block)
            *outer, i, j, k = sch.get_loops(block)
            io, ii = sch.split(i, [None, MR])
            jo, jv, jl = sch.split(j, [None, NR_VECTORS, vl])
            sch.reorder(*outer, io, jo, k, ii, jv, jl)
            acc = sch.cache_write(block, 0, "local")
            sch.reverse_compute_at(acc, jo)
            sch.vectorize(jl)
            sch.unroll(ii)
            sch.unroll(jv)
            *_, last = sch.get_loops(acc)
            sch.vectorize(sch.split(last, [None, vl])[1])
            sch.decompose_reduction(block, k)
            if outer:  # padded copies in and out: one batch slice at a time
                for copy in copies_in:
                    sch.compute_at(copy, outer[-1])
                for copy in copies_out:
                    sch.reverse_compute_at(copy, outer[-1])

    class Rows(dlight.ScheduleRule):
        """Row reductions (softmax, LayerNorm): each reduction over its innermost axis split
        into vector lanes (rfactor: one partial per lane, lanes contiguous), injective blocks
        vectorised; every block its own loop nest (compute_at of an rfactor'ed block drops the
        tail predicate in TVM 0.27: wrong results for lengths not a multiple of the lanes)."""

        def apply(self, func, target, _tunable):
            if target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            blocks = dlight.normalize_prim_func(sch)
            if blocks is None or all(b.is_injective() for b in blocks):
                return None
            if any(not b.is_injective() and not re.fullmatch("S+R", b.dom_kind()) for b in blocks):
                return None
            blocks = _inline_single_use(sch, blocks)
            if not symbolic_rows and any(_static(sch.get(sch.get_loops(b.block_rv)[-1]).extent) is None
                                         for b in blocks):
                # unfused modules (compile.FUSE_TIR_BUG): rows of symbolic length (a softmax over a
                # decoder's cache) keep TVM's own loops; this schedule on the unfused softmax gave
                # sums 1-4% off for >= 6 elements (tests/test_smollm2.py checks a decoder's steps)
                return None
            vl = vector_lanes(target)
            for b in blocks:
                if b.is_injective():
                    vectorize_inner(sch, b.block_rv, vl)
                    continue
                *outer, k = sch.get_loops(b.block_rv)
                ext = _static(sch.get(k).extent)
                if ext is not None and ext % vl:
                    continue  # a static ragged row stays scalar (see vectorize_inner)
                ko, lane = sch.split(k, [None, vl])
                rf = sch.rfactor(lane, len(outer))
                *_, ko, lane = sch.get_loops(rf)
                sch.vectorize(lane)
                if ext is None:
                    sch.annotate(ko, HINT, 1)
                sch.decompose_reduction(rf, ko)
            return sch

    class Elementwise(dlight.ScheduleRule):
        """Injective functions: one fused block, innermost axis vectorised."""

        def apply(self, func, target, _tunable):
            if target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            blocks = dlight.normalize_prim_func(sch)
            if blocks is None or not all(b.is_injective() for b in blocks):
                return None
            blocks = dlight.try_inline(sch, blocks)
            if len(blocks) != 1:
                return None
            vectorize_inner(sch, blocks[0].block_rv, vector_lanes(target))
            return sch

    return [_Guarded(r) for r in (Matmul(), Rows(), Elementwise())]


def vectorize_inner(sch, block, vl: int) -> None:
    """Vectorise a block's innermost loop in vl lanes. A symbolic extent is split with a
    partition hint (LoopPartition then splits off the tail, so the full vectors run without lane
    predicates); a static one not a multiple of vl is partitioned here into whole vectors and one
    shorter vector (the hint on a static loop trips an int32 / int64 mismatch in TVM 0.27)."""
    *_, inner = sch.get_loops(block)
    ext = _static(sch.get(inner).extent)
    if ext is not None and ext < 2:
        return
    if ext is not None and ext <= vl:
        sch.vectorize(inner)
        return
    if ext is None:
        outer, lanes = sch.split(inner, [None, vl])
        sch.vectorize(lanes)
        sch.annotate(outer, HINT, 1)
        return
    if ext % vl:
        inner, tail = sch.loop_partition(inner, [ext - ext % vl, None])
        if ext % vl > 1:
            sch.vectorize(tail)
    sch.vectorize(sch.split(inner, [None, vl])[1])


UNFUSED = ("FuseOps", "FuseTIR")  # left out by relax_pipeline(fuse=False)


def fuse_passes(target, fuse: bool = True) -> list:
    """Relax's CPU passes up to fused TIR (dispatch, legalize, fuse), softmax and GELU legalized
    by fastmath.py first: the functions the rules schedule (and MetaSchedule tunes, tuning.py).
    fuse=False: one TIR function per operator (FuseOps / FuseTIR left out)."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .fastmath import LEGALIZE

    legalize = [p for p in cpu.legalize_passes(target) if fuse or p.info.name not in UNFUSED]
    return cpu.library_dispatch_passes(target) + [relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE)] + legalize


def apply_rules(fused: bool = True):
    """The pass scheduling every function not scheduled yet with the rules above (fused=False:
    the module was compiled without operator fusion, see Rows)."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(*_rules(symbolic_rows=fused))


def relax_pipeline(target, fuse: bool = True):
    """Relax's CPU pipeline with the rules between fusion and lowering."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="SpfqCpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(fuse_passes(target, fuse) + [apply_rules(fuse)] + cpu.dataflow_lower_passes(target)
                                            + cpu.finalize_passes(target))(mod)

    return _pipeline
