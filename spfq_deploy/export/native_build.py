"""Compiling the C kernels (kernels/src/*.c) and a runtime wrapper for a target, with caching.

The ONNX Runtime custom-op library (ort_library.py) and the TVM export (tvm_library.py) link the
same kernel objects; both key their build folder by a hash of the compilers, flags and source
bytes, so a rebuild happens only when one of them changes.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from ..errors import SpfqError
from ..targets import ROOT, Target

KERNEL_SRC = ROOT / "kernels" / "src"
KERNEL_INCLUDE = ROOT / "kernels" / "include"
# compression-time code in the kernel library (the package's build has it); exported runtimes
# never call it, so it is not compiled into them
COMPRESS_ONLY = frozenset({"path_following.c"})


def _deploy_c_files() -> list[Path]:
    return [p for p in sorted(KERNEL_SRC.glob("*.c")) if p.name not in COMPRESS_ONLY]


def kernel_sources() -> list[Path]:
    """Every file whose bytes change the kernel objects (C files and headers)."""
    include = sorted(KERNEL_INCLUDE.glob("*.h")) + sorted(KERNEL_INCLUDE.glob("*.hpp"))
    return _deploy_c_files() + sorted(KERNEL_SRC.glob("*.h")) + include


def run(cmd: list[str], what: str) -> None:
    """Run a compiler command; a failure is one SpfqError line (the compiler's last line)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SpfqError(f"{what} failed: {detail[-1] if detail else 'exit ' + str(proc.returncode)}")


def build_hash(target: Target, flags: list[str], sources: list[Path], extra: list[str] = ()) -> str:
    """16 hex digits naming one build: compilers, flags, extra strings, source names and bytes."""
    h = hashlib.sha256(" ".join([target.cc, target.cxx] + list(flags) + list(extra)).encode())
    for src in sources:
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:16]


def compile_kernels(target: Target, flags: list[str], out_dir: Path) -> list[Path]:
    """Compile kernels/src/*.c (but COMPRESS_ONLY) with the target's C compiler into out_dir."""
    objs = []
    for src in _deploy_c_files():
        obj = Path(out_dir) / (src.stem + ".o")
        run([target.cc, *flags, "-std=c11", "-I", str(KERNEL_INCLUDE), "-I", str(KERNEL_SRC),
             "-c", str(src), "-o", str(obj)], f"compiling {src.name} for {target.name}")
        objs.append(obj)
    return objs
