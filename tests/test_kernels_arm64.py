"""The C kernel test program (kernels/tests/test_kernels.c) on arm64 and on this host.

kernels/tests/run_arm64.sh cross-compiles kernels/src/*.c with aarch64-linux-gnu-gcc and runs
the static binary under qemu-aarch64 (baseline NEON with every ISA, then the sdot build with
NEON only); `--host` builds and runs the same program natively (the AVX2 path on x86-64). Each
run prints "N passed, M failed". `make test` installs the cross toolchain and qemu, so missing
tools are a failure naming the Debian packages, never a skip.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kernels" / "tests" / "run_arm64.sh"
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)


@pytest.mark.parametrize("target", ["arm64", "host"])
def test_kernel_program(target, tmp_path):
    args = ["--host"] if target == "host" else []
    proc = subprocess.run(["bash", str(SCRIPT), *args, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 2:
        pytest.fail(f"tools missing for the {target} kernel test: {out.splitlines()[-1] if out else '?'}")
    assert proc.returncode != 3, f"build failed:\n{out[-6000:]}"
    runs = [(int(p), int(f)) for p, f in SUMMARY.findall(proc.stdout)]
    expected = 2 if target == "arm64" else 1  # arm64: baseline + dotprod builds
    assert len(runs) == expected, f"expected {expected} summary lines:\n{out[-6000:]}"
    for passed, failed in runs:
        assert failed == 0 and passed > 0, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
