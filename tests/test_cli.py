"""The command line: a full compress -> inspect -> reference round trip on a small model, and
bad input giving one clear error line, exit code 2 and no output file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_cli

from spfq_deploy.compress import compress_model
from spfq_deploy.modelspec import load_model
from spfq_deploy.pack import container
from spfq_deploy.reference import load_reference

MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    def calibration():
        g = torch.Generator().manual_seed(1)
        return torch.randn(96, 1, 6, 6, generator=g)

    def broken():
        raise RuntimeError("weights file missing")
''')


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "tiny.py"
    p.write_text(MODEL_SRC)
    return p


def test_compress_inspect_reference_round_trip(model_file, tmp_path, capsys):
    out = tmp_path / "m.spfq"
    code, stdout, _ = run_cli(capsys, "compress", model_file, "--bits", "4", "--sparsity", "0.5",
                              "-o", out, "-q", "--report-json", tmp_path / "r.json")
    assert code == 0 and out.is_file()
    assert "rel err" in stdout and "bits/weight" in stdout
    # the calibration's spread, printed and recorded (96 samples in 64-sample batches)
    assert "calibration: 96 samples in 2 batches; input 0 (1, 6, 6) every sample" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in report] == ["0", "3", "6", "8"]
    assert all(abs(r["sparsity"] - 0.5) <= 0.01 for r in report)

    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0
    assert "bits/weight" in stdout and "x fp32" in stdout and "bytes on disk" in stdout
    assert "calibration: 96 samples in 2 batches" in stdout

    # the file alone rebuilds exactly the model that compress evaluated
    model, module = load_model(str(model_file))
    res = compress_model(model, module.calibration(), bits=4, sparsity=0.5, progress=False)
    ref = load_reference(out)
    x = module.calibration()[:8]
    with torch.no_grad():
        assert torch.equal(ref(x), res.reference(x))
        assert not torch.equal(ref(x), model(x))


def test_default_calibration_from_model_file(model_file, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "compress", model_file, "--bits", "1", "-o", tmp_path / "b.spfq", "-q")
    assert code == 0
    header = container.read_header(tmp_path / "b.spfq")
    # every row here (K = 9, 9, 288, 16) is not a whole number of 64-bit words: no per-row padding
    assert {e["layout"] for e in header["layers"].values()} == {"sign_rows"}
    assert header["format_version"] == 2


def expect_clean_failure(capsys, out: Path, *argv, match: str):
    code, stdout, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("spfq-deploy: error:"), err
    assert match in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_failing_factory(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", f"{model_file}:broken", "-o", out, "-q",
                         match="model factory")


def test_missing_model_file(tmp_path, capsys):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", tmp_path / "nope.py", "-o", out, "-q", match="no such file")


def test_wrong_calibration_shape(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    np.save(tmp_path / "bad.npy", np.zeros((16, 3, 6, 6), np.float32))
    expect_clean_failure(capsys, out, "compress", model_file, "--calib", tmp_path / "bad.npy", "-o", out, "-q",
                         match="does not fit the model")


def test_unsupported_layer_named(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--include", "2", "-o", out, "-q",
                         match="ReLU")


def test_missing_output_directory(model_file, tmp_path, capsys):
    out = tmp_path / "no" / "x.spfq"
    code, _, err = run_cli(capsys, "compress", model_file, "-o", out, "-q")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.fixture()
def saved(model_file, tmp_path, capsys):
    out = tmp_path / "m.spfq"
    assert run_cli(capsys, "compress", model_file, "--bits", "2", "-o", out, "-q")[0] == 0
    return out


def test_truncated_file(saved, capsys):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    code, _, err = run_cli(capsys, "inspect", saved)
    assert code == 2 and "truncated" in err and len(err.strip().splitlines()) == 1


def test_corrupted_file(saved, capsys):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    saved.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "inspect", saved)
    assert code == 2 and "checksum" in err and len(err.strip().splitlines()) == 1


def test_future_version(saved, capsys):
    data = saved.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, edits = re.subn(rb'"format_version":"[12]"', b'"format_version":"9"', data[8:8 + n])
    assert edits == 1 and len(header) == n
    saved.write_bytes(data[:8] + header + data[8 + n:])
    code, _, err = run_cli(capsys, "inspect", saved)
    assert code == 2 and "newer" in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_code(tmp_path):
    """The installed entry point really exits 2 with one line (not a traceback)."""
    bad = tmp_path / "bad.spfq"
    bad.write_bytes(b"not a model at all")
    proc = subprocess.run([sys.executable, "-m", "spfq_deploy.cli", "inspect", str(bad)],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"spfq-deploy: error: {bad}: not a .spfq file"]
