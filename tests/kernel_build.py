"""Shared by the kernel tests that call range functions directly: CPU feature checks and
compiling a few kernels/src files into a throwaway shared library."""

from __future__ import annotations

import ctypes as C
import os
import platform
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INC, SRC = ROOT / "kernels" / "include", ROOT / "kernels" / "src"


def cpu_has(*flags: str) -> bool:
    """True when /proc/cpuinfo lists every flag (x86-64 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(flags) <= set(line.split(":", 1)[-1].split())


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc and shutil.which(cc), "no C compiler (the package build needs one: apt-get install gcc)"
    return cc


def build_library(sources, out: Path, flags) -> C.CDLL:
    """cc -shared -fPIC FLAGS -I include -I src SOURCES -o out, then load it."""
    cmd = [compiler(), *flags, "-shared", "-fPIC", f"-I{INC}", f"-I{SRC}", *map(str, sources), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return C.CDLL(str(out))


def env_flags() -> list[str]:
    """-O level from SPFQ_TEST_OPT and sanitizer from SPFQ_TEST_SANITIZE (address | undefined)."""
    flags = [os.environ.get("SPFQ_TEST_OPT", "-O2"), "-std=c11"]
    sanitize = os.environ.get("SPFQ_TEST_SANITIZE")
    if sanitize == "address":
        flags += ["-g", "-O1", "-fsanitize=address", "-fno-omit-frame-pointer"]
    elif sanitize == "undefined":
        flags += ["-g", "-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
    return flags
