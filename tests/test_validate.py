"""`spfq-deploy validate`: a clean export passes every row; injected faults (a flipped bit of a
packed weight, swapped scales, truncated libraries / models) fail their row and the exit code;
bad input is one line, never a traceback.

One MNIST CNN file (1-bit round-to-nearest: packed `sign` initializers), exported once to ONNX
(custom int8 / stock / QONNX) and TVM (x86_64); each fault test edits a copy of the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from spfq_deploy.cli import main
from spfq_deploy.validate import tolerances


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    import examples.mnist_cnn as mnist
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    base = tmp_path_factory.mktemp("validate")
    res = compress_model(mnist.build(), mnist.calibration(64), bits=1, method="rtn", progress=False,
                         model_spec="examples/mnist_cnn.py")
    container.save(base / "m.spfq", res.model)
    out = base / "out"
    assert main(["export", str(base / "m.spfq"), "-o", str(out), "--format", "all", "--target", "x86_64"]) == 0
    np.savez(base / "digits.npz", input=mnist.load_digits()[0][:32].numpy())
    return out


def _validate(folder, capsys, *extra):
    rc = main(["validate", str(folder), "--json", str(Path(folder).parent / "report.json"), *extra])
    text = capsys.readouterr()
    report = json.loads((Path(folder).parent / "report.json").read_text()) if rc in (0, 1) else None
    return rc, text.out, text.err, report


def _copy(export_dir, tmp_path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(export_dir, dest)
    return dest


def _row(report, flavour_file, target="x86_64", kind=None):
    rows = [r for r in report["rows"] if r["file"] == flavour_file and r["target"] == target
            and (kind is None or r["kind"] == kind)]
    assert len(rows) == 1, report["rows"]
    return rows[0]


def test_clean_export_passes_every_row(export_dir, capsys, tmp_path):
    rc, out, err, report = _validate(export_dir, capsys, "--data", str(export_dir.parent / "digits.npz"))
    assert rc == 0, out + err
    assert report["samples"] == 32 and report["passed"]
    files = {(r["file"], r["kind"]) for r in report["rows"] if r["status"] != "skip"}
    assert files == {("model.spfq.onnx", "int8"), ("model.stock.onnx", "float"), ("model.stock.onnx", "info"),
                     ("model.qonnx.onnx", "float"), ("model.x86_64.so", "int8")}
    for r in report["rows"]:
        assert r["status"] in ("ok", "info", "skip"), r
        if r["status"] == "ok":
            assert r["metrics"]["top1_agreement"] == 1.0 and r["latency_ms"] > 0 and not r["failures"]
    custom = _row(report, "model.spfq.onnx")
    assert [x["layer"] for x in custom["layers"]] == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert all(x["local_ok"] for x in custom["layers"])  # int8 kernels exact per layer
    cuda = [r for r in report["rows"] if r["target"] == "cuda"]
    assert len(cuda) == 1 and cuda[0]["status"] == "skip" and cuda[0]["note"]
    for col in ("max abs err", "max rel err", "cosine (min)", "SNR dB", "top-1", "weights", "first diverging layer",
                "latency ms"):
        assert col in out
    for r in report["rows"]:  # every ONNX flavour's weights decoded and exact; TVM's are compiled in
        if r["status"] != "skip":
            assert r["weights"]["status"] == ("not checked" if r["file"].endswith(".so") else "ok"), r
    assert out.count("[ok]") == 4 and "[x]" not in out
    # --target picks rows; the default inputs.npz is used without --data
    rc, out, _, report = _validate(export_dir, capsys, "--target", "x86_64")
    assert rc == 0 and {r["target"] for r in report["rows"]} == {"x86_64"} and report["samples"] == 2


def test_flipped_packed_weight_bit_fails_and_names_the_layer(export_dir, capsys, tmp_path):
    out = _copy(export_dir, tmp_path)
    model = onnx.load(str(out / "model.spfq.onnx"))
    init = next(i for i in model.graph.initializer if i.name.endswith(".sign"))
    assert init.name == "features.0.sign"
    raw = bytearray(init.raw_data)
    raw[0] ^= 0x01  # the sign of weight 0 of output channel 0
    init.raw_data = bytes(raw)
    (out / "model.spfq.onnx").write_bytes(model.SerializeToString())
    rc, text, _, report = _validate(out, capsys)
    assert rc == 1
    row = _row(report, "model.spfq.onnx")
    assert row["status"] == "fail" and row["first_diverging_layer"] == "features.0"
    assert any("sha256" in f for f in row["failures"])
    assert any(f.startswith("layer features.0:") for f in row["failures"])  # caught by the numbers too
    assert not row["layers"][0]["local_ok"] and all(x["local_ok"] for x in row["layers"][1:])
    assert "[x]" in text and _row(report, "model.stock.onnx", kind="float")["status"] == "ok"


def test_swapped_scales_in_stock_model_fail(export_dir, capsys, tmp_path):
    out = _copy(export_dir, tmp_path)
    model = onnx.load(str(out / "model.stock.onnx"))
    init = next(i for i in model.graph.initializer if i.name == "classifier.0.s")
    s = numpy_helper.to_array(init).copy()
    flat = s.reshape(-1)
    j = int(np.argmax(np.abs(flat - flat[0]) > 1e-3 * np.abs(flat[0])))
    assert j > 0
    flat[0], flat[j] = flat[j], flat[0]
    init.CopyFrom(numpy_helper.from_array(s, init.name))
    (out / "model.stock.onnx").write_bytes(model.SerializeToString())
    # record the edited file's checksum in the manifest, so only the numbers can catch it
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["model.stock.onnx"]["sha256"] = __import__("hashlib").sha256((out / "model.stock.onnx").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))
    rc, _, _, report = _validate(out, capsys, "--data", str(export_dir.parent / "digits.npz"))
    assert rc == 1
    row = _row(report, "model.stock.onnx", kind="float")
    assert row["status"] == "fail" and row["first_diverging_layer"] == "classifier.0"
    assert row["metrics"]["max_rel_err"] > tolerances.TOLERANCES["float"].max_rel_err
    assert not any("sha256" in f for f in row["failures"])


@pytest.mark.parametrize("victim", ["lib/x86_64/libspfq_ort.so", "model.x86_64.so", "model.spfq.onnx"])
def test_truncated_artifact_is_a_failed_row_with_its_load_error(export_dir, capsys, tmp_path, victim):
    out = _copy(export_dir, tmp_path)
    path = out / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if victim.endswith(".so"):  # the manifest agrees with the damaged library: no checksum to lean on
        import hashlib
        for name in ("manifest.json", "manifest.tvm.json"):
            m = json.loads((out / name).read_text())
            if victim in m["files"]:
                m["files"][victim]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                (out / name).write_text(json.dumps(m))
    rc, text, err, report = _validate(out, capsys)
    assert rc == 1 and "Traceback" not in text + err
    row = _row(report, "model.x86_64.so" if victim.endswith("model.x86_64.so") else "model.spfq.onnx")
    assert row["status"] == "fail" and row["error"], row
    assert "[x]" in text
    others = [r for r in report["rows"] if r is not row and r["status"] == "fail"]
    assert others == []  # the other artifacts still validate


def test_bad_input_is_one_line(export_dir, capsys, tmp_path):
    assert main(["validate", str(tmp_path / "nope")]) == 2
    assert "no such export folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["validate", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and len(err.strip().splitlines()) == 1
    out = _copy(export_dir, tmp_path)
    np.savez(tmp_path / "wrong.npz", x=np.zeros((1, 1, 28, 28), np.float32))
    assert main(["validate", str(out), "--data", str(tmp_path / "wrong.npz")]) == 2
    assert "the model takes ['input']" in capsys.readouterr().err
    (out / "model.spfq").write_bytes((out / "model.spfq").read_bytes()[:100])
    assert main(["validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spfq-deploy: error:") and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def arm64_dir(export_dir, tmp_path_factory):
    """The same file exported for arm64 (custom-op flavour): its aarch64 custom-op library runs in
    the emulated arm64 Python (onnxruntime of targets/arm64.toml) through the folder's run_onnx.py."""
    out = tmp_path_factory.mktemp("validate-arm64") / "out"
    assert main(["export", str(export_dir.parent / "m.spfq"), "-o", str(out), "--format", "onnx", "--target", "arm64",
                 "--flavours", "custom"]) == 0
    return out


def test_arm64_custom_ops_run_under_qemu(arm64_dir, capsys, tmp_path):
    rc, out, _, report = _validate(arm64_dir, capsys, "--target", "arm64")
    assert rc == 0, out
    row = _row(report, "model.spfq.onnx", target="arm64")
    assert row["status"] == "ok" and "qemu-aarch64" in row["artifact"], row
    assert row["metrics"]["top1_agreement"] == 1.0 and row["metrics"]["min_cosine"] > 0.99999
    assert [x["layer"] for x in row["layers"]] == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert all(x["local_ok"] for x in row["layers"])  # NEON int8 kernels exact per layer

    # a flipped packed-weight bit is caught under emulation too, at its layer
    bad = tmp_path / "bad"
    shutil.copytree(arm64_dir, bad)
    model = onnx.load(str(bad / "model.spfq.onnx"))
    init = next(i for i in model.graph.initializer if i.name == "features.0.sign")
    raw = bytearray(init.raw_data)
    raw[0] ^= 0x01
    init.raw_data = bytes(raw)
    (bad / "model.spfq.onnx").write_bytes(model.SerializeToString())
    rc, _, _, report = _validate(bad, capsys, "--target", "arm64")
    row = _row(report, "model.spfq.onnx", target="arm64")
    assert rc == 1 and row["status"] == "fail" and row["first_diverging_layer"] == "features.0", row


def test_changed_onnx_runner_is_not_executed_under_qemu(arm64_dir, capsys, tmp_path):
    """validate executes the folder's run_onnx.py (under qemu-aarch64): a copy whose sha256 is not
    the manifest's fails the rows that would run it and never runs."""
    bad = tmp_path / "bad"
    shutil.copytree(arm64_dir, bad)
    marker = tmp_path / "runner-ran"
    body = (bad / "run_onnx.py").read_text()
    assert "from __future__ import annotations\n" in body
    (bad / "run_onnx.py").write_text(body.replace("from __future__ import annotations\n", "from __future__ import "
                                                  f"annotations\nopen({str(marker)!r}, 'w').write('ran')\n", 1))
    rc, text, err, report = _validate(bad, capsys, "--target", "arm64")
    assert rc == 1 and "Traceback" not in text + err
    row = _row(report, "model.spfq.onnx", target="arm64")
    assert row["status"] == "fail" and row["error"].startswith("run_onnx.py: sha256 differs from manifest.json"), row
    assert "not run" in row["error"] and not marker.exists()
