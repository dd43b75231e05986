"""TVM libraries: same input, same bytes (issue 12, defect 8).

(A) Two `spfq-deploy export --format tvm --target arm64` runs of one .spfq file, in separate
processes with different PYTHONHASHSEED (and so different heap layouts), write byte-identical
model.x86_64.so, model.arm64.so, run_tvm.py and (SOURCE_DATE_EPOCH fixed) manifest.tvm.json.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["features.0", "features.3", "classifier.0", "classifier.2"]
TVM_FILES = ["model.x86_64.so", "model.arm64.so", "run_tvm.py", "manifest.tvm.json"]
ARM64_PYTHON = ROOT / "build" / "arm64-python" / "python3"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _export_process(spfq: Path, out: Path, seed: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=seed, SOURCE_DATE_EPOCH="1700000000")
    r = subprocess.run([sys.executable, "-m", "spfq_deploy.cli", "export", str(spfq), "-o", str(out),
                        "--format", "tvm", "--target", "arm64"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One 1-bit MNIST file exported twice (two processes, PYTHONHASHSEED 1 and 2)."""
    from test_validate_integrity import mnist_1bit_file

    base = tmp_path_factory.mktemp("tvm_integrity")
    mnist_1bit_file(base)
    _export_process(base / "m.spfq", base / "a", "1")
    _export_process(base / "m.spfq", base / "b", "2")
    return base / "a", base / "b"


# ---------------------------------------------------------------- (A) same input, same bytes

def test_two_exports_in_separate_processes_are_byte_identical(exports):
    a, b = exports
    differ = [f for f in TVM_FILES if _sha(a / f) != _sha(b / f)]
    assert differ == [], f"{differ} differ between two exports of the same file"
    # the build id is the linker's content hash (sha1), not random: the same on both
    notes = {subprocess.run(["readelf", "-n", str(d / "model.x86_64.so")], capture_output=True, text=True).stdout
             for d in exports}
    assert len(notes) == 1 and "Build ID" in notes.pop()


def test_shape_functions_store_in_slot_order():
    """The only run-to-run difference TVM 0.27 leaves: VMShapeLower emits a shape function's
    stores in the order of an address-hashed map. After the export's Relax pipeline they are in
    heap-slot order, and a store another store reads is never moved."""
    from tvm import tirx
    from tvm.script import tirx as T

    from spfq_deploy.export.tvm import reproducible

    @T.prim_func(private=True)
    def independent(H: T.Buffer((T.int64(5),), "int64")):
        H[T.int64(3)] = T.int64(4) * H[T.int64(0)]
        H[T.int64(1)] = H[T.int64(0)] + T.int64(2)
        H[T.int64(2)] = T.int64(512) * H[T.int64(0)]

    @T.prim_func(private=True)
    def dependent(H: T.Buffer((T.int64(5),), "int64")):
        H[T.int64(3)] = T.int64(4) * H[T.int64(0)]
        H[T.int64(1)] = H[T.int64(3)] + T.int64(2)

    got = reproducible.sorted_stores(independent)
    assert [int(s.indices[0]) for s in got.body.seq] == [1, 2, 3]
    assert reproducible.sorted_stores(got) is None and reproducible.sorted_stores(dependent) is None
    assert isinstance(got.body, tirx.SeqStmt)
