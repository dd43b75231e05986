"""The ONNX Runtime custom-op library (kernels/ort/spfq_ort_ops.cc + the C kernels), per target.

Built on demand with the target's compilers into build/ort/<target>/, keyed by a hash of the
sources and flags so a rebuild happens only when they change. It needs ONNX Runtime's C/C++
headers, which the PyPI wheel lacks: `make ort-headers` (kernels/ort/fetch_headers.sh) takes
them from Debian's libonnxruntime-dev; SPFQ_ORT_HEADERS points elsewhere. Without headers only
the custom-op flavour is unavailable (OrtHeadersMissing says how to get them).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import tempfile
from pathlib import Path

from ...errors import SpfqError
from ...targets import ROOT, Target
from ..native_build import KERNEL_INCLUDE, build_hash, compile_kernels, kernel_sources, run

OP_SOURCE = ROOT / "kernels" / "ort" / "spfq_ort_ops.cc"
LIB_NAME = "libspfq_ort.so"


class OrtHeadersMissing(SpfqError):
    """ONNX Runtime's C API headers are not available: the custom-op flavour cannot be built."""


def headers_dir() -> Path:
    """The folder holding onnxruntime_c_api.h (raises OrtHeadersMissing when absent)."""
    base = Path(os.environ.get("SPFQ_ORT_HEADERS", ROOT / "build" / "onnxruntime-headers"))
    inc = base / "include" if (base / "include").is_dir() else base
    if not (inc / "onnxruntime_cxx_api.h").is_file():
        raise OrtHeadersMissing(
            f"ONNX Runtime C/C++ headers not found in {inc}: run `make ort-headers` (Debian trixie "
            "libonnxruntime-dev) or set SPFQ_ORT_HEADERS; the custom-op ONNX flavour is unavailable")
    return inc


def headers_info() -> dict:
    """{'ort_api_version': 21, 'package': '1.21.0+dfsg-1'} of the headers in use."""
    inc = headers_dir()
    text = (inc / "onnxruntime_c_api.h").read_text(errors="replace")
    m = re.search(r"#define ORT_API_VERSION (\d+)", text)
    version_file = inc.parent / "VERSION"
    return {"ort_api_version": int(m.group(1)) if m else None,
            "package": version_file.read_text().strip() if version_file.is_file() else "unknown",
            "path": str(inc)}


def build(target: Target, out_dir: Path | None = None) -> Path:
    """Compile (or reuse) the custom-op library for `target`; returns the .so path."""
    inc = headers_dir()
    target.require(target.cc, target.cxx)
    flags = list(target.cflags) + ["-fPIC", "-fvisibility=hidden"]
    digest = build_hash(target, flags, kernel_sources() + [OP_SOURCE], [str(inc)])
    out_dir = Path(out_dir or ROOT / "build" / "ort" / target.name) / digest
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        objs = [str(o) for o in compile_kernels(target, flags, Path(tmp))]
        op_obj = Path(tmp) / "spfq_ort_ops.o"
        run([target.cxx, *flags, "-std=c++17", "-I", str(inc), "-I", str(KERNEL_INCLUDE),
              "-c", str(OP_SOURCE), "-o", str(op_obj)], f"compiling the custom-op library for {target.name}")
        staged = Path(tmp) / LIB_NAME
        run([target.cxx, "-shared", "-pthread", "-o", str(staged), str(op_obj), *objs,
              "-static-libstdc++", "-static-libgcc", "-Wl,--no-undefined", "-lm"],
             f"linking the custom-op library for {target.name}")
        os.replace(staged, lib)
    return lib


def library_info(path: str | os.PathLike) -> str:
    """What a host-loadable library says about itself (domain, ORT API, kernel ABI, ISA)."""
    try:
        so = ctypes.CDLL(str(path))
        fn = so.SpfqOrtLibraryInfo
    except (OSError, AttributeError) as exc:
        raise SpfqError(f"{path}: not a loadable spfq custom-op library ({exc})") from None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def copy_to(lib: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lib, dest)
    return dest
