"""benchmarks/kernels.py, structure only (not a timed test): a tiny run of the same code path as
`python benchmarks/kernels.py`, checked for what the JSON promises: every entry timed or missing
with a reason, ratios taken between entries of this run, the MatMulNBits packing verified against
numpy, and every PERF.md goal listed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import onnx  # noqa: F401  (installed by make test: the test extra)
import onnxruntime  # noqa: F401
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 128, 256), (16, 128, 256)]  # (M, N, K): tiny, but every kernel and baseline runs

# The goal rows of PERF.md ("kernel, shape" column); the "2-bit/ternary" row is judged twice.
PERF_GOAL_ROWS = [
    "1-bit weights x int8 act, GEMV 4096x4096",
    "XNOR/popcount (binary x binary), M=64, 4096^2",
    "4-bit dense x int8 act, GEMV 4096x4096",
    "4-bit, 50% unstructured sparse, GEMV 4096^2",
    "2-bit/ternary x int8 act, GEMV 4096x4096",
    "2 threads vs 1",
    "end to end, MiniLM encoder",
    "SPFQ compression of MiniLM",
    "packed size, 1-bit linear layers",
]
STATUSES = {"met", "missed", "missing", "invalid", "not_measured", "elsewhere"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def doc(bench):
    d = bench.run(SHAPES, threads=1, scaling=True, repeats=3, budget_s=0.05, log=lambda *a: None)
    return json.loads(json.dumps(d))  # exactly what the JSON file holds


def test_every_entry_is_timed_or_missing_with_a_reason(doc, bench):
    ids = [e["id"] for e in doc["entries"]]
    assert len(ids) == len(set(ids))
    for e in doc["entries"]:
        if e["status"] == "ok":
            assert e["median_ns"] > 0 and e["samples"] >= 1 and len(e["samples_ns"]) == e["samples"]
            assert e["p10_ns"] <= e["median_ns"] <= e["p90_ns"]
            if e.get("n"):
                assert e["gmac_per_s"] > 0
            if e.get("weight_bytes"):
                assert e["gbps"] > 0 and e["roofline"]["gbps"] > 0
                assert math.isclose(e["roofline_fraction"], e["gbps"] / e["roofline"]["gbps"])
            if "check" in e and e["kind"] != "quantizer":
                assert set(e["check"]) >= {"max_abs_err", "tol", "ok"}
        else:
            assert e["status"] == "missing" and isinstance(e.get("reason"), str) and e["reason"].strip()
    # every kernel and baseline of every shape is there (timed or missing)
    names = {(e["name"], e["m"], e["threads"]) for e in doc["entries"]}
    want = ["ort_fp32"] + [f"ort_mnb{b}_bs{s}_acc{a}" for b in (2, 4) for s in (32, 64) for a in (4, 0)]
    want += [k.name for k in bench.SPFQ_KERNELS]
    for m, _, _ in SHAPES:
        assert all((w, m, 1) in names for w in want), sorted(names)
    # --scaling: 2-thread entries for M >= 16 only
    assert all((k.name, 16, 2) in names for k in bench.SPFQ_KERNELS)
    assert not any(t == 2 and m < 16 for _, m, t in names)
    assert doc["config"]["threads"] == 1 and doc["machine"]["onnxruntime"]


def test_ratios_come_from_entries_of_this_run(doc):
    by_id = {e["id"]: e for e in doc["entries"]}
    seen = 0
    for e in doc["entries"]:
        for label, r in e.get("ratios", {}).items():
            b = by_id[r["baseline"]]
            assert b["status"] == "ok"
            assert (b["m"], b["n"], b["k"], b["threads"]) == (e["m"], e["n"], e["k"], e["threads"])
            denom = e["median_ns"]
            if label.startswith("e2e_") and r.get("quantizer"):
                q = by_id[r["quantizer"]]
                assert q["kind"] == "quantizer" and (q["m"], q["k"]) == (e["m"], e["k"])
                denom += q["median_ns"]
            assert math.isclose(r["ratio"], b["median_ns"] / denom, rel_tol=1e-12)
            denom10 = e["p10_ns"] + (by_id[r["quantizer"]]["p10_ns"] if label.startswith("e2e_")
                                     and r.get("quantizer") else 0.0)
            assert math.isclose(r["ratio_p10"], b["p10_ns"] / denom10, rel_tol=1e-12)
            if label.endswith("vs_mnb"):
                assert b["bits"] == e["mnb_bits"] and b["accuracy_level"] == 4
            seen += 1
    assert seen  # at least the MatMulNBits-vs-fp32 ratios exist even before any kernel does
    for s in doc["scaling"]:
        assert math.isclose(s["speedup"], by_id[s["t1"]]["median_ns"] / by_id[s["t2"]]["median_ns"])


def test_matmulnbits_packing_matches_numpy(doc):
    v = doc["mnb_verification"]
    assert v["passed"]
    combos = {(c["bits"], c["block_size"], c["accuracy_level"]) for c in v["cases"]}
    assert combos == {(b, s, a) for b in (2, 4) for s in (32, 64) for a in (0, 4)}
    for c in v["cases"]:
        assert c["ok"] and c["max_abs_err"] <= c["tol"]
        if c["accuracy_level"] == 0:  # fp32 compute: the packing is exact up to rounding
            assert c["max_abs_err"] <= 1e-4 * c["ref_max_abs"]
    # and at the benchmark's own shapes, row 0 of every MatMulNBits output
    for e in doc["entries"]:
        if e["name"].startswith("ort_") and e["status"] == "ok":
            assert e["check"]["ok"], e


def test_goals_list_every_perf_goal(doc, bench):
    goals = doc["goals"]
    assert [g["id"] for g in goals] == [g["id"] for g in bench.GOALS]
    for row in PERF_GOAL_ROWS:
        assert any(g["perf_md"].startswith(row) for g in goals), row
    for g in goals:
        assert g["status"] in STATUSES
        if g["status"] in ("met", "missed"):
            meas = g.get("measured_ratio", g.get("measured"))
            assert meas is not None
            good = meas <= g["target"] if g["id"] == "packed_size_1bit" else meas >= g["target"]
            assert good == (g["status"] == "met")
        else:
            assert g.get("reason")
    # tiny shapes: the 4096^2 goals are not measured here, the threads goal is (or is missing)
    assert {g["status"] for g in goals if g["id"].endswith(("fp32", "mnb2", "mnb4"))} == {"not_measured"}


def test_goal_evaluation_uses_same_run_ratios(bench):
    """met / missed / missing / invalid from synthetic entries (no timing involved)."""
    def ent(name, median, status="ok", **kw):
        e = {"id": bench._eid(name, kw.pop("m", 1), 4096, 4096, 1), "name": name, "m": 1, "n": 4096,
             "k": 4096, "threads": 1, "status": status, "median_ns": median, "check": {"ok": True}, **kw}
        e.setdefault("p10_ns", median)
        return e
    entries = {e["id"]: e for e in [
        ent("ort_fp32", 4.4e6, kind="ort"),
        ent("ort_mnb2_bs32_acc4", 0.74e6, kind="ort", bits=2, accuracy_level=4),
        ent("ort_mnb4_bs32_acc4", 1.4e6, kind="ort", bits=4, accuracy_level=4),
        ent("spfq_1bit_i8", 0.1e6, kind="spfq", mnb_bits=2, quantizer="quantize_i8", roofline_fraction=0.9),
        ent("spfq_4bit_i8", 1.0e6, kind="spfq", mnb_bits=4, quantizer="quantize_i8", roofline_fraction=0.5),
        ent("spfq_2bit_i8", 0.1e6, kind="spfq", mnb_bits=2, quantizer="quantize_i8", check={"ok": False}),
        ent("spfq_ternary_i8", None, status="missing", kind="spfq", reason="matmul_i8: not supported"),
    ]}
    q = {"id": bench._eid("quantize_i8", 1, None, 4096, 1), "name": "quantize_i8", "m": 1, "n": None,
         "k": 4096, "threads": 1, "status": "ok", "median_ns": 0.01e6, "p10_ns": 0.01e6,
         "kind": "quantizer"}
    entries[q["id"]] = q
    bench._add_ratios(entries)
    goals = {g["id"]: g for g in bench.evaluate_goals(entries, [], [], 1)}
    g = goals["1bit_i8_vs_ort_fp32"]
    assert g["status"] == "met" and math.isclose(g["measured_ratio"], 4.4e6 / 0.11e6)
    assert math.isclose(g["ratio_kernel_only"], 44.0)
    assert goals["1bit_i8_vs_mnb2"]["status"] == "met"  # 0.74 / (0.1 + 0.01) = 6.7x >= 4x
    assert goals["4bit_i8_vs_mnb4"]["status"] == "missed"  # 1.4 / 1.01 = 1.39x < 1.5x
    assert goals["4bit_i8_vs_mnb4"]["roofline_fraction"] == 0.5
    assert goals["2bit_i8_vs_mnb2"]["status"] == "invalid"
    assert goals["ternary_i8_vs_mnb2"]["status"] == "missing"
    assert goals["xnor_m64_vs_ort_fp32"]["status"] == "not_measured"
    assert goals["threads_2v1"]["status"] == "not_measured"


def test_main_writes_json_and_prints_markdown(bench, doc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", lambda *a, **k: doc)
    out = tmp_path / "sub" / "kernels.json"
    bench.main(["--shapes", "quick", "--out", str(out)])
    assert json.loads(out.read_text())["run_id"] == doc["run_id"]
    text = capsys.readouterr().out
    assert "| kernel | M |" in text and "| goal | target |" in text
