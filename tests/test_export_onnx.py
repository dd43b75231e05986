"""ONNX export: the three flavours against independent references, real models end to end, the
custom-op library, the manifest, and bad input.

References: the dequantised PyTorch model (float flavours), and for the int8-activation custom
ops an integer reference written in torch (spfq_deploy.reference.Int8ActivationLayer), checked
layer by layer where its inputs are the same bits, end to end by cosine / top-1 agreement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from spfq_deploy.compressed import CompressedLayer, CompressedModel
from spfq_deploy.errors import SpfqError
from spfq_deploy.export import export
from spfq_deploy.export.onnx import capture as cap
from spfq_deploy.export.onnx import custom as onnx_custom
from spfq_deploy.export.onnx import graph as onnx_graph
from spfq_deploy.export.onnx import ort_library
from spfq_deploy.export.onnx import qonnx as onnx_qonnx
from spfq_deploy.export.onnx import stock as onnx_stock
from spfq_deploy.export.onnx.session import run_qonnx, session
from spfq_deploy.kernels import layer_activation, preferred_layout
from spfq_deploy.reference import Int8ActivationLayer, int8_activation_reference, load_reference
from spfq_deploy.targets import get_target


def _float_layers(cm):
    """The layers int8 exports run weight-only (depthwise: kernels.layer_activation)."""
    from spfq_deploy.kernels import layer_activation

    return frozenset(n for n, la in cm.layers.items() if layer_activation(la, "int8") == "float")


ROOT = Path(__file__).resolve().parents[1]
# The custom-op library needs ONNX Runtime's headers; `make test` fetches them (make ort-headers),
# so a missing header folder fails these tests instead of skipping them.


def _host_lib() -> Path:
    return ort_library.build(get_target("x86_64"))


def _cosine_rows(a, b):
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ------------------------------------------------------------------ one layer, every layout

def _layer(kind, alphabet, bits, sparsity=0.0, seed=0, shape=None, conv=None, bias=True, lam=False):
    rng = np.random.default_rng(seed)
    shape = shape or {"linear": (37, 203), "conv2d": (12, 3, 3, 3), "conv1d": (6, 4, 5)}[kind]
    n, d = shape[0], int(np.prod(shape[1:]))
    K = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    lo = -K
    codes = rng.integers(lo, K + 1, (n, d)).astype(np.int8)
    if alphabet == "binary":
        codes = np.where(rng.random((n, d)) < 0.5, -1, 1).astype(np.int8)
    if sparsity:
        codes[rng.random((n, d)) < sparsity] = 0
    scale = (rng.random(n) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    lam_v = (scale * (0.6 + rng.random(n))).astype(np.float16).astype(np.float32) if lam else None
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    layer = CompressedLayer(name="L", kind=kind, weight_shape=tuple(shape), alphabet=alphabet, bits=bits,
                            codes=codes, scale=scale, lam=lam_v, bias=b, conv=conv,
                            meta={"sparsity_target": sparsity} if sparsity else {})
    layer.validate()
    return layer


CASES = {
    "binary-sign": dict(alphabet="binary", bits=1),
    "binary-pruned": dict(alphabet="binary", bits=1, sparsity=0.5),
    "ternary": dict(alphabet="ternary", bits=2, sparsity=0.3),
    "int2": dict(alphabet="int", bits=2),
    "int4": dict(alphabet="int", bits=4),
    "int8": dict(alphabet="int", bits=8),
    "int4-lam-planes": dict(alphabet="int", bits=4, sparsity=0.5, lam=True),
    "int3-lam-sparse": dict(alphabet="int", bits=3, sparsity=0.95, lam=True),
    "int6-lam-allzero": dict(alphabet="int", bits=6, sparsity=1.0, lam=True),
}
CONVS = {
    "linear": None,
    "conv2d": {"kernel_size": [3, 3], "stride": [2, 1], "padding": [1, 2], "dilation": [1, 2], "groups": 1},
    "conv2d-grouped": {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 4},
    "conv2d-depthwise": {"kernel_size": [3, 3], "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 12},
    "conv1d": {"kernel_size": [5], "stride": [2], "padding": [2], "dilation": [1], "groups": 2},
    "conv2d-pointwise": {"kernel_size": [1, 1], "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1},
    "conv2d-1x1-s2": {"kernel_size": [1, 1], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "groups": 1},
    "conv2d-rgb": {"kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
}
SHAPES = {"linear": (37, 203), "conv2d": (12, 6, 3, 3), "conv2d-grouped": (12, 3, 3, 3),
          "conv2d-depthwise": (12, 1, 3, 3), "conv1d": (6, 4, 5), "conv2d-pointwise": (20, 70, 1, 1),
          "conv2d-1x1-s2": (9, 13, 1, 1), "conv2d-rgb": (12, 3, 3, 3)}
INPUTS = {"linear": (2, 5, 203), "conv2d": (2, 6, 9, 11), "conv2d-grouped": (2, 12, 7, 6),
          "conv2d-depthwise": (2, 12, 7, 6), "conv1d": (3, 8, 17), "conv2d-pointwise": (2, 70, 5, 6),
          "conv2d-1x1-s2": (1, 13, 7, 9), "conv2d-rgb": (2, 3, 9, 11)}


def _one_layer_model(layer: CompressedLayer, flavour: str, activation="int8", graph_pass=None) -> bytes:
    """input -> [marker] -> output, rewritten by a flavour builder (then graph_pass)."""
    rank = 3 if layer.kind != "conv2d" else 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [f"x{i}" for i in range(rank)])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"y{i}" for i in range(rank)])
    node = helper.make_node("Layer", ["x"], ["y"], domain=cap.CAPTURE_DOMAIN, name=layer.name)
    node.attribute.append(helper.make_attribute("name", layer.name))
    proto = helper.make_model(helper.make_graph([node], "one", [x], [y]))
    cm = CompressedModel(layers={layer.name: layer}, float_params={})
    build, domains = {"custom": (onnx_custom.builder(activation), {onnx_custom.DOMAIN: 1}),
                      "stock": (onnx_stock.builder(), {}),
                      "qonnx": (onnx_qonnx.builder(), {onnx_qonnx.DOMAIN: 1})}[flavour]
    model, _ = onnx_graph.rewrite(proto, cm, build, domains, graph_pass)
    return model


def _torch_float(layer: CompressedLayer, x: torch.Tensor) -> torch.Tensor:
    w = torch.from_numpy(layer.dequantize()).double()
    b = None if layer.bias is None else torch.from_numpy(layer.bias).double()
    x = x.double()
    if layer.kind == "linear":
        return F.linear(x, w, b)
    c = layer.conv
    fn = F.conv2d if layer.kind == "conv2d" else F.conv1d
    return fn(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])


def _save(model, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("geometry", list(CONVS))
@pytest.mark.parametrize("case", list(CASES))
def test_one_layer_every_flavour_matches_its_reference(tmp_path, case, geometry):
    kind = "linear" if geometry == "linear" else ("conv1d" if geometry == "conv1d" else "conv2d")
    layer = _layer(kind, shape=SHAPES[geometry], conv=CONVS[geometry], **CASES[case])
    x = torch.from_numpy(np.random.default_rng(5).standard_normal(INPUTS[geometry]).astype(np.float32))
    ref = _torch_float(layer, x).numpy()
    # depthwise and few-channel layers stay weight-only in int8 exports (kernels.layer_activation)
    ref8 = ref if layer_activation(layer, "int8") == "float" else Int8ActivationLayer(layer)(x).double().numpy()
    tol = 2e-5 * max(1.0, float(np.abs(ref).max()))
    lib = _host_lib()
    assert (preferred_layout(layer) == "sparse") == (case in ("int3-lam-sparse", "int6-lam-allzero"))
    for act, want in (("float", ref), ("int8", ref8)):
        model = _one_layer_model(layer, "custom", act)
        node = next(n for n in model.graph.node if n.domain == "ai.spfq")
        assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "activation")).decode() == \
            ("float" if geometry in ("conv2d-depthwise", "conv2d-rgb") else act)
        path = _save(model, tmp_path, f"c_{act}.onnx")
        got = session(path, lib).run(None, {"x": x.numpy()})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"custom {act}")
        if layer.kind != "linear":  # channels last (layout.py): the same GEMM rows, bit-identical
            model = _one_layer_model(layer, "custom", act, onnx_custom.graph_pass)
            assert [n.op_type for n in model.graph.node] == ["Transpose", "PackedConv", "Transpose"]
            last = session(_save(model, tmp_path, f"cl_{act}.onnx"), lib).run(None, {"x": x.numpy()})[0]
            np.testing.assert_array_equal(last, got, err_msg=f"channels-last custom {act}")
    path = _save(_one_layer_model(layer, "stock"), tmp_path, "s.onnx")
    got = session(path, accuracy_level=0).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg="stock acc0")
    got = run_qonnx(_save(_one_layer_model(layer, "qonnx"), tmp_path, "q.onnx"), {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg="qonnx")


def test_stock_flavour_fuses_to_matmulnbits_and_accuracy_level_is_pinned(tmp_path):
    """The blocked int4 DequantizeLinear + MatMul becomes com.microsoft.MatMulNBits in
    onnxruntime; level 0 keeps float parity, level 4 (int8 compute) measurably does not."""
    import onnxruntime as ort

    layer = _layer("linear", "int", 4, shape=(64, 256))
    path = _save(_one_layer_model(layer, "stock"), tmp_path, "s.onnx")
    x = np.random.default_rng(2).standard_normal((1, 3, 256)).astype(np.float32)
    ref = _torch_float(layer, torch.from_numpy(x)).numpy()
    errs = {}
    for level in (0, 4):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt{level}.onnx")
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        errs[level] = float(np.abs(s.run(None, {"x": x})[0] - ref).max())
        ops = [(n.op_type, {a.name: a.i for a in n.attribute}) for n in onnx.load(so.optimized_model_filepath).graph.node]
        nbits = [a for op, a in ops if op == "MatMulNBits"]
        assert nbits and nbits[0]["bits"] == 4 and nbits[0]["accuracy_level"] == level, ops
    assert errs[0] < 1e-4 < errs[4], errs


def test_custom_op_reports_shape_errors(tmp_path):
    layer = _layer("linear", "int", 4, shape=(8, 70))
    path = _save(_one_layer_model(layer, "custom"), tmp_path, "c.onnx")
    s = session(path, _host_lib())
    with pytest.raises(Exception, match="last axis must be 70"):
        s.run(None, {"x": np.zeros((1, 2, 69), np.float32)})
    assert s.run(None, {"x": np.zeros((1, 0, 70), np.float32)})[0].shape == (1, 0, 8)


# ------------------------------------------------------------------ real models, end to end

@pytest.fixture(scope="module")
def mnist_exports(tmp_path_factory):
    import examples.mnist_cnn as mnist
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    base = tmp_path_factory.mktemp("mnist")
    model, calib = mnist.build(), mnist.calibration(128)
    out = {}
    for tag, opts in {"1bit": dict(bits=1), "ternary": dict(bits="ternary"),
                      "4bit_sparse50": dict(bits=4, sparsity=0.5)}.items():
        res = compress_model(model, calib, progress=False, model_spec="examples/mnist_cnn.py", **opts)
        container.save(base / f"{tag}.spfq", res.model)
        export(base / f"{tag}.spfq", base / tag, target="arm64" if tag == "1bit" else None,
                    log=lambda *a: None)
        out[tag] = base / tag
    return out


def _run_flavours(out_dir: Path, feeds: dict, accuracy_levels=(0,)) -> dict:
    m = json.loads((out_dir / "manifest.json").read_text())
    lib = out_dir / m["custom_op_library"]["files"]["x86_64"] if m["custom_op_library"] else None
    res = {}
    if lib:
        res["custom"] = session(out_dir / "model.spfq.onnx", lib).run(None, feeds)[0]
    for level in accuracy_levels:
        res[f"stock{level}"] = session(out_dir / "model.stock.onnx", accuracy_level=level).run(None, feeds)[0]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["1bit", "ternary", "4bit_sparse50"])
def test_mnist_flavours_agree_with_reference(mnist_exports, tag):
    import examples.mnist_cnn as mnist
    from spfq_deploy.pack import container

    out = mnist_exports[tag]
    x, _ = mnist.load_digits()
    x = x[:512]
    cm = container.load(out / "model.spfq")
    ref = load_reference(out / "model.spfq")
    with torch.no_grad():
        yf = ref(x).numpy()
        y8 = int8_activation_reference(ref, cm, _float_layers(cm))(x).numpy()
    feeds = {"input": x.numpy()}
    got = _run_flavours(out, feeds, (0, 4))
    assert (got["custom"].argmax(1) == y8.argmax(1)).mean() == 1.0
    assert _cosine_rows(got["custom"], y8).min() > 0.9999
    assert (got["stock0"].argmax(1) == yf.argmax(1)).mean() == 1.0
    np.testing.assert_allclose(got["stock0"], yf, atol=1e-4 * np.abs(yf).max())
    assert (got["stock4"].argmax(1) == yf.argmax(1)).mean() >= 0.99
    q = run_qonnx(out / "model.qonnx.onnx", {"input": x[:64].numpy()})[0]
    np.testing.assert_allclose(q, yf[:64], atol=1e-4 * np.abs(yf).max())


@pytest.mark.slow
def test_export_files_checker_and_manifest(mnist_exports):
    out = mnist_exports["1bit"]
    m = json.loads((out / "manifest.json").read_text())
    for f in ("model.spfq.onnx", "model.stock.onnx", "model.qonnx.onnx"):
        model = onnx.load(out / f)
        onnx.checker.check_model(model)
        assert model.ir_version == cap.IR_VERSION <= 11  # onnxruntime 1.31 loads <= 11
        assert {o.domain: o.version for o in model.opset_import}[""] == cap.GRAPH_OPSET
        assert not any(n.domain == cap.CAPTURE_DOMAIN for n in model.graph.node)
    custom = onnx.load(out / "model.spfq.onnx")
    assert {n.op_type for n in custom.graph.node if n.domain == "ai.spfq"} == {"PackedConv", "PackedMatMul", "MaxPool"}
    packed = {i.name: i for i in custom.graph.initializer if i.name.endswith(".sign")}
    assert packed and all(i.data_type == TensorProto.UINT64 for i in packed.values())
    import hashlib
    for rel, entry in m["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert m["versions"]["onnxruntime"] and m["versions"]["onnx"] and m["opset"] == cap.GRAPH_OPSET
    libs = m["custom_op_library"]["files"]
    assert set(libs) == {"arm64", "x86_64"}
    assert m["custom_op_library"]["headers"]["ort_api_version"] >= 16
    arm = (out / libs["arm64"]).read_bytes()
    assert arm[:4] == b"\x7fELF" and int.from_bytes(arm[18:20], "little") == 183  # EM_AARCH64
    assert "ai.spfq 1" in m["custom_op_library"]["host_library_info"]


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    import examples.minilm as ml
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    base = tmp_path_factory.mktemp("minilm")
    # round to nearest keeps the fixture quick; pruning gives the non-uniform (lam) alphabet
    res = compress_model(ml.build(), ml.calibration(16), progress=False, bits=4, sparsity=0.5, method="rtn",
                         model_spec="examples/minilm.py")
    container.save(base / "m.spfq", res.model)
    export(base / "m.spfq", base / "out", log=lambda *a: None)
    export(base / "m.spfq", base / "float", activations="float", flavours=("custom",), log=lambda *a: None)
    return base


@pytest.mark.slow
def test_minilm_flavours_cosine_with_dynamic_axes(minilm_export):
    """Traced with 2 sentences; run with 5 others of other lengths (batch and sequence axes)."""
    import examples.minilm as ml
    from spfq_deploy.pack import container

    ids, mask = ml.pad_batch(ml._token_ids(ml.calibration_sentences(40)[30:35]))
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    out = minilm_export / "out"
    cm = container.load(out / "model.spfq")
    ref = load_reference(out / "model.spfq")
    with torch.no_grad():
        yf = ref(ids, mask).numpy()
        y8 = int8_activation_reference(ref, cm, _float_layers(cm))(ids, mask).numpy()
    got = _run_flavours(out, feeds, (0,))
    # weight-only custom ops: the dequantised model up to float summation order
    y = _run_flavours(minilm_export / "float", feeds, ())["custom"]
    assert _cosine_rows(y, yf).min() >= 0.9999
    # int8 activations: exact per layer (test_one_layer_*), but end to end a float32
    # difference upstream can move an activation across a rounding boundary, and one
    # int8 step is ~1/127 of the row's largest value; so the artifact must be as close to
    # the float model as the integer reference is, and close to the integer reference.
    c_art, c_ref = _cosine_rows(got["custom"], yf), _cosine_rows(y8, yf)
    assert (c_art >= c_ref - 0.002).all(), (c_art, c_ref)
    assert _cosine_rows(got["custom"], y8).mean() >= 0.995
    assert _cosine_rows(got["stock0"], yf).min() >= 0.999999
    q = run_qonnx(out / "model.qonnx.onnx", {k: v[:2] for k, v in feeds.items()})[0]
    assert _cosine_rows(q, yf[:2]).min() >= 0.999999


# ------------------------------------------------------------------ bad input, atomic output

def _cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "spfq_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=e)


@pytest.fixture(scope="module")
def zoo_spfq(tmp_path_factory):
    base = tmp_path_factory.mktemp("zoo")
    r = _cli("compress", "tests/zoo_model.py", "--bits", "4", "-q", "-o", base / "zoo.spfq")
    assert r.returncode == 0, r.stderr
    return base / "zoo.spfq"


def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_export_zoo_every_kind_parity(zoo_spfq, tmp_path):
    out = tmp_path / "out"
    r = _cli("export", zoo_spfq, "-o", out, "--activations", "float")
    assert r.returncode == 0, r.stderr
    ref = load_reference(zoo_spfq, "tests/zoo_model.py")
    x = torch.randn(3, 3, 10, 14)
    with torch.no_grad():
        want = ref(x).numpy()
    got = _run_flavours(out, {"input": x.numpy()})
    tol = 1e-4 * np.abs(want).max()
    for name, y in got.items():
        np.testing.assert_allclose(y, want, atol=tol, err_msg=name)
    np.testing.assert_allclose(run_qonnx(out / "model.qonnx.onnx", {"input": x.numpy()})[0], want, atol=tol)


@pytest.mark.parametrize("problem", ["not_spfq", "truncated", "wrong_model", "unknown_target", "exists"])
def test_export_bad_input_one_line_no_output(zoo_spfq, tmp_path, problem):
    src, extra = zoo_spfq, []
    out = tmp_path / "out"
    if problem == "not_spfq":
        src = tmp_path / "x.spfq"
        src.write_text("hello")
    elif problem == "truncated":
        src = tmp_path / "t.spfq"
        src.write_bytes(zoo_spfq.read_bytes()[:5000])
    elif problem == "wrong_model":
        extra = ["--model", "examples/mnist_cnn.py"]
    elif problem == "unknown_target":
        extra = ["--target", "sparc64"]
    elif problem == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    r = _cli("export", src, "-o", out, *extra)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spfq-deploy: error:"), r.stderr
    if problem == "exists":
        assert "--force" in lines[0] and (out / "keep.txt").read_text() == "mine"
    else:
        _no_leftovers(tmp_path, "out")
    if problem == "unknown_target":
        assert "known: " in lines[0] and "arm64" in lines[0] and "x86_64" in lines[0]


def test_export_force_replaces_and_missing_headers_skip_only_custom(zoo_spfq, tmp_path):
    out = tmp_path / "out"
    assert _cli("export", zoo_spfq, "-o", out, "--flavours", "custom").returncode == 0  # an earlier export
    r = _cli("export", zoo_spfq, "-o", out, "--force", env={"SPFQ_ORT_HEADERS": str(tmp_path / "none")})
    assert r.returncode == 0, r.stderr
    assert not (out / "lib").exists()  # the earlier export's files went with it
    m = json.loads((out / "manifest.json").read_text())
    assert "custom" in m["skipped"] and "make ort-headers" in m["skipped"]["custom"]
    assert not (out / "model.spfq.onnx").exists() and (out / "model.stock.onnx").is_file()
    assert "make ort-headers" in r.stdout + r.stderr


def test_missing_cross_compiler_names_the_debian_package(monkeypatch):
    t = get_target("arm64")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SpfqError, match="g(cc|\\+\\+)-aarch64-linux-gnu"):
        t.require(t.cc, t.cxx)
