"""Relax module -> shared library for a target: tvm.compile with the target's TVM dict, then
export_library with the target's C++ compiler (a cross compiler for arm64) and the kernel
objects (library.py) as addons.

The module is Relax imported from torch.export (graph.py) with convs kept channels last
(layout.py) and ReLU / Clip folded into the packed calls (fuse.py); tvm.compile runs Relax's CPU
pipeline with the export's schedules for the float part (schedule.py).

Same module, same bytes: the schedules are deterministic, reproducible.canonical_shape_funcs
runs last (the order of TVM's shape-function stores otherwise follows object addresses), and
the final link records a content-derived build id (library.py).

TVM errors often carry an empty or multi-line message, and a Ctrl-C inside TVM's C++ code can
come back as an exception with no text: reason() always gives one line, and an interrupt stays
an interrupt.
"""

from __future__ import annotations

from pathlib import Path

from ...compressed import CompressedModel
from ...errors import SpfqError, interrupted
from ...targets import Target, host_target
from ..source import ExportInputs
from . import fuse, graph, layout, library, reproducible, schedule


def reason(exc: BaseException) -> str:
    """The last non-empty line of an exception's text, or its type name when it has none."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _reraise_interrupt(exc: BaseException) -> None:
    """TVM's FFI may turn a Ctrl-C into an error without text; keep it an interrupt."""
    if interrupted():
        raise KeyboardInterrupt from None
    seen = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        seen = seen.__cause__ or seen.__context__
    if "KeyboardInterrupt" in str(exc):
        raise KeyboardInterrupt from None


def tvm_target(tgt: Target):
    import tvm

    if not tgt.tvm:
        raise SpfqError(f"target {tgt.name}: no [tvm] table in its target file")
    try:
        return tvm.target.Target(dict(tgt.tvm))
    except Exception as exc:  # TVM raises its own error types for a bad dict
        _reraise_interrupt(exc)
        raise SpfqError(f"target {tgt.name}: TVM rejects its [tvm] table ({reason(exc)})") from None


# TVM 0.27's FuseTIR fails on some fused functions over symbolic shapes (a decoder's cache
# lengths; apache/tvm#20178: "Check failed: (VarRemapGet(source) == nullptr)"): such a module is
# compiled again without operator fusion (one TIR function per operator), with a warning.
FUSE_TIR_BUG = "VarRemapGet(source) == nullptr"


def compile_library(mod, tgt: Target, path: Path, database=None, log=print) -> Path:
    """tvm.compile `mod` for `tgt` and link it with the kernel objects into `path`; with a
    MetaSchedule `database`, the functions it has records for get their tuned schedules."""
    import tvm

    from . import tuning

    objs = library.build(tgt)
    target = tvm_target(tgt)

    def pipeline(fuse: bool):
        if database is None:
            return tvm.transform.Sequential([schedule.relax_pipeline(target, fuse), reproducible.canonical_shape_funcs()])
        return tuning.relax_pipeline(target, database, fuse)

    try:
        try:
            ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(True))
        except Exception as exc:
            _reraise_interrupt(exc)
            if FUSE_TIR_BUG not in str(exc):
                raise
            log(f"warning: TVM's FuseTIR fails on this model's symbolic shapes (apache/tvm#20178); "
                f"compiling {tgt.name} without operator fusion")
            ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(False))
    except Exception as exc:
        _reraise_interrupt(exc)
        raise SpfqError(f"TVM could not compile the model for {tgt.name}: {reason(exc)}") from None
    try:
        ex.export_library(str(path), cc=tgt.cxx, addons=[str(o) for o in objs], options=list(library.link_options(tgt)))
    except Exception as exc:
        _reraise_interrupt(exc)
        raise SpfqError(f"linking the TVM library for {tgt.name} failed: {reason(exc)}") from None
    return path


def build_module(model, cm, inputs: ExportInputs, activations: str, dynamic: bool = True, log=print):
    """(Relax IRModule, per-layer info, {input: [symbolic axes]} of the traced program)."""
    try:
        ep, names = graph.export_program(model, cm, inputs, dynamic=dynamic)
    except SpfqError as exc:
        if not dynamic or not inputs.dynamic_axes:
            raise
        # some models only trace with fixed shapes (data-dependent control flow on a size)
        log(f"warning: {exc}; exporting with the example inputs' fixed shapes instead")
        ep, names = graph.export_program(model, cm, inputs, dynamic=False)
    mod, infos = graph.to_relax(ep, cm, names, activations)
    mod = fuse.fuse_clamps(layout.channels_last(mod))
    return mod, infos, graph.dynamic_inputs(ep, inputs.input_names)


def float_library(model, inputs: ExportInputs, path: str | Path, target: Target | None = None, log=print) -> Path:
    """The uncompressed model through the same pipeline (torch.export -> Relax -> tvm.compile ->
    export_library), no packed layer: the fp32 TVM baseline the benchmarks compare against."""
    mod, _, _ = build_module(model, CompressedModel(layers={}, float_params={}), inputs, "float", log=log)
    return compile_library(mod, target or host_target(), Path(path))
