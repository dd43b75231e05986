"""Building the CUDA kernel library (kernels/cuda/*.cu -> libspfq_cuda.so) with nvcc, per the
[cuda] table of a GPU target (targets/cuda.toml), with caching.

Two builds from the same sources: the GPU library (SASS for every `gencode` of the target), and
the host emulation (-DSPFQ_CUDA_EMULATE: same ABI, host memory, each kernel's per-lane code run
on the CPU) that lets tests check the kernels' arithmetic where there is no GPU. Build folders
under build/cuda/ are keyed by a hash of nvcc, flags and source bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import SpfqError
from ...targets import ROOT, Target, get_target
from ..native_build import run

CUDA_SRC = ROOT / "kernels" / "cuda"
LIB_NAME = "libspfq_cuda.so"
EMULATION_NAME = "libspfq_cuda_emulation.so"


def sources() -> list[Path]:
    """Every file whose bytes change the library."""
    return sorted(CUDA_SRC.glob("*.cu")) + sorted(CUDA_SRC.glob("*.cuh")) + sorted(CUDA_SRC.glob("*.h")) + \
        [ROOT / "kernels" / "include" / "spfq_kernels.h"]


def find_nvcc(target: Target) -> str:
    """The nvcc to use: $NVCC, the target's (PATH), /usr/local/cuda/bin; SpfqError when none."""
    name = target.cuda.get("nvcc", "nvcc")
    for cand in (os.environ.get("NVCC"), shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    pkg = target.tools.get("nvcc")
    raise SpfqError(f"target {target.name}: 'nvcc' not found (PATH, $NVCC, /usr/local/cuda/bin)"
                    + (f" (Debian: apt-get install {pkg}, or NVIDIA's CUDA toolkit)" if pkg else ""))


def nvcc_version(nvcc: str) -> str:
    """'13.0.88' (the release line of nvcc --version), or 'unknown'."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else "unknown"


def arch_list(target: Target) -> list[str]:
    """['sm_80', 'sm_90'] from the target's gencode entries."""
    return [m.group(1) for g in target.cuda.get("gencode", []) for m in [re.search(r"code=(\w+)", g)] if m]


def build(target: Target | None = None, emulate: bool = False, out_dir: Path | None = None) -> Path:
    """Compile (or reuse) the library; returns the .so path."""
    target = target or get_target("cuda")
    if not target.cuda:
        raise SpfqError(f"target {target.name}: no [cuda] table in targets/{target.name}.toml (not a GPU target)")
    nvcc = find_nvcc(target)
    flags = list(target.cuda.get("nvcc_flags", ["-shared", "-Xcompiler", "-fPIC", "-O3"]))
    if emulate:
        flags += ["-DSPFQ_CUDA_EMULATE"]
        name = EMULATION_NAME
    else:
        for g in target.cuda.get("gencode", []):
            flags += ["-gencode", g]
        flags += [f"-DSPFQ_CUDA_ARCH_LIST=\" {' '.join(arch_list(target))}\""]
        name = LIB_NAME
    h = hashlib.sha256(" ".join([nvcc, nvcc_version(nvcc)] + flags).encode())
    for src in sources():
        h.update(src.name.encode() + src.read_bytes())
    folder = Path(out_dir or ROOT / "build" / "cuda") / h.hexdigest()[:16]
    lib = folder / name
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        staged = Path(tmp) / name
        cu = [str(s) for s in sorted(CUDA_SRC.glob("*.cu"))]
        run([nvcc, *flags, "--threads", "0", *cu, "-o", str(staged)],
            f"nvcc ({'host emulation' if emulate else 'GPU library'} of kernels/cuda)")
        os.replace(staged, lib)
    return lib
