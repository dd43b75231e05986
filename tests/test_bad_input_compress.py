"""Issue 12: hostile input to `spfq-deploy compress` ends with one `spfq-deploy: error:` line on
stderr, exit code 2 and no output file (never a traceback, never a silently wrong model).

Each test is named after the defect it pins down; every one failed before its fix."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

import spfq_deploy.compress
from spfq_deploy.pack import container

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


# ------------------------------------------------------------------ non-finite data and weights

def test_nan_in_calibration_npy_is_error_naming_batch_and_layer(model_file, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    x[70, 2] = np.nan  # batch 1 at the default batch size 64
    np.save(tmp_path / "nan.npy", x)
    out = tmp_path / "x.spfq"
    line = expect_clean_failure(capsys, out, "compress", model_file, "--calib", tmp_path / "nan.npy",
                                "-o", out, "-q", match=["batch 1", "layer '0'", "NaN", "nan.npy"])
    assert "sample 70" in line


def test_inf_in_calibration_function_is_error_naming_batch_and_layer(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--calib", f"{model_file}:with_inf",
                         "--batch-size", "32", "-o", out, "-q", match=["batch 2", "layer '0'", "Inf"])


def test_forward_overflow_is_error_naming_batch_and_layer(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    line = expect_clean_failure(capsys, out, "compress", f"{model_file}:overflow", "-o", out, "-q",
                                match=["batch 0", "layer '2'", "float model"])
    assert "calibration data is finite" in line


@pytest.mark.parametrize("factory,layer,what", [("nan_weight", "2", "NaN"), ("inf_bias", "0", "Inf")])
def test_non_finite_weight_is_error_naming_layer(model_file, tmp_path, capsys, factory, layer, what):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", f"{model_file}:{factory}", "-o", out, "-q",
                         match=[f"layer '{layer}'", what])


@pytest.mark.parametrize("factory,layer,what", [("huge_weights", "0", "float16"), ("tiny_weights", "2", "float16")])
def test_weights_beyond_float16_scales_are_error_naming_layer(model_file, tmp_path, capsys, factory, layer, what):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", f"{model_file}:{factory}", "-o", out, "-q",
                         match=[f"layer '{layer}'", what])


def test_a_near_dead_row_is_not_an_error(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    code, _, err = run_cli(capsys, "compress", f"{model_file}:dead_row", "-o", out, "-q")
    assert code == 0 and out.is_file() and err == "", err


def test_few_calibration_samples_warn_in_one_line(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    code, _, err = run_cli(capsys, "compress", model_file, "--calib", f"{model_file}:few", "-o", out, "-q")
    assert code == 0 and out.is_file()
    assert err.strip().splitlines() == [
        ("spfq-deploy: warning: only 12 calibration samples: quality collapses below ~64; "
         "use at least 256 (README)")]
    # 96 samples: no warning
    code, _, err = run_cli(capsys, "compress", model_file, "-o", out, "-q")
    assert code == 0 and err == ""


# ------------------------------------------------------------------ output paths, checked up front

@pytest.mark.parametrize("where", ["missing/r.json", "afile/r.json", "adir"])
def test_report_json_path_checked_before_compression(model_file, tmp_path, capsys, monkeypatch, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out = tmp_path / "x.spfq"
    no_compression(monkeypatch)
    expect_clean_failure(capsys, out, "compress", model_file, "--report-json", tmp_path / where, "-o", out, "-q",
                         match="--report-json")


@pytest.mark.parametrize("where,why", [("adir", "is a directory"), ("afile/x.spfq", "not a directory"),
                                       ("missing/x.spfq", "does not exist")])
def test_output_path_checked_before_compression(model_file, tmp_path, capsys, monkeypatch, where, why):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    no_compression(monkeypatch)
    out = tmp_path / where
    line = expect_clean_failure(capsys, out if where != "adir" else tmp_path / "adir" / "x.spfq",
                                "compress", model_file, "-o", out, "-q", match=why)
    assert "Traceback" not in line


def test_output_into_unwritable_folder(model_file, tmp_path, capsys, monkeypatch):
    """Root ignores chmod, so the check must try a write; simulated here by a failing probe."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    no_compression(monkeypatch)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "-o", out, "-q", match=["cannot write", "Permission"])


def test_report_json_write_failure_leaves_no_spfq(model_file, tmp_path, capsys, monkeypatch):
    """If the report cannot be written after compression, the .spfq does not appear either."""
    from spfq_deploy import atomic

    real = atomic.write_text

    def broken(path, text):
        if str(path).endswith("r.json"):
            raise OSError(28, "No space left on device")
        return real(path, text)
    monkeypatch.setattr(atomic, "write_text", broken)
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--report-json", tmp_path / "r.json", "-o", out, "-q",
                         match=["r.json", "No space"])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("clash", ["model", "report"])
def test_output_overwriting_an_input_or_the_other_output(model_file, tmp_path, capsys, monkeypatch, clash):
    no_compression(monkeypatch)
    before = model_file.read_text()
    if clash == "model":
        code, _, err = run_cli(capsys, "compress", model_file, "-o", model_file, "-q")
    else:
        out = tmp_path / "x.spfq"
        code, _, err = run_cli(capsys, "compress", model_file, "-o", out, "--report-json", out, "-q")
        assert not out.exists()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "spfq-deploy: error:" in err, err
    assert model_file.read_text() == before


def test_unknown_layout_checked_before_compression(model_file, tmp_path, capsys, monkeypatch):
    no_compression(monkeypatch)
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--layout", "bogus", "-o", out, "-q",
                         match="bogus")


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


@pytest.mark.parametrize("args,match", [
    (["--method", "gptq", "--damp", "abc"], "damp must be a number in (0, 1), got 'abc'"),
    (["--method", "gptq", "--damp", "0"], "damp must be"),
    (["--method", "gptq", "--damp", "1"], "damp must be"),
    (["--method", "gptq", "--damp", "nan"], "damp must be"),
    (["--method", "gpfq", "--act-order"], "apply to method gptq only, not gpfq"),
    (["--method", "rtn", "--damp", "0.1"], "apply to method gptq only, not rtn"),
    (["--damp", "0.1"], "apply to method gptq only, not gpfq"),
    (["--method", "gptq", "--scale", "minmax"], "scale must be one of search, mse"),
    (["--method", "gptq", "--scale", "mse", "--c-grid", "0.5,1"], "takes no c_grid"),
])
def test_gptq_and_scale_options(model_file, tmp_path, capsys, monkeypatch, args, match):
    no_compression(monkeypatch)
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, *args, "-o", out, "-q", match=match)


def test_exclude_matching_nothing(model_file, tmp_path, capsys):
    """A typo in --exclude would silently compress the layer meant to stay float."""
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--exclude", "classifer", "-o", out, "-q",
                         match="classifer")


# ------------------------------------------------------------------ calibration files and functions

def _write(tmp_path, name):
    p = tmp_path / name
    if name == "strings.npy":
        np.save(p, np.array(["a", "b"]))
    elif name == "objects.npy":
        np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif name == "empty.npy":
        np.save(p, np.zeros((0, 8), np.float32))
    elif name == "scalar.npy":
        np.save(p, np.float32(3.0))
    elif name == "noarrays.npz":
        np.savez(p)
    elif name == "strings.npz":
        np.savez(p, a=np.array(["x", "y"]))
    elif name == "scalars.npz":
        np.savez(p, a=np.float32(1), b=np.float32(2))
    elif name in ("text.npy", "text.npz"):
        p.write_text("hello, not numpy")
    return p


@pytest.mark.parametrize("name,problem", [
    ("strings.npy", "holds strings"), ("objects.npy", "Python objects"), ("empty.npy", "no samples"),
    ("scalar.npy", "is a scalar"), ("noarrays.npz", "no arrays"), ("strings.npz", "holds strings"),
    ("scalars.npz", "is a scalar"), ("text.npy", "not a .npy file"), ("text.npz", "not a .npz file")])
def test_unusable_calibration_file_names_file_and_problem(model_file, tmp_path, capsys, name, problem):
    p = _write(tmp_path, name)
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--calib", p, "-o", out, "-q",
                         match=[name, problem])


@pytest.mark.parametrize("fn,problem", [
    ("strings", "is a str"), ("empty_batch", "no samples"), ("empty_list", "is empty"),
    ("empty_tuple_batch", "no tensor"), ("raises", "no data today"), ("exits_in_calibration", "sys.exit(3)")])
def test_unusable_calibration_function_names_it_and_the_problem(model_file, tmp_path, capsys, fn, problem):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", model_file, "--calib", f"{model_file}:{fn}", "-o", out, "-q",
                         match=[fn, problem])


def test_model_factory_calling_sys_exit(model_file, tmp_path, capsys):
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", f"{model_file}:exits", "-o", out, "-q",
                         match=["exits", "sys.exit(0)"])


def test_model_file_calling_sys_exit_on_import(tmp_path, capsys):
    bad = tmp_path / "quits.py"
    bad.write_text("import sys\nsys.exit(0)\n")
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", bad, "-o", out, "-q", match=["quits.py", "sys.exit(0)"])


def test_npz_of_several_inputs_honours_batch_size(model_file, tmp_path, capsys):
    """Several .npz arrays used to be batched by 64 whatever --batch-size said."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((80, 8)).astype(np.float32), rng.standard_normal((80, 8)).astype(np.float32)
    x[20, 0] = np.nan
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", f"{model_file}:two_inputs", "--calib", tmp_path / "xy.npz",
                         "--batch-size", "16", "-o", out, "-q", match=["batch 1", "layer 'a'", "NaN"])
    x[20, 0] = 0.0
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    code, _, err = run_cli(capsys, "compress", f"{model_file}:two_inputs", "--calib", tmp_path / "xy.npz",
                           "--batch-size", "16", "-o", out, "-q", "--report-json", tmp_path / "r.json")
    assert code == 0, err
    assert {r["rows"] for r in json.loads((tmp_path / "r.json").read_text())} == {80}
    assert container.read_header(out)["meta"]["calibration_samples"] == 80
