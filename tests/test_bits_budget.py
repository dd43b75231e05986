"""`compress --bits-budget B` (issue 16): per-layer widths from measured error curves, the file's
bits/weight (scales and padding included, as `inspect` counts them) <= B and within 0.02 of it
where the layer sizes allow; the allocation is the brute-force optimum of its objective; bad
input is one line; a mixed-width file exports to ONNX and validates."""

from __future__ import annotations

import itertools
import json
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
from cli_run import run_cli
from torch import nn

from spfq_deploy.cli import main
from spfq_deploy.compress import CompressConfig, budget, compress_model
from spfq_deploy.errors import SpfqError
from spfq_deploy.pack import container

MLP_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    DIMS = [24, 80, 40, 72, 56, 64, 32, 48, 10]  # eight Linear layers of unlike sizes

    def build():
        torch.manual_seed(0)
        layers = []
        for a, b in zip(DIMS, DIMS[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers[:-1]).eval()

    def calibration():
        return torch.randn(128, 24, generator=torch.Generator().manual_seed(1))
''')
LAYERS = ["0", "2", "4", "6", "8", "10", "12", "14"]


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("budget_model") / "mlp.py"
    p.write_text(MLP_SRC)
    return p


@pytest.fixture(scope="module")
def budget_run(mlp_file, tmp_path_factory):
    """One CLI run at --bits-budget 2.5 (rtn: the allocation, not the method, is under test)."""
    base = tmp_path_factory.mktemp("budget_run")
    out, rep = base / "m.spfq", base / "m.json"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compress", str(mlp_file), "--bits-budget", "2.5", "--method", "rtn", "-q", "-o", str(out),
                   "--report-json", str(rep)])
    assert rc == 0
    return out, json.loads(rep.read_text()), buf.getvalue()


# ------------------------------------------------------------------ allocation against brute force

def _brute(curves, lo_bits, hi_bits):
    """(least objective, its widths) over every assignment with lo_bits <= total <= hi_bits."""
    names = list(curves)
    best = (np.inf, None)
    for combo in itertools.product(*(list(curves[n]) for n in names)):
        total = sum(curves[n][w][1] for n, w in zip(names, combo))
        if lo_bits <= total <= hi_bits:
            obj = sum(curves[n][w][0] ** 2 for n, w in zip(names, combo))
            if obj < best[0]:
                best = (obj, dict(zip(names, combo)))
    return best


def _band(curves, B, close):
    """The totals allocate() may choose from: <= B * weights and >= (min(B, fullest) - close) * weights."""
    names = list(curves)
    weights = sum(next(iter(curves[n].values()))[2] for n in names)
    cap = int(Fraction(repr(B)) * weights)
    totals = [sum(curves[n][w][1] for n, w in zip(names, combo))
              for combo in itertools.product(*(list(curves[n]) for n in names))]
    fullest = max((t for t in totals if t <= cap), default=None)
    if fullest is None:
        return None, cap, None, weights
    lo = 0 if close is None else min(Fraction(repr(B)) * weights, fullest + Fraction(repr(close)) * weights) \
        - Fraction(repr(close)) * weights
    return lo, cap, fullest, weights


def _random_curves(seed, layers=4):
    """Curves of made-up layers: errors falling with width (not always strictly), costs from
    pack/ for random shapes, so ties, flat stretches and uneven sizes all occur."""
    rng = np.random.default_rng(seed)
    curves = {}
    for i in range(layers):
        shape = (int(rng.integers(2, 40)), int(rng.integers(3, 90)))
        err = 1.0
        curves[f"l{i}"] = {}
        for w in budget.CANDIDATES:
            err *= float(rng.uniform(0.3, 1.0))
            bits, weights = budget.storage_bits(f"l{i}", "linear", shape, w)
            curves[f"l{i}"][budget.label(w)] = (err, bits, weights)
    return curves


@pytest.mark.parametrize("close", [None, budget.CLOSE])
def test_allocation_is_the_brute_force_optimum_on_random_curves(close):
    checked = 0
    for seed in range(25):
        curves = _random_curves(seed)
        for B in (1.3, 1.9, 2.5, 3.0, 3.7, 5.0, 7.5):
            lo, cap, fullest, weights = (None,) * 4
            lowest = sum(min(c[1] for c in curves[n].values()) for n in curves)
            if lowest > int(Fraction(repr(B)) * sum(next(iter(c.values()))[2] for c in curves.values())):
                with pytest.raises(SpfqError, match="no assignment"):
                    budget.allocate(curves, B, close)
                continue
            lo, cap, fullest, weights = _band(curves, B, close)
            a = budget.allocate(curves, B, close)
            want, _ = _brute(curves, lo, cap)
            assert a.cell_bits == 1 and a.total_bits <= cap and a.total_bits >= lo
            assert a.total_bits == sum(curves[n][a.widths[n]][1] for n in curves)
            assert a.objective == pytest.approx(want, rel=1e-12, abs=1e-15), (seed, B)
            assert a.closest_bits == fullest
            if close is not None and fullest >= (B - close) * weights:
                assert a.bits_per_weight >= B - close - 1e-12
            checked += 1
    assert checked > 100


def test_rounded_cells_keep_the_budget_and_lose_at_most_the_stated_bits():
    """Budgets over max_cells bits count in cells of u bits (costs rounded up): the file still
    keeps the budget, and the result is at least as good as the exact optimum under a budget
    layers * u bits smaller (the documented bound)."""
    for seed in range(10):
        curves = _random_curves(seed, layers=4)
        for B in (2.5, 4.0):
            lo, cap, _, _ = _band(curves, B, None)
            a = budget.allocate(curves, B, None, max_cells=50)
            assert a.cell_bits > 1 and a.total_bits <= cap
            bound, _ = _brute(curves, 0, cap - len(curves) * a.cell_bits)
            assert a.objective <= bound + 1e-12


def test_a_budget_at_the_cheapest_assignment_survives_rounded_cells():
    """At exactly the cheapest widths' bits, rounding every cost up would leave no assignment:
    the cheapest one is still returned (it fits exactly)."""
    curves = _random_curves(3, layers=4)
    weights = sum(next(iter(c.values()))[2] for c in curves.values())
    lowest = sum(min(p[1] for p in c.values()) for c in curves.values())
    B = (lowest + 0.5) / weights  # the budget holds exactly the cheapest bits
    assert int(Fraction(repr(B)) * weights) == lowest
    a = budget.allocate(curves, B, max_cells=7)
    assert a.total_bits == lowest and a.cell_bits > 1
    assert a.widths == {n: "1" for n in curves}
    with pytest.raises(SpfqError, match="no assignment"):
        budget.allocate(curves, B * 0.99, max_cells=7)


@pytest.fixture(scope="module")
def measured():
    """Curves measured by the engine on a 4-layer model (every candidate, rtn)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 48),
                          nn.ReLU(), nn.Linear(48, 6)).eval()
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(2))
    curves, seconds = budget.measure(model, x, CompressConfig(method="rtn"), budget.CANDIDATES, progress=False)
    return model, x, curves


def test_measured_curves_hold_every_width_with_packed_bits(measured):
    model, x, curves = measured
    assert list(curves) == ["0", "2", "4", "6"]
    for name, curve in curves.items():
        assert list(curve) == ["1", "ternary", "2", "3", "4", "8"]
        shape = tuple(dict(model.named_modules())[name].weight.shape)
        for w, (err, bits, weights) in curve.items():
            assert (bits, weights) == budget.storage_bits(name, "linear", shape, w)
            assert 0 <= err < 1.5
        assert curve["8"][0] < curve["4"][0] < curve["3"][0] < curve["ternary"][0] < curve["1"][0]
        assert curve["ternary"] == curve["2"]  # same levels {-1, 0, 1}, both 2 bits per weight
    # every layer's curve is measured on float inputs: the first layer's 3-bit point is what a
    # uniform 3-bit compress reports for it (same Grams, same config)
    res = compress_model(model, x, CompressConfig(bits=3, method="rtn"), progress=False)
    assert res.report[0].rel_error == curves["0"]["3"][0]


def test_upstream_curves_are_measured_on_the_compressed_outputs(measured):
    """measure(upstream=widths): each layer's points are those a compress with these widths for
    the layers before it reports (the same X~), the first layer's are the float-input ones."""
    model, x, curves = measured
    cfg = CompressConfig(method="rtn")
    up = {"0": 3, "2": 4, "4": 1}
    curves_up, _ = budget.measure(model, x, cfg, (1, 4), upstream=up, progress=False)
    assert curves_up["0"] == {w: curves["0"][w] for w in ("1", "4")}
    res = compress_model(model, x, CompressConfig(method="rtn", layer_bits=dict(up, **{"6": 1})), progress=False)
    got = {r.name: r.rel_error for r in res.report}
    assert curves_up["2"]["4"][0] == got["2"] and curves_up["4"]["1"][0] == got["4"]
    assert curves_up["6"]["1"][0] == got["6"]
    assert curves_up["4"]["1"][0] > curves["4"]["1"][0]  # the upstream error shows


@pytest.mark.parametrize("B", [2.0, 2.5, 3.0, 4.5, 6.0])
def test_allocation_on_measured_curves_is_the_brute_force_optimum(measured, B):
    _, _, curves = measured
    lo, cap, fullest, weights = _band(curves, B, budget.CLOSE)
    a = budget.allocate(curves, B)
    want, _ = _brute(curves, lo, cap)
    assert a.total_bits <= cap and a.objective == pytest.approx(want, rel=1e-12)
    assert a.bits_per_weight <= B
    if fullest >= (B - budget.CLOSE) * weights:
        assert a.bits_per_weight >= B - budget.CLOSE


def test_curves_measured_once_serve_several_budgets(measured, tmp_path):
    """compress_with_budget(curves=...) gives the very file of a run that measures itself."""
    model, x, curves = measured
    cfg = CompressConfig(method="rtn")
    for B in (2.5, 3.0):
        own = budget.compress_with_budget(model, x, cfg, B, progress=False)
        reused = budget.compress_with_budget(model, x, cfg, B, curves=curves, progress=False)
        assert own.model.meta["bits_budget"]["widths"] == budget.allocate(curves, B).widths
        container.save(tmp_path / "own.spfq", own.model)
        container.save(tmp_path / "reused.spfq", reused.model)
        assert (tmp_path / "own.spfq").read_bytes() == (tmp_path / "reused.spfq").read_bytes()
    with pytest.raises(SpfqError, match="other layers or candidates"):
        budget.compress_with_budget(model, x, cfg, 3.0, (1, 4), curves=curves, progress=False)


# ------------------------------------------------------------------ the CLI and the file

def test_file_keeps_the_budget_within_002_and_records_the_allocation(budget_run):
    out, report, stdout = budget_run
    header = container.read_header(out)
    layers = header["layers"]
    total = sum(e["storage_report"]["total_bits"] for e in layers.values())
    weights = sum(e["storage_report"]["weights"] for e in layers.values())
    assert 2.5 - budget.CLOSE <= total / weights <= 2.5
    info = header["meta"]["bits_budget"]
    assert info["budget"] == 2.5 and info["candidates"] == ["1", "ternary", "2", "3", "4", "8"]
    assert info["total_bits"] == total and info["weights"] == weights
    assert info["achieved_bits_per_weight"] == total / weights
    assert sorted(info["widths"]) == sorted(LAYERS) and header["meta"]["layer_order"] == LAYERS
    for name, e in layers.items():  # each layer stored at its allocated width
        w = info["widths"][name]
        assert ("ternary" if e["alphabet"] == "ternary" else str(e["bits"])) == w
        assert set(info["curves"][name]) == set(info["candidates"])
        assert info["curves"][name][w]["total_bits"] == e["storage_report"]["total_bits"]
    assert len(set(info["widths"].values())) > 1  # a mixed-width file
    assert header["meta"]["config"]["layer_bits"] == {n: (w if w == "ternary" else int(w))
                                                      for n, w in info["widths"].items()}
    assert [r["bits"] for r in report] == [info["widths"][n] for n in LAYERS]
    first = LAYERS[0]  # the first layer's input is the float one in both passes
    assert report[0]["rel_error"] == info["curves"][first][info["widths"][first]]["rel_error"]


def test_summary_and_inspect_show_the_allocation(budget_run, capsys):
    out, report, stdout = budget_run
    info = container.read_header(out)["meta"]["bits_budget"]
    got = info["achieved_bits_per_weight"]
    line = f"bits budget 2.5: achieved {got:.4f} bits/weight incl. scales and padding"
    assert line in stdout
    for which, n in (("first", "0"), ("last", "14")):
        w = info["widths"][n]
        bpw = info["curves"][n][w]["total_bits"] / info["layer_weights"][n]
        side = "above" if bpw > got else "below"
        assert f"{which} layer {n}: {w} ({bpw:.2f} bits/weight, {side} the file's {got:.2f}; measured rel err " in stdout
    assert "widths: " in stdout and "curves: 6 widths per layer measured in" in stdout
    assert f"layers at {got:.4f} bits/weight incl. scales and padding" in stdout  # the file line agrees
    for r in report:  # the bits column of the per-layer table is the allocation
        assert any(row.split()[0] == r["name"] and row.split()[3] == r["bits"] for row in stdout.splitlines()
                   if row.strip())
    code, text, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    assert line in text and "first layer 0:" in text
    assert f"= {got:.4f} bits/weight" in text  # the footer's average is the budget line's


def test_same_input_same_bytes(budget_run, mlp_file, tmp_path, capsys):
    out, _, _ = budget_run
    again = tmp_path / "again.spfq"
    code, _, err = run_cli(capsys, "compress", mlp_file, "--bits-budget", "2.5", "--method", "rtn", "-q",
                           "-o", again)
    assert code == 0, err
    assert again.read_bytes() == out.read_bytes()


def test_candidates_override_and_uniform_file_without_budget_has_no_block(mlp_file, tmp_path, capsys):
    out = tmp_path / "c.spfq"
    code, text, err = run_cli(capsys, "compress", mlp_file, "--bits-budget", "3", "--bits-candidates", "ternary,4",
                              "--method", "rtn", "-q", "-o", out)
    assert code == 0, err
    info = container.read_header(out)["meta"]["bits_budget"]
    assert info["candidates"] == ["ternary", "4"] and set(info["widths"].values()) <= {"ternary", "4"}
    assert info["achieved_bits_per_weight"] <= 3
    plain = tmp_path / "p.spfq"
    code, text, err = run_cli(capsys, "compress", mlp_file, "--bits", "2", "--method", "rtn", "-q", "-o", plain)
    assert code == 0 and "bits budget" not in text
    assert "bits_budget" not in container.read_header(plain)["meta"]
    code, text, _ = run_cli(capsys, "inspect", plain)
    assert code == 0 and "bits budget" not in text


def test_mixed_width_file_exports_to_onnx_and_validates(budget_run, tmp_path, capsys):
    out, _, _ = budget_run
    folder = tmp_path / "onnx"
    code, _, err = run_cli(capsys, "export", out, "--format", "onnx", "-o", folder)
    assert code == 0, err
    code, text, err = run_cli(capsys, "validate", folder, "--json", tmp_path / "v.json")
    assert code == 0, text + err
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["passed"]
    ok = [r for r in rep["rows"] if r["status"] == "ok"]
    assert {r["file"] for r in ok} >= {"model.spfq.onnx", "model.stock.onnx", "model.qonnx.onnx"}


# ------------------------------------------------------------------ bad input

def expect_clean_failure(capsys, out, *argv, match):
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("spfq-deploy: error:"), err
    assert match in lines[0], lines[0]
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith((".tmp", ".staged"))]


@pytest.mark.parametrize("args,match", [
    (["--bits-budget", "abc"], "--bits-budget: not a number: 'abc'"),
    (["--bits-budget", "nan"], "--bits-budget must be a positive finite number"),
    (["--bits-budget", "-1"], "--bits-budget must be a positive finite number"),
    (["--bits-budget", "0.5"], "--bits-budget 0.5 is below"),
    (["--bits-budget", "1.2", "--bits-candidates", "ternary,4"], "--bits-budget 1.2 is below"),
    (["--bits-budget", "9.5"], "--bits-budget 9.5 is above"),
    (["--bits-budget", "4", "--bits-candidates", "1,ternary,3"], "--bits-budget 4 is above"),
    (["--bits-budget", "2.5", "--bits", "2"], "give it or --bits, not both"),
    (["--bits-budget", "2.5", "--bits-candidates", "1,5x"], "unknown candidate '5x'"),
    (["--bits-budget", "2.5", "--bits-candidates", "1,9"], "unknown candidate '9'"),
    (["--bits-budget", "2.5", "--bits-candidates", ","], "no candidate"),
    (["--bits-candidates", "1,2"], "give --bits-budget B as well"),
    (["--bits-budget", "2.5", "--layout", "planes"], "--layout cannot be given with it"),
    (["--bits-budget", "2.5", "--sparsity", "0.5"], "not supported"),
])
def test_bad_budget_input_is_one_line_and_no_file(mlp_file, tmp_path, capsys, monkeypatch, args, match):
    def fail(*a, **k):
        raise AssertionError("measurement started although the arguments were bad")
    monkeypatch.setattr(budget, "measure", fail)
    out = tmp_path / "x.spfq"
    expect_clean_failure(capsys, out, "compress", mlp_file, *args, "-o", out, "-q", match=match)


def test_layer_bits_must_name_compressed_layers():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(SpfqError, match="not compressed: nope"):
        compress_model(model, torch.randn(64, 4), CompressConfig(layer_bits={"nope": 2}), progress=False)
    with pytest.raises(SpfqError, match="layer '0': bits must be"):
        CompressConfig(layer_bits={"0": 9})


def test_layer_bits_sets_the_matching_layers_widths(mlp_file, tmp_path, capsys):
    """--layer-bits PATTERN=W (e.g. a decoder's lm_head=8): the matching layers get W, the rest
    --bits, the first matching rule wins, and the file records each layer's width."""
    out = tmp_path / "mixed.spfq"
    code, _, err = run_cli(capsys, "compress", mlp_file, "--method", "rtn", "--bits", "2",
                           "--layer-bits", "14=8", "--layer-bits", "1?=ternary", "--layer-bits", "1*=4", "-o", out, "-q")
    assert code == 0, err
    cm = container.load(out)
    widths = {n: "ternary" if cm.layers[n].alphabet == "ternary" else cm.layers[n].bits for n in LAYERS}
    assert widths == {"0": 2, "2": 2, "4": 2, "6": 2, "8": 2, "10": "ternary", "12": "ternary", "14": 8}


@pytest.mark.parametrize("rule, message", [
    ("lm_head", "expected PATTERN=W"),
    ("=4", "expected PATTERN=W"),
    ("nope*=4", "no compressed layer matches 'nope*'"),
    ("2=9", "bits must be 1, ternary or 2..8"),
])
def test_layer_bits_bad_rule_is_one_line(mlp_file, tmp_path, capsys, rule, message):
    out = tmp_path / "bad.spfq"
    code, _, err = run_cli(capsys, "compress", mlp_file, "--bits", "2", "--layer-bits", rule, "-o", out, "-q")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_layer_bits_and_bits_budget_exclude_each_other(mlp_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", mlp_file, "--bits-budget", "3", "--layer-bits", "0=8",
                           "-o", tmp_path / "x.spfq")
    assert code == 2 and "--layer-bits" in err and len(err.strip().splitlines()) == 1
