"""compress under torchrun (compress/distributed.py): 2 processes on localhost write the same
bytes as one process with the same threads per process; a failure on one rank stops every
rank with rank 0's one-line error (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _compress(out: Path, args: list[str], ranks: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spfq_deploy", "compress", *args, "--threads", "1", "-q", "-o", str(out)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "spfq_deploy", *cmd[3:]]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


CASES = {
    "mnist-4bit": ["examples/mnist_cnn.py", "--bits", "4"],
    "mnist-ternary-spfq-sparse": ["examples/mnist_cnn.py", "--bits", "ternary", "--method", "spfq",
                                  "--sparsity", "0.5"],
    # 32 samples: one leaf, so rank 1 runs no batch; grouped and depthwise convs split by groups
    "zoo-replay": ["tests/zoo_model.py", "--bits", "3", "--engine", "replay"],
    # --bits-budget: the measurement pass and the final pass both split over the ranks
    "zoo-bits-budget": ["tests/zoo_model.py", "--bits-budget", "3", "--bits-candidates", "1,ternary,4,8"],
    "zoo-gptq-act-order-sparse": ["tests/zoo_model.py", "--bits", "4", "--method", "gptq", "--act-order",
                                  "--sparsity", "0.3"],
    # group-wise scales (per-column scales in the C loop, rows split over the ranks)
    "zoo-groups-gpfq-sparse": ["tests/zoo_model.py", "--bits", "4", "--group-size", "32", "--sparsity", "0.3"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_write_the_bytes_of_one_process(tmp_path, case):
    one, two = tmp_path / "one.spfq", tmp_path / "two.spfq"
    r1 = _compress(one, CASES[case], 1)
    assert r1.returncode == 0, r1.stderr
    r2 = _compress(two, CASES[case], 2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "ranks: 2 (torch.distributed, gloo)" in r2.stdout
    assert one.read_bytes() == two.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.spfq", "two.spfq"]  # no side files left


def test_a_bad_batch_on_rank_1_stops_both_with_one_error(tmp_path):
    import examples.mnist_cnn as mnist

    x = mnist.calibration(256).numpy().copy()
    x[250, 0, 3, 3] = np.nan  # the last batch: rank 1's leaf
    calib = tmp_path / "calib.npy"
    np.save(calib, x)
    out = tmp_path / "m.spfq"
    r = _compress(out, ["examples/mnist_cnn.py", "--bits", "4", "--calib", str(calib)], 2)
    assert r.returncode != 0 and not out.exists()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("spfq-deploy: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "calibration batch 3" in errors[0] and "NaN" in errors[0] and "sample 250" in errors[0]
    # torchrun itself reports a failed child with its own traceback; the ranks print none
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("[rank") and "Traceback" in ln]
