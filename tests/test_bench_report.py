"""The demo's pipeline end to end through the CLI on a small model (MNIST CNN, 1-bit round to
nearest): compress -> export (ONNX flavours + TVM x86_64) -> validate --json -> bench --json
--chart -> report. Checks the documents' structure and values, never a timing."""

from __future__ import annotations

import json

import pytest

from spfq_deploy.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
TIMED = {"fp32", "onnx_custom", "onnx_stock_acc0", "onnx_stock_acc4", "tvm_x86_64"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    out = base / "mnist_1bit"
    steps = [["compress", "examples/mnist_cnn.py", "--bits", "1", "--method", "rtn", "-q", "-o", str(base / "m.spfq")],
             ["export", str(base / "m.spfq"), "--format", "all", "--target", "x86_64", "-o", str(out)],
             ["validate", str(out), "--target", "x86_64", "--json", str(base / "validate.json")],
             ["bench", str(out), "--batch", "1,3", "--threads", "1,2", "--warmup", "1", "--repeat", "5",
              "--json", str(base / "bench.json"), "--chart", str(base / "latency.png")],
             ["report", str(out), "-o", str(base / "report" / "report.md"), "--validate-json", str(base / "validate.json"),
              "--bench-json", str(base / "bench.json")]]
    (base / "report").mkdir()
    for argv in steps:
        assert main(argv) == 0, argv
    return base, out


def test_validate_json_every_row_ok(pipeline):
    base, _ = pipeline
    doc = json.loads((base / "validate.json").read_text())
    assert doc["passed"] and doc["summary"]["fail"] == 0
    rows = [r for r in doc["rows"] if r["status"] != "skip"]
    assert {r["file"] for r in rows} == {"model.spfq.onnx", "model.stock.onnx", "model.qonnx.onnx", "model.x86_64.so"}
    assert all(r["status"] in ("ok", "info") for r in rows)


def test_bench_json(pipeline):
    base, out = pipeline
    doc = json.loads((base / "bench.json").read_text())
    assert doc["host"] == "x86_64" and doc["batches"] == [1, 3] and doc["threads"] == [1, 2]
    assert {a["name"] for a in doc["artifacts"]} == TIMED
    assert [x["artifact"] for x in doc["not_timed"]] == ["qonnx (qonnx executor, first 8 samples)"]
    cells = {(r["artifact"], r["batch"], r["threads"]): r for r in doc["rows"]}
    assert set(cells) == {(a, b, t) for a in TIMED for b in (1, 3) for t in (1, 2)}
    for (name, b, t), r in cells.items():
        assert "error" not in r, r
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["samples"] == 5
        assert r["ratio_vs_fp32"] > 0 and r["speedup_vs_fp32"] == pytest.approx(1 / r["ratio_vs_fp32"])
        if name == "fp32":
            assert r["ratio_vs_fp32"] == 1.0
    assert (base / "latency.png").read_bytes()[:8] == PNG


def test_report(pipeline):
    base, out = pipeline
    report = base / "report" / "report.md"
    text = report.read_text()
    for label in ("onnx custom ops, int8 act.", "onnx stock, accuracy level 0", "onnx stock, accuracy level 4",
                  "qonnx", "tvm library, int8 act."):
        assert label in text, label
    for name in TIMED:
        assert f"| {name} |" in text, name
    assert "bits/weight" in text and "classifier.0" in text  # the inspect table
    assert "| accuracy |" in text  # evaluate() of examples/mnist_cnn.py
    for png in ("report_mnist_1bit_latency.png", "report_mnist_1bit_parity.png"):
        assert f"]({png})" in text and (report.parent / png).read_bytes()[:8] == PNG


def test_bench_errors(pipeline, tmp_path, capsys):
    _, out = pipeline
    assert main(["bench", str(tmp_path / "nope")]) == 2
    assert main(["bench", str(out), "--target", "arm64"]) == 2
    err = capsys.readouterr().err
    assert err.count("spfq-deploy: error:") == 2 and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["bench", str(out), "--batch", "0"])
