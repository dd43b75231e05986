"""Issue 12: hostile input to `spfq-deploy compress` ends with one `spfq-deploy: error:` line on
stderr, exit code 2 and no output file (never a traceback, never a silently wrong model).

Each test is named after the defect it pins down; every one failed before its fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import spfq_deploy.compress
from spfq_deploy.cli import main

MODEL_SRC = textwrap.dedent('''
    import sys
    import torch
    from torch import nn

    class Boom(nn.Module):
        """A forward that overflows float32 (finite weights, finite data)."""
        def forward(self, x):
            return x * 1e39

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    def two_inputs():
        torch.manual_seed(0)
        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)
            def forward(self, x, y):
                return self.a(x) + self.b(y)
        return Two().eval()

    def overflow():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), Boom(), nn.Linear(16, 4)).eval()

    def nan_weight():
        m = build()
        with torch.no_grad():
            m[2].weight[1, 3] = float("nan")
        return m

    def inf_bias():
        m = build()
        with torch.no_grad():
            m[0].bias[2] = float("inf")
        return m

    def huge_weights():
        m = build()
        with torch.no_grad():
            m[0].weight.mul_(1e7)  # 4-bit scale ~ 1e7 / 7: beyond float16
        return m

    def tiny_weights():
        m = build()
        with torch.no_grad():
            m[2].weight.mul_(1e-9)  # 4-bit scale ~ 1e-10: float16 rounds it to 0
        return m

    def dead_row():
        m = build()
        with torch.no_grad():
            m[0].weight[3].mul_(1e-9)  # one near-dead neuron: its float16 scale is 0, harmless
        return m

    def exits():
        sys.exit(0)

    def calibration():
        return torch.randn(96, 8, generator=torch.Generator().manual_seed(1))

    def few():
        return torch.randn(12, 8, generator=torch.Generator().manual_seed(1))

    def with_inf():
        x = calibration()
        x[80, 5] = float("inf")
        return x

    def strings():
        return ["a", "b"]

    def empty_batch():
        return [torch.zeros(0, 8)]

    def empty_list():
        return []

    def empty_tuple_batch():
        return [()]

    def raises():
        raise RuntimeError("no data today")

    def exits_in_calibration():
        sys.exit(3)
''')


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "tiny.py"
    p.write_text(MODEL_SRC)
    return p


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def expect_clean_failure(capsys, out: Path, *argv, match, argparse_error=False):
    """Exit 2, one error line (argparse's own usage error: its last line) naming `match`, no output."""
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    if argparse_error:
        assert lines and "error:" in lines[-1], err
        line = lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("spfq-deploy: error:"), err
        line = lines[0]
    for m in [match] if isinstance(match, str) else match:
        assert m in line, line
    assert not out.exists()
    folder = out.parent if out.parent.is_dir() else Path(str(out.parent)).parent
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".staged"))]
    assert not leftovers, leftovers
    return line


def no_compression(monkeypatch):
    """Checks that must happen before the (slow) compression starts."""
    def fail(*a, **k):
        raise AssertionError("compression started although the arguments were bad")
    monkeypatch.setattr(spfq_deploy.compress, "compress_model", fail)


# ------------------------------------------------------------------ options

@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_zero_or_negative(model_file, tmp_path, capsys, value):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--batch-size", value, "-o", out, "-q",
                         match="--batch-size", argparse_error=True)


@pytest.mark.parametrize("grid", ["nan", "1,inf", "0.5,nan"])
def test_c_grid_non_finite(model_file, tmp_path, capsys, grid):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--c-grid", grid, "-o", out, "-q",
                         match="--c-grid", argparse_error=True)
