"""Loading and running a TVM-exported library on this host (validate, bench, tests), and what
a library says about itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import SpfqError
from .compile import reason

ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


def library_name(target: str) -> str:
    return f"model.{target}.so"


def elf_machine(path: str | Path) -> str:
    """'x86_64' / 'aarch64' from an ELF header (what the library was compiled for)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20:
        raise SpfqError(f"{path}: not an ELF file")
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(code, f"e_machine {code}")


def load(path: str | Path):
    """(VirtualMachine, library module) of a host-loadable model.<target>.so."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        lib = tvm.runtime.load_module(str(path))
    except Exception as exc:
        raise SpfqError(f"{path}: cannot load the TVM library ({reason(exc)})") from None
    return VirtualMachine(lib, tvm.cpu()), lib


def run(vm, *arrays) -> list[np.ndarray]:
    """The model's outputs for numpy inputs (a tuple result flattened)."""
    import tvm

    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    flat, stack = [], [out]
    while stack:
        v = stack.pop(0)
        if hasattr(v, "numpy"):
            flat.append(v.numpy())
        else:
            stack[0:0] = list(v)
    return flat


def kernel_calls(lib) -> int:
    """GEMM calls the packed kernels made in this process (all libraries of this build share it)."""
    return int(lib.get_function("spfq_tvm_calls", query_imports=True)())


def library_info(path: str | Path) -> str:
    _, lib = load(path)
    return str(lib.get_function("spfq_tvm_library_info", query_imports=True)())
