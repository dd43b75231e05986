"""The objects linked into every TVM-exported library: the C kernels + kernels/tvm/spfq_tvm_ops.cc.

Compiled per target with the target's compilers (targets/*.toml) into build/tvm/<target>/<hash>/,
the hash covering compilers, flags, sources and the tvm-ffi headers, so a rebuild happens only
when one changes. export_library() links them as `addons`; the packed functions they export
(__tvm_ffi_spfq_packed_layer, ...) are then found by the Relax VM in the library itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ...errors import SpfqError
from ...targets import ROOT, Target
from ..native_build import KERNEL_INCLUDE, build_hash, compile_kernels, kernel_sources, run

OP_SOURCE = ROOT / "kernels" / "tvm" / "spfq_tvm_ops.cc"
# what the library needs from the C++ runtime is linked in: the device needs no libstdc++ match.
# --build-id=sha1: the build id is a hash of the linked bytes (the same for the same input),
# never a random uuid, whatever the toolchain's default.
LINK_OPTIONS = ["-static-libstdc++", "-static-libgcc", "-pthread", "-lm", "-Wl,--build-id=sha1"]


def ffi_include() -> Path:
    """tvm-ffi's C headers (shipped in the apache-tvm-ffi wheel)."""
    try:
        import tvm_ffi.libinfo as info
    except ImportError:
        raise SpfqError("apache-tvm-ffi is not installed: the TVM export needs it (pip install apache-tvm-ffi)") from None
    return Path(info.find_include_path())


def link_options(target: Target) -> list[str]:
    """Options of the final link of a model.<target>.so."""
    return list(LINK_OPTIONS)


def compile_flags(target: Target) -> list[str]:
    # hidden: the kernel symbols of this library never clash with another copy in the process
    return list(target.cflags) + ["-fPIC", "-fvisibility=hidden"]


def build(target: Target, out_dir: Path | None = None) -> list[Path]:
    """Compile (or reuse) the kernel + wrapper objects for `target`; returns the object paths."""
    inc = ffi_include()
    target.require(target.cc, target.cxx)
    flags = compile_flags(target)
    digest = build_hash(target, flags, kernel_sources() + [OP_SOURCE, inc / "tvm" / "ffi" / "c_api.h"], [str(inc)])
    out_dir = Path(out_dir or ROOT / "build" / "tvm" / target.name) / digest
    done = out_dir / "objects.txt"
    if done.is_file():
        objs = [out_dir / name for name in done.read_text().split()]
        if all(o.is_file() for o in objs):
            return objs
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{digest}.", suffix=".tmp"))
    try:
        objs = compile_kernels(target, flags, tmp)
        op_obj = tmp / "spfq_tvm_ops.o"
        run([target.cxx, *flags, "-std=c++17", "-I", str(inc), "-I", str(KERNEL_INCLUDE),
             "-c", str(OP_SOURCE), "-o", str(op_obj)], f"compiling the TVM wrapper for {target.name}")
        objs.append(op_obj)
        (tmp / "objects.txt").write_text("\n".join(o.name for o in objs) + "\n")
        if out_dir.exists():  # a concurrent build finished first: keep it
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / o.name for o in objs]
