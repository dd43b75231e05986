"""`spfq-deploy validate`: integrity checks that do not depend on what inputs.npz happens to touch
(issue 12): every weight initializer of each ONNX flavour decoded and compared exactly with
model.spfq (validate/weights.py), manifest format / format_version, checksum-verified runner
scripts before they are executed, and the --json / --report paths checked before the run.

One MNIST CNN file (1-bit round-to-nearest), exported once to the three ONNX flavours through the
CLI; each fault test edits a copy. The damage is placed on input columns that are zero for every
sample of inputs.npz, so the numeric checks cannot see it and only the weight check can. The
decoders also get one synthetic layer per packed layout (the flavour builders, tests only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from test_export_onnx import _float_layers
from test_validate import _copy, _validate

from spfq_deploy.cli import main
from spfq_deploy.compressed import CompressedLayer, CompressedModel
from spfq_deploy.validate import weights as W

SPEC = "examples/mnist_cnn.py"
LAYERS = ["features.0", "features.3", "classifier.0", "classifier.2"]


def _flavour_builders():
    """The exporters' flavour builders: the one place these tests import from spfq_deploy.export."""
    from spfq_deploy.export.onnx import custom, qonnx, stock

    return {"custom": custom.builder("int8"), "stock": stock.builder(), "qonnx": qonnx.builder()}


def mnist_1bit_file(base: Path) -> Path:
    """A 1-bit RTN MNIST .spfq in base (quick to make; every layer kind the exports check)."""
    import examples.mnist_cnn as mnist
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    res = compress_model(mnist.build(), mnist.calibration(64), bits=1, method="rtn", progress=False,
                         model_spec=SPEC)
    container.save(base / "m.spfq", res.model)
    return base / "m.spfq"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity")
    mnist_1bit_file(base)
    assert main(["export", str(base / "m.spfq"), "-o", str(base / "out"), "--format", "onnx"]) == 0
    return base / "out"


@pytest.fixture(scope="module")
def unseen(export_dir):
    """(k, n): a weight of classifier.0 whose input column k is 0 for every sample of inputs.npz in
    the float and in the int8 reference, so changing it changes no output the validator computes."""
    from spfq_deploy.pack import container
    from spfq_deploy.reference import int8_activation_reference, load_reference

    model = load_reference(export_dir / "model.spfq", SPEC)
    with np.load(export_dir / "inputs.npz") as z:
        x = torch.from_numpy(z["input"])
    zero = None
    cm8 = container.load(export_dir / "model.spfq")
    for m in (model, int8_activation_reference(model, cm8, _float_layers(cm8))):
        seen = {}
        h = m.get_submodule("classifier.0").register_forward_hook(lambda _m, i, _o, seen=seen: seen.update(x=i[0]))
        with torch.no_grad():
            m(x)
        h.remove()
        z = (seen["x"].reshape(len(x), -1) == 0).all(0).numpy()
        zero = z if zero is None else zero & z
    cols = np.flatnonzero(zero)
    assert cols.size, "no input column of classifier.0 is zero on inputs.npz"
    return int(cols[len(cols) // 2]), 5


def _rows(report, file):
    return [r for r in report["rows"] if r["file"] == file]


def _edit_initializer(folder: Path, file: str, name: str, edit) -> None:
    """edit(bytearray of raw_data) in place, then record the new file's sha256/bytes in the manifest
    so that the checksum cannot be what catches it."""
    model = onnx.load(str(folder / file))
    init = next(i for i in model.graph.initializer if i.name == name)
    raw = bytearray(init.raw_data)
    edit(raw)
    init.raw_data = bytes(raw)
    (folder / file).write_bytes(model.SerializeToString())
    _rehash(folder, file)


def _rehash(folder: Path, file: str, manifest: str = "manifest.json") -> None:
    m = json.loads((folder / manifest).read_text())
    data = (folder / file).read_bytes()
    m["files"][file] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / manifest).write_text(json.dumps(m))


def _assert_weights_fail(report, file, layer="classifier.0"):
    rows = _rows(report, file)
    assert rows
    for row in rows:  # the informational stock row too: damaged weights are not a precision question
        assert row["status"] == "fail", row
        assert row["weights"]["status"] == "fail" and row["weights"]["first_mismatch"] == layer, row["weights"]
        assert any(f.startswith(f"weights: layer {layer}:") for f in row["failures"]), row["failures"]
        assert row["first_diverging_layer"] == layer
        assert not any("sha256" in f for f in row["failures"])  # the manifest agrees with the damage
        assert not any(f.startswith("layer ") for f in row["failures"])  # the numbers cannot see it
    return rows


# ---------------------------------------------------------------- (d) a good export

def test_good_export_reports_exact_weights_for_every_flavour(export_dir, capsys):
    rc, out, err, report = _validate(export_dir, capsys)
    assert rc == 0, out + err
    checked = [r for r in report["rows"] if r["file"] and r["file"].endswith(".onnx")]
    assert {r["file"] for r in checked} == {"model.spfq.onnx", "model.stock.onnx", "model.qonnx.onnx"}
    for r in checked:
        w = r["weights"]
        assert w["status"] == "ok" and w["exact"] == w["layers"] == 4 and not w["mismatches"], (r["artifact"], w)
    assert out.count("exact") == len(checked) and "weights" in out.splitlines()[0]


# ---------------------------------------------------------------- (a) (b) (c) damage the samples cannot see

def test_stock_int4_byte_flip_unseen_by_inputs_fails_weight_check(export_dir, unseen, capsys, tmp_path):
    out = _copy(export_dir, tmp_path)
    k, n = unseen
    q = next(i for i in onnx.load(str(out / "model.stock.onnx")).graph.initializer if i.name == "classifier.0.q")
    assert list(q.dims) == [3136, 128] and q.data_type == onnx.TensorProto.INT4
    idx = k * 128 + n  # (K, N) row-major, two int4 per byte, low nibble first

    def flip(raw):
        raw[idx // 2] ^= 0x01 << (4 * (idx % 2))

    _edit_initializer(out, "model.stock.onnx", "classifier.0.q", flip)
    rc, text, _, report = _validate(out, capsys)
    assert rc == 1, text
    rows = _assert_weights_fail(report, "model.stock.onnx")
    assert f"(row {n}, column {k})" in rows[0]["failures"][0]
    assert all(r["status"] == "ok" for r in report["rows"] if r["file"] in ("model.spfq.onnx", "model.qonnx.onnx"))
    assert "differ" in text and "weights: layer classifier.0" in text


def test_custom_packed_bit_flip_unseen_by_inputs_fails_weight_check(export_dir, unseen, capsys, tmp_path):
    out = _copy(export_dir, tmp_path)
    k, n = unseen
    words = (3136 + 63) // 64

    def flip(raw):  # bit k%64 of word (n, k//64), little-endian words
        raw[(n * words + k // 64) * 8 + (k % 64) // 8] ^= 1 << (k % 8)

    _edit_initializer(out, "model.spfq.onnx", "classifier.0.sign", flip)
    rc, text, _, report = _validate(out, capsys)
    assert rc == 1, text
    (row,) = _assert_weights_fail(report, "model.spfq.onnx")
    assert row["failures"][0].startswith("weights: layer classifier.0: sign words: code of weight "
                                          f"(row {n}, column {k})")
    assert all(x["local_ok"] for x in row["layers"])  # per-layer numbers: blind to it


def test_qonnx_weight_change_unseen_by_inputs_fails_weight_check(export_dir, unseen, capsys, tmp_path):
    out = _copy(export_dir, tmp_path)
    k, n = unseen

    def negate(raw):
        w = np.frombuffer(bytes(raw), np.float32).copy().reshape(3136, 128)
        w[k, n] = -w[k, n]
        raw[:] = w.tobytes()

    _edit_initializer(out, "model.qonnx.onnx", "classifier.0.float", negate)
    rc, text, _, report = _validate(out, capsys)
    assert rc == 1, text
    (row,) = _assert_weights_fail(report, "model.qonnx.onnx")
    assert row["metrics"]["max_abs_err"] < 1e-4  # the numbers pass


def test_changed_stock_scale_and_bias_fail_weight_check(export_dir, capsys, tmp_path):
    out = _copy(export_dir, tmp_path)

    def bump(raw):  # one blocked scale entry of classifier.2 (the one layer K % 64 == 0 there: 128)
        s = np.frombuffer(bytes(raw), np.float32).copy()
        s[-1] *= 2
        raw[:] = s.tobytes()

    _edit_initializer(out, "model.stock.onnx", "classifier.2.s", bump)
    _edit_initializer(out, "model.spfq.onnx", "features.3.bias", bump)
    rc, _, _, report = _validate(out, capsys)
    assert rc == 1
    (stock,) = [r for r in _rows(report, "model.stock.onnx") if r["kind"] == "float"]
    assert stock["weights"]["first_mismatch"] == "classifier.2"
    assert any(f.startswith("weights: layer classifier.2: classifier.2.q scale") for f in stock["failures"])
    (custom,) = _rows(report, "model.spfq.onnx")
    assert custom["weights"]["first_mismatch"] == "features.3" and "bias" in custom["weights"]["mismatches"][0]["problem"]


def test_missing_layer_in_a_flavour_is_a_weight_failure(export_dir):
    from spfq_deploy.pack import container

    cm = container.load(export_dir / "model.spfq")
    model = onnx.load(str(export_dir / "model.spfq.onnx"))
    keep = [nd for nd in model.graph.node
            if not (nd.domain == "ai.spfq" and len(nd.input) > 4 and nd.input[4] == "classifier.2.scale")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    res = W.check(model, "custom", cm, LAYERS)
    assert res["status"] == "fail" and res["first_mismatch"] == "classifier.2" and res["exact"] == 3
    assert "no ai.spfq PackedMatMul / PackedConv node" in res["mismatches"][0]["problem"]
    stock = onnx.load(str(export_dir / "model.stock.onnx"))
    stock.graph.initializer.remove(next(i for i in stock.graph.initializer if i.name == "features.0.bias"))
    res = W.check(stock, "stock", cm, LAYERS)
    assert res["first_mismatch"] == "features.0" and "bias missing" in res["mismatches"][0]["problem"]


def test_replaced_model_spfq_fails_every_row(export_dir, capsys, tmp_path):
    """A different but valid model.spfq would agree with itself: its manifest checksum must fail
    the rows (the reference and the weight check are built from it)."""
    import examples.mnist_cnn as mnist
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    out = _copy(export_dir, tmp_path)
    other = compress_model(mnist.build(), mnist.calibration(32), bits=2, method="rtn", progress=False,
                           model_spec=SPEC)
    container.save(out / "model.spfq", other.model)
    rc, _, _, report = _validate(out, capsys)
    assert rc == 1
    for r in report["rows"]:
        if r["status"] != "skip":
            assert r["status"] == "fail" and any(f.startswith("model.spfq: sha256 differs") for f in r["failures"]), r
            assert r["weights"]["status"] == "fail"  # and its codes are not the exported ones


# ---------------------------------------------------------------- decoders, one synthetic layer per layout

def _layer(name, alphabet, bits, codes, kind="linear", lam=False, zero_row=False, seed=0):
    rng = np.random.default_rng(seed)
    n, d = codes.shape
    scale = rng.uniform(0.01, 0.1, n).astype(np.float16).astype(np.float32)
    if zero_row:
        scale[1] = 0
    shape = (n, d) if kind == "linear" else (n, d // 9, 3, 3)
    conv = None if kind == "linear" else {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
                                          "kernel_size": [3, 3]}
    lam_v = (scale * 1.5).astype(np.float16).astype(np.float32) if lam else None
    return CompressedLayer(name=name, kind="conv2d" if conv else "linear", weight_shape=shape, alphabet=alphabet,
                           bits=bits, codes=codes.astype(np.int8), scale=scale, lam=lam_v,
                           bias=rng.normal(size=n).astype(np.float32), conv=conv)


def _synthetic_layers(zero_row: bool = False) -> list[CompressedLayer]:
    rng = np.random.default_rng(1)
    sign = np.where(rng.random((6, 130)) < 0.5, -1, 1)
    tern = rng.integers(-1, 2, (5, 99))
    dense4 = rng.integers(-7, 8, (4, 200))
    dense4[dense4 == 0] = 1
    sparse4 = np.where(rng.random((4, 300)) < 0.95, 0, rng.integers(-7, 8, (4, 300)))
    return [
        _layer("a.sign", "binary", 1, sign),  # sign
        _layer("a.sign_conv", "binary", 1, sign[:, :126], kind="conv2d", zero_row=zero_row),  # sign, conv
        _layer("a.tern", "ternary", 2, tern),  # sign_mask
        _layer("a.pruned_bin", "binary", 1, tern[:, :90], kind="conv2d"),  # sign_mask, pruned binary
        _layer("a.planes", "int", 4, dense4),  # planes
        _layer("a.planes_lam", "int", 4, np.where(rng.random((4, 200)) < 0.5, 0, dense4), lam=True),  # planes + lam
        _layer("a.sparse", "int", 4, sparse4, lam=True),  # sparse (>= 90% zero)
        _layer("a.int6", "int", 6, rng.integers(-31, 32, (3, 70))),  # planes, int8 in stock (block: none)
    ]


def _synthetic_models(zero_row: bool = False):
    layers = _synthetic_layers(zero_row)
    cm = CompressedModel(layers={ly.name: ly for ly in layers}, float_params={})
    models = {}
    for flavour, build in _flavour_builders().items():
        nodes, inits = [], []
        for ly in layers:
            rep = build(ly, f"{ly.name}:x", f"{ly.name}:y")
            nodes += rep.nodes
            inits += rep.initializers
        models[flavour] = helper.make_model(helper.make_graph(nodes, "g", [], [], inits))
    return cm, models


def test_decoders_read_every_layout_exactly():
    cm, models = _synthetic_models()
    layouts = {helper.get_attribute_value(a) for nd in models["custom"].graph.node for a in nd.attribute
               if a.name == "layout"}
    assert layouts == {W.SIGN, W.SIGN_MASK, W.PLANES, W.SPARSE}
    for flavour, model in models.items():
        res = W.check(model, flavour, cm)
        assert res["status"] == "ok" and res["exact"] == len(cm.layers), (flavour, res["mismatches"])


def test_zero_scale_binary_row_is_exact_in_custom_and_stock():
    cm, models = _synthetic_models(zero_row=True)
    for flavour in ("custom", "stock"):
        res = W.check(models[flavour], flavour, cm)
        assert res["status"] == "ok", (flavour, res["mismatches"])


def test_zero_scale_binary_row_is_exact_in_qonnx():
    """A binary row with scale 0 weighs 0; BipolarQuant would write it as +1 (found by the weight check)."""
    cm, models = _synthetic_models(zero_row=True)
    res = W.check(models["qonnx"], "qonnx", cm)
    assert res["status"] == "ok", res["mismatches"]


def test_decoders_name_the_layer_of_any_damaged_weight():
    """Flip one bit / change one value of every weight initializer of every layer, one at a time:
    each change is a mismatch of that layer (padding bits included: the ABI says zero)."""
    cm, models = _synthetic_models()
    rng = np.random.default_rng(2)
    for flavour, base in models.items():
        for init in base.graph.initializer:
            if init.name.endswith((".zeropt", ".bitwidth")):
                continue
            layer = max((n for n in cm.layers if init.name.startswith(n + ".")), key=len)
            m = onnx.ModelProto()
            m.CopyFrom(base)
            t = next(i for i in m.graph.initializer if i.name == init.name)
            a = W._tensor({t.name: t}, t.name, "t")
            if t.data_type == onnx.TensorProto.INT4:
                raw = bytearray(t.raw_data)
                raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(4))  # low nibble: never the pad nibble
                t.raw_data = bytes(raw)
            else:
                a = a.copy()
                flat = a.reshape(-1)
                if a.dtype == np.uint64:
                    flat[rng.integers(flat.size)] ^= np.uint64(1) << np.uint64(rng.integers(64))
                elif init.name.endswith(".float"):
                    j = rng.choice(np.flatnonzero(flat))
                    flat[j] = -flat[j]
                else:
                    flat[rng.integers(flat.size)] += np.asarray(0.5, a.dtype) if a.dtype.kind == "f" else 1
                t.CopyFrom(numpy_helper.from_array(a, t.name))
            res = W.check(m, flavour, cm)
            assert res["status"] == "fail" and res["first_mismatch"] == layer, (flavour, init.name, res)


# ---------------------------------------------------------------- manifests (3b)

@pytest.mark.parametrize("doc, why", [
    ([1, 2], "not an spfq-deploy manifest (the JSON is a list, not an object)"),
    ("text", "the JSON is a string"),
    ({"format": "someone-else/export", "format_version": 1}, "format 'someone-else/export', expected"),
    ({"format": "spfq-deploy/tvm-export", "format_version": 1}, "expected 'spfq-deploy/onnx-export'"),
    ("newer", "format_version 2 is newer than this spfq-deploy reads (1)"),
    ("no-version", "format_version None is not a version number"),
    ("files-list", "'files' is a list, not an object"),
])
def test_bad_manifest_is_one_line_exit_2(export_dir, capsys, tmp_path, doc, why):
    out = _copy(export_dir, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    if doc == "newer":
        doc = {**m, "format_version": 2}
    elif doc == "no-version":
        doc = {k: v for k, v in m.items() if k != "format_version"}
    elif doc == "files-list":
        doc = {**m, "files": list(m["files"])}
    elif isinstance(doc, dict):
        doc = {**m, **doc}
    (out / "manifest.json").write_text(json.dumps(doc))
    rc = main(["validate", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("spfq-deploy: error:") and why in err[0], err


def test_one_bad_manifest_of_several_stops_validation(export_dir, capsys, tmp_path):
    """The rule (README "Validate"): any manifest validate cannot trust stops it, even when
    another manifest of the folder is fine."""
    out = _copy(export_dir, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.tvm.json").write_text(json.dumps({**m, "format": "spfq-deploy/tvm-export",
                                                       "format_version": 99}))
    rc = main(["validate", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "manifest.tvm.json: format_version 99 is newer" in err[0], err


# ---------------------------------------------------------------- runner scripts (3c)

def _tampered_runner(folder: Path, name: str, marker: Path) -> None:
    body = (folder / name).read_text()
    assert "from __future__ import annotations\n" in body
    (folder / name).write_text(body.replace("from __future__ import annotations\n", "from __future__ import "
                                            f"annotations\nopen({str(marker)!r}, 'w').write('ran')\n", 1))


def test_changed_onnx_runner_is_never_run(export_dir, tmp_path):
    from spfq_deploy.errors import SpfqError
    from spfq_deploy.validate import runners

    out = _copy(export_dir, tmp_path)
    files = json.loads((out / "manifest.json").read_text())["files"]
    marker = tmp_path / "ran"
    _tampered_runner(out, "run_onnx.py", marker)
    with pytest.raises(SpfqError, match=r"run_onnx.py: sha256 differs from manifest.json .*not run"):
        runners.run_onnx_qemu(out, out / "model.spfq.onnx", None, {}, files)
    with pytest.raises(SpfqError, match="run_onnx.py has no checksum in manifest.json: not run"):
        runners.run_onnx_qemu(out, out / "model.spfq.onnx", None, {}, {})
    assert not marker.exists()


def test_changed_tvm_runner_is_never_run(export_dir, tmp_path):
    from spfq_deploy.validate import runners

    out = _copy(export_dir, tmp_path)
    marker = tmp_path / "ran"
    (out / "run_tvm.py").write_text('"""a runner"""\nfrom __future__ import annotations\n')  # an onnx-only folder
    _tampered_runner(out, "run_tvm.py", marker)
    art = runners.Artifact("model.arm64.so", "tvm", "arm64", "int8", "int8", "tvm library", runner="qemu")
    files = {"run_tvm.py": {"sha256": "0" * 64, "bytes": 1}}
    res = runners.run_tvm_qemu(out, [art], ["input"], {"input": np.zeros((1, 1, 28, 28), np.float32)}, files)
    assert res == {"model.arm64.so": "run_tvm.py: sha256 differs from manifest.tvm.json "
                   f"({(out / 'run_tvm.py').stat().st_size:,} bytes): not run (validate executes it; export the "
                   "folder again)"}
    assert not marker.exists()


# ---------------------------------------------------------------- --json / --report paths (7)

@pytest.mark.parametrize("opt", ["--json", "--report"])
def test_bad_output_path_is_refused_before_validating(export_dir, capsys, tmp_path, opt):
    for dest, why in ((tmp_path / "missing" / "v.out", "output directory"), (tmp_path, "is a directory")):
        rc = main(["validate", str(export_dir), opt, str(dest)])
        cap = capsys.readouterr()
        err = cap.err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and why in err[0] and opt in err[0], err
        assert "[ok]" not in cap.out  # refused before the run, not after it
