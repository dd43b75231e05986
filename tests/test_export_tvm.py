"""TVM export: every layer layout / conv geometry through the packed function against independent
references, real models end to end (MNIST CNN, MiniLM), proof that the packed kernels are the
compiled path, the arm64 cross-compiled library, the runner script, the manifest, bad input.

References: the dequantised PyTorch model (float activations) and the integer reference written
in torch (spfq_deploy.reference.Int8ActivationLayer) for int8 activations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_onnx import CASES, CONVS, INPUTS, SHAPES, _cosine_rows, _float_layers, _layer, _torch_float
from torch import nn

from spfq_deploy import kernels
from spfq_deploy.cli import main as cli_main
from spfq_deploy.compressed import CompressedModel
from spfq_deploy.errors import SpfqError
from spfq_deploy.export import export
from spfq_deploy.export.source import ExportInputs
from spfq_deploy.export.tvm import compile as tvm_compile
from spfq_deploy.export.tvm import graph as tvm_graph
from spfq_deploy.export.tvm import runtime as tvm_runtime
from spfq_deploy.export.tvm.backend import Backend as TvmBackend
from spfq_deploy.reference import Int8ActivationLayer, int8_activation_reference, load_reference
from spfq_deploy.targets import get_target

ROOT = Path(__file__).resolve().parents[1]
HOST = get_target("x86_64")


def _kind(geometry: str) -> str:
    return "linear" if geometry == "linear" else ("conv1d" if geometry == "conv1d" else "conv2d")


# ------------------------------------------------------------------ every layout x geometry

def _module_for(layer) -> nn.Module:
    """The torch module a compressed layer stands for (the export replaces it by its marker)."""
    if layer.kind == "linear":
        return nn.Linear(layer.cols, layer.rows)
    c, ws = layer.conv, layer.weight_shape
    conv = nn.Conv2d if layer.kind == "conv2d" else nn.Conv1d
    return conv(ws[1] * c["groups"], ws[0], c["kernel_size"], c["stride"], c["padding"], c["dilation"], c["groups"])


class _Branches(nn.Module):
    """One independent layer per input."""

    def __init__(self, layers):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, f"b{i}", _module_for(layer))
        self.n = len(layers)

    def forward(self, *xs):
        return tuple(getattr(self, f"b{i}")(x) for i, x in enumerate(xs))


@pytest.fixture(scope="module")
def all_layers():
    layers, xs = [], []
    rng = np.random.default_rng(5)
    for case in CASES:
        for geometry in CONVS:
            layer = _layer(_kind(geometry), shape=SHAPES[geometry], conv=CONVS[geometry], **CASES[case])
            layers.append(dataclasses.replace(layer, name=f"b{len(layers)}"))
            xs.append(torch.from_numpy(rng.standard_normal(INPUTS[geometry]).astype(np.float32)))
    return layers, xs


@pytest.mark.parametrize("activation", ["float", "int8"])
def test_every_layout_and_geometry_matches_its_reference(tmp_path, all_layers, activation):
    """9 weight kinds x 5 geometries (grouped, depthwise, strided + dilated + padded conv2d, conv1d,
    linear over a sequence) compiled as one Relax module: each output against its reference."""
    layers, xs = all_layers
    cm = CompressedModel(layers={la.name: la for la in layers}, float_params={})
    names = [f"x{i}" for i in range(len(xs))]
    inputs = ExportInputs(tuple(xs), names, [f"y{i}" for i in range(len(xs))], {})
    mod, infos, _ = tvm_compile.build_module(_Branches(layers), cm, inputs, activation, log=lambda *a: None)
    assert {i["layout"] for i in infos.values()} == {"sign", "sign_mask", "planes", "sparse"}
    vm, lib = tvm_runtime.load(tvm_compile.compile_library(mod, HOST, tmp_path / "m.so"))
    calls = tvm_runtime.kernel_calls(lib)
    got = tvm_runtime.run(vm, *[x.numpy() for x in xs])
    # one kernel GEMM per layer and conv group; one direct call per depthwise layer
    groups = sum(int(la.conv["groups"]) if la.conv and not kernels.is_depthwise(la) else 1 for la in layers)
    assert tvm_runtime.kernel_calls(lib) - calls == groups
    for layer, x, y in zip(layers, xs, got):
        act = kernels.layer_activation(layer, activation)  # depthwise layers stay float
        assert infos[layer.name]["activation"] == act
        want = _torch_float(layer, x).numpy() if act == "float" else Int8ActivationLayer(layer)(x).double().numpy()
        tol = 2e-5 * max(1.0, float(np.abs(want).max()))
        assert y.shape == want.shape, layer.name
        np.testing.assert_allclose(y, want, rtol=0, atol=tol, err_msg=f"{layer.name} {layer.alphabet} {layer.kind}")


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = nn.Linear(70, 8)

    def forward(self, x0):
        return self.b0(x0)


def test_packed_function_reports_bad_input(tmp_path):
    layer = _layer("linear", "int", 4, shape=(8, 70))
    cm = CompressedModel(layers={"b0": dataclasses.replace(layer, name="b0")}, float_params={})
    inputs = ExportInputs((torch.zeros(1, 2, 70),), ["x0"], ["y0"], {"x0": {1: "seq"}})
    mod, _, dyn = tvm_compile.build_module(_One(), cm, inputs, "float", log=lambda *a: None)
    assert dyn == {"x0": [1]}
    vm, _ = tvm_runtime.load(tvm_compile.compile_library(mod, HOST, tmp_path / "m.so"))
    assert tvm_runtime.run(vm, np.zeros((1, 0, 70), np.float32))[0].shape == (1, 0, 8)
    assert tvm_runtime.run(vm, np.ones((1, 5, 70), np.float32))[0].shape == (1, 5, 8)
    with pytest.raises(Exception):  # the VM checks the static last axis before the kernel runs
        tvm_runtime.run(vm, np.zeros((1, 2, 69), np.float32))


# ------------------------------------------------------------------ MNIST CNN end to end

@pytest.fixture(scope="module")
def mnist_spfq(tmp_path_factory):
    import examples.mnist_cnn as mnist
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    base = tmp_path_factory.mktemp("mnist_tvm")
    res = compress_model(mnist.build(), mnist.calibration(128), bits=4, sparsity=0.5, method="rtn",
                         progress=False, model_spec="examples/mnist_cnn.py")
    container.save(base / "m.spfq", res.model)
    return base / "m.spfq"


@pytest.fixture(scope="module")
def mnist_exports(mnist_spfq):
    base = mnist_spfq.parent
    export(mnist_spfq, base / "float", formats=("tvm",), target="arm64", activations="float", log=lambda *a: None)
    export(mnist_spfq, base / "int8", formats=("tvm",), target="arm64", activations="int8", log=lambda *a: None)
    return {"float": base / "float", "int8": base / "int8"}


def _digits(n=512):
    import examples.mnist_cnn as mnist

    return mnist.load_digits()[0][:n]


def test_mnist_float_activations_match_the_dequantised_model(mnist_exports):
    out = mnist_exports["float"]
    x = _digits()
    ref = load_reference(out / "model.spfq")
    with torch.no_grad():
        want = ref(x).numpy()
    vm, lib = tvm_runtime.load(out / "model.x86_64.so")
    before = tvm_runtime.kernel_calls(lib)
    got = tvm_runtime.run(vm, x.numpy())[0]
    assert tvm_runtime.kernel_calls(lib) - before == 4  # conv1, conv2, fc1, fc2: all packed
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() == 1.0
    print("float", {"max_abs_vs_ref": float(np.abs(got - want).max()), "max_abs_ref": float(np.abs(want).max())})
    # dynamic batch: another batch size runs through the same library
    assert tvm_runtime.run(vm, x[:3].numpy())[0].shape == (3, 10)


def test_mnist_int8_activations_match_the_integer_reference(mnist_exports):
    out = mnist_exports["int8"]
    from spfq_deploy.pack import container

    x = _digits()
    cm = container.load(out / "model.spfq")
    ref = load_reference(out / "model.spfq")
    with torch.no_grad():
        y8 = int8_activation_reference(ref, cm, _float_layers(cm))(x).numpy()
    vm, _ = tvm_runtime.load(out / "model.x86_64.so")
    got = tvm_runtime.run(vm, x.numpy())[0]
    assert (got.argmax(1) == y8.argmax(1)).mean() == 1.0
    assert _cosine_rows(got, y8).min() > 0.9999
    print("int8", {"max_abs_vs_int8_ref": float(np.abs(got - y8).max()), "cos_vs_int8_ref_min": float(_cosine_rows(got, y8).min())})


def test_packed_kernels_are_the_compiled_path(mnist_exports, mnist_spfq):
    """No float copy of a compressed weight in the Relax module; the library holds the kernels
    (hidden symbols in .symtab) and exports the packed function the VM calls."""
    from tvm import ir, relax

    from spfq_deploy.export.source import export_inputs
    from spfq_deploy.modelspec import load_model
    from spfq_deploy.pack import container
    from spfq_deploy.reference import apply_compressed

    cm = container.load(mnist_spfq)
    model, module = load_model(cm.model_spec)
    apply_compressed(model, cm)
    mod, _, _ = tvm_compile.build_module(model, cm, export_inputs(module, module.calibration), "float",
                                        log=lambda *a: None)
    consts, calls = [], []

    def visit(e):
        if isinstance(e, ir.GenericConst):
            consts.append((str(e.ty.dtype), [int(s) for s in e.ty.shape.values]))
        if isinstance(e, relax.Call) and e.op.name == "relax.call_dps_packed":
            calls.append(e.args[0].global_symbol)

    relax.analysis.post_order_visit(mod["main"], visit)
    assert calls == [tvm_graph.PACKED_FUNC] * len(cm.layers)
    floats = [int(np.prod(s)) for d, s in consts if d == "float32"]
    for layer in cm.layers.values():
        assert layer.rows * layer.cols not in floats, layer.name
    assert max(floats) <= max(la.rows for la in cm.layers.values())  # only scales / biases
    for lib in (mnist_exports["float"] / "model.x86_64.so", mnist_exports["int8"] / "model.arm64.so"):
        nm = "aarch64-linux-gnu-nm" if "arm64" in lib.name else "nm"
        dyn = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
        assert "__tvm_ffi_spfq_packed_layer" in dyn
        syms = subprocess.run([nm, str(lib)], capture_output=True, text=True, check=True).stdout
        assert "spfq_matmul_f32" in syms and "spfq_matmul_i8" in syms and "spfq_prepare" in syms


def test_arm64_library_manifest_and_runner(mnist_exports):
    out = mnist_exports["int8"]
    m = json.loads((out / TvmBackend.MANIFEST).read_text())
    assert m["target"] == "arm64" and m["activations"] == "int8"
    assert set(m["libraries"]) == {"arm64", "x86_64"}
    assert tvm_runtime.elf_machine(out / "model.arm64.so") == "aarch64" == m["libraries"]["arm64"]["elf_machine"]
    assert m["libraries"]["arm64"]["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert "spfq-tvm 1" in m["libraries"]["x86_64"]["library_info"]
    assert m["inputs"]["dynamic_axes"] == {"input": [0]}
    assert any(p.startswith("apache-tvm==") for p in m["runtime_packages"])
    for rel, entry in m["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert {"model.arm64.so", "model.x86_64.so", "model.spfq", "inputs.npz", "run_tvm.py"} <= set(m["files"])
    # the runner on the host library, with only the runtime imports it needs
    r = subprocess.run([sys.executable, "run_tvm.py", "model.x86_64.so", "inputs.npz", "-o", str(out.parent / "o.npz")],
                       cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["spfq_tvm_calls"] == 4 and report["outputs"][0][1] == 10
    vm, _ = tvm_runtime.load(out / "model.x86_64.so")
    with np.load(out / "inputs.npz") as feeds, np.load(out.parent / "o.npz") as o:
        np.testing.assert_array_equal(o["output_0"], tvm_runtime.run(vm, *[feeds[k] for k in feeds.files])[0])


# ------------------------------------------------------------------ zoo model: dynamic spatial axes

def test_zoo_model_dynamic_batch_and_spatial_axes(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo_model

    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    res = compress_model(zoo_model.build(), zoo_model.calibration(), bits=2, method="rtn", progress=False,
                         model_spec="tests/zoo_model.py")
    container.save(tmp_path / "z.spfq", res.model)
    m = export(tmp_path / "z.spfq", tmp_path / "out", formats=("tvm",), target="x86_64", activations="float",
               log=lambda *a: None)["manifest.tvm.json"]
    assert m["inputs"]["dynamic_axes"] == {"input": [0, 2, 3]}
    ref = load_reference(tmp_path / "z.spfq")
    vm, _ = tvm_runtime.load(tmp_path / "out" / "model.x86_64.so")
    for shape in [(2, 3, 12, 12), (3, 3, 9, 14)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = ref(x).numpy()
        got = tvm_runtime.run(vm, x.numpy())[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


# ------------------------------------------------------------------ MiniLM (dynamic batch + sequence)

@pytest.mark.slow
def test_minilm_int8_dynamic_batch_and_sequence(tmp_path):
    """The full 6-layer MiniLM with int8 activations (the default export) on the host: traced with
    2 sentences, run with 5 and 2 others (batch and sequence axes); against the integer reference
    and the float model with the ONNX export's tolerances. Float activations: the 2-layer stack
    tests (same ops, real weights) on x86_64 and arm64."""
    import examples.minilm as ml
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    res = compress_model(ml.build(), ml.calibration(16), bits=4, sparsity=0.5, method="rtn", progress=False,
                         model_spec="examples/minilm.py")
    container.save(tmp_path / "m.spfq", res.model)
    m = export(tmp_path / "m.spfq", tmp_path / "out", formats=("tvm",), target="x86_64", activations="int8",
               log=lambda *a: None)["manifest.tvm.json"]
    assert m["inputs"]["dynamic_axes"] == {"input_ids": [0, 1], "attention_mask": [0, 1]}
    vm, lib = tvm_runtime.load(tmp_path / "out" / "model.x86_64.so")
    for texts in (ml.calibration_sentences(40)[30:35], ml.calibration_sentences(2)):
        ids, mask = ml.pad_batch(ml._token_ids(texts))
        before = tvm_runtime.kernel_calls(lib)
        got = tvm_runtime.run(vm, ids.numpy(), mask.numpy())[0]
        assert tvm_runtime.kernel_calls(lib) - before == len(res.model.layers) == 36
        yf, y8 = _minilm_references(tmp_path / "m.spfq", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        print(_check_minilm(got, yf, y8, "int8"))


# ------------------------------------------------------------------ CLI and bad input

def test_cli_tvm_export_and_bad_input(tmp_path, mnist_spfq, capsys):
    out = tmp_path / "o"
    assert cli_main(["export", str(mnist_spfq), "--format", "tvm", "--target", "x86_64", "--activations", "float",
                     "-o", str(out)]) == 0
    assert (out / "model.x86_64.so").is_file() and (out / TvmBackend.MANIFEST).is_file()
    assert cli_main(["export", str(mnist_spfq), "--format", "tvm", "-o", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert cli_main(["export", str(mnist_spfq), "--format", "tvm", "--target", "nope", "-o", str(tmp_path / "n")]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    bad = tmp_path / "bad.spfq"
    bad.write_bytes(b"not a container")
    assert cli_main(["export", str(bad), "--format", "tvm", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spfq-deploy: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    cut = tmp_path / "cut.spfq"  # truncated: the checksummed container notices
    cut.write_bytes(mnist_spfq.read_bytes()[:-100])
    assert cli_main(["export", str(cut), "--format", "tvm", "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spfq-deploy: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


_MISMATCH_MODEL = """
import torch
from torch import nn


class M(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv, self.fc = conv, nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def calibration():
    return torch.randn(32, 8, 8, 8, generator=torch.Generator().manual_seed(0))


def build():
    return M(nn.Conv2d(8, 8, 3)).eval()


def transposed():  # same weight shape (8, 8, 3, 3), another op
    return M(nn.ConvTranspose2d(8, 8, 3)).eval()


def reflect():
    return M(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")).eval()


def strided():
    return M(nn.Conv2d(8, 8, 3, stride=2)).eval()


def fft():  # a float op TVM's torch importer has no translation for
    class F(M):
        def forward(self, x):
            return torch.fft.rfft(self.fc(torch.relu(self.conv(x)).mean((2, 3)))).abs()
    return F(nn.Conv2d(8, 8, 3)).eval()
"""


@pytest.mark.parametrize("factory,message", [
    ("transposed", r"layer 'conv' is a ConvTranspose2d in the model but conv2d in the file"),
    ("reflect", r"layer 'conv': padding_mode='reflect' has no packed kernel"),
    ("strided", r"layer 'conv': stride is \[2, 2\] in the model but \[1, 1\] in the file"),
    ("fft", r"TVM's torch importer cannot translate the model: Unsupported function types \['_fft_r2c"),
])
def test_layers_without_a_packed_kernel_or_tvm_op_are_one_line_errors(tmp_path, capsys, factory, message):
    """A layer the packed kernels cannot run (another op or geometry in the model than in the
    file) and a float op TVM cannot import: no float fallback, one line, exit 2, nothing left."""
    from spfq_deploy.compress import compress_model
    from spfq_deploy.modelspec import load_model
    from spfq_deploy.pack import container

    src = tmp_path / "mm.py"
    src.write_text(_MISMATCH_MODEL)
    model, module = load_model(f"{src}:build")
    res = compress_model(model, [module.calibration()], bits=2, method="rtn", progress=False, model_spec=str(src))
    container.save(tmp_path / "m.spfq", res.model)
    with pytest.raises(SpfqError, match=message):
        export(tmp_path / "m.spfq", tmp_path / "o", formats=("tvm",), target="x86_64", model_spec=f"{src}:{factory}",
                              log=lambda *a: None)
    assert not (tmp_path / "o").exists()
    assert cli_main(["export", str(tmp_path / "m.spfq"), "--format", "tvm", "--model", f"{src}:{factory}",
                     "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spfq-deploy: error:"), err
    assert not (tmp_path / "o").exists()
    # the file's own model exports
    export(tmp_path / "m.spfq", tmp_path / "ok", formats=("tvm",), target="x86_64", log=lambda *a: None)


def test_missing_tvm_target_table_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "bare.toml").write_text('name = "bare"\narch = "x86_64"\ntriple = "x86_64-linux-gnu"\n'
                                        'run = "native"\ncc = "cc"\ncxx = "c++"\n')
    monkeypatch.setenv("SPFQ_TARGETS_DIR", str(tmp_path))
    with pytest.raises(SpfqError, match=r"no \[tvm\] table"):
        tvm_compile.tvm_target(get_target("bare"))


def test_format_all_writes_both_exports(tmp_path, mnist_spfq):
    out = tmp_path / "all"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "spfq_deploy.cli", "export", str(mnist_spfq), "--format", "all",
                        "--flavours", "stock", "-o", str(out)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert {"manifest.json", TvmBackend.MANIFEST, "model.stock.onnx", "model.x86_64.so"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------ MiniLM layer stack (real weights)

@pytest.fixture(scope="module")
def minilm_stack_exports(tmp_path_factory):
    """The real MiniLM encoder cut to 2 layers (tests/minilm_stack.py), ternary (sign + mask
    kernels; MNIST covers the bit-plane + lam ones), exported for arm64 (+ the x86_64 host)."""
    import minilm_stack

    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    base = tmp_path_factory.mktemp("minilm_stack_tvm")
    res = compress_model(minilm_stack.build(), minilm_stack.calibration(16), bits="ternary", method="rtn",
                         progress=False, model_spec="tests/minilm_stack.py")
    container.save(base / "m.spfq", res.model)
    for act in ("float", "int8"):
        export(base / "m.spfq", base / act, formats=("tvm",), target="arm64", activations=act, log=lambda *a: None)
    return {"float": base / "float", "int8": base / "int8", "layers": len(res.model.layers)}


def _minilm_references(spfq: Path, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
    """(dequantised float model, integer int8-activation reference) embeddings."""
    from spfq_deploy.pack import container

    ref = load_reference(spfq)
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    with torch.no_grad():
        return ref(ids, mask).numpy(), int8_activation_reference(ref, container.load(spfq))(ids, mask).numpy()


def _check_minilm(got: np.ndarray, yf: np.ndarray, y8: np.ndarray, activation: str) -> dict:
    """The ONNX export's MiniLM tolerances (test_export_onnx.py)."""
    if activation == "float":  # weight-only kernels: the dequantised model up to summation order
        assert _cosine_rows(got, yf).min() >= 0.9999
        return {"cos_vs_float_min": float(_cosine_rows(got, yf).min())}
    # int8 activations: exact per layer, but end to end a float32 difference upstream can move an
    # activation across a rounding boundary (one int8 step is ~1/127 of the row's largest value):
    # as close to the float model as the integer reference is, and close to the integer reference
    c_art, c_ref, c8 = _cosine_rows(got, yf), _cosine_rows(y8, yf), _cosine_rows(got, y8)
    assert (c_art >= c_ref - 0.002).all(), (c_art, c_ref)
    assert c8.mean() >= 0.995 and c8.min() >= 0.99, c8
    return {"cos_vs_int8_mean": float(c8.mean()), "cos_vs_int8_min": float(c8.min()),
            "cos_vs_float_min": float(c_art.min()), "int8_ref_cos_vs_float_min": float(c_ref.min())}


@pytest.mark.parametrize("activation", ["float", "int8"])
def test_minilm_stack_on_the_host(minilm_stack_exports, activation):
    """x86_64 library of the 2-layer real MiniLM: 8 real sentences (batch and length other than
    the traced ones) against the dequantised model / the integer reference."""
    import minilm_stack

    out = minilm_stack_exports[activation]
    feeds = minilm_stack.feeds()
    yf, y8 = _minilm_references(out / "model.spfq", feeds)
    vm, lib = tvm_runtime.load(out / "model.x86_64.so")
    before = tvm_runtime.kernel_calls(lib)
    got = tvm_runtime.run(vm, feeds["input_ids"], feeds["attention_mask"])[0]
    assert tvm_runtime.kernel_calls(lib) - before == minilm_stack_exports["layers"] == 12
    print(activation, _check_minilm(got, yf, y8, activation))


# ------------------------------------------------------------------ arm64 under qemu-aarch64

ARM64_PYTHON = ROOT / "build" / "arm64-python"


def _arm64_python() -> Path:
    """build/arm64-python/python3: Debian's arm64 python3.11 + aarch64 wheels of numpy /
    apache-tvm / apache-tvm-ffi, made by `make arm64-python` (a prerequisite of `make test`).
    Missing or for other TVM versions: the test fails (it never skips)."""
    import tvm
    import tvm_ffi

    py, version = ARM64_PYTHON / "python3", ARM64_PYTHON / "VERSION"
    if not (py.is_file() and version.is_file()):
        pytest.fail(f"{ARM64_PYTHON} is missing: run `make arm64-python` (make test does) to unpack the arm64 "
                    "Python that runs the TVM libraries under qemu-aarch64", pytrace=False)
    have = version.read_text().strip()
    pins = set(have.replace(";", " ").split())
    if f"apache-tvm=={tvm.__version__}" not in pins or f"apache-tvm-ffi=={tvm_ffi.__version__}" not in pins:
        pytest.fail(f"{ARM64_PYTHON} holds {have!r}, the venv apache-tvm {tvm.__version__} / apache-tvm-ffi "
                    f"{tvm_ffi.__version__}: run `make arm64-python`", pytrace=False)
    return py


@pytest.fixture(scope="module")
def qemu_runs(mnist_exports, minilm_stack_exports, tmp_path_factory):
    """One qemu-aarch64 process (one `import tvm`) runs the four cross-compiled libraries with the
    export's run_tvm.py on real inputs: 64 MNIST digits, 8 sentences. {job: (output, report)}."""
    import minilm_stack

    base = tmp_path_factory.mktemp("qemu")
    np.savez(base / "digits.npz", input=_digits(64).numpy())
    np.savez(base / "sentences.npz", **minilm_stack.feeds())
    jobs = {"mnist_float": (mnist_exports["float"], "digits.npz"), "mnist_int8": (mnist_exports["int8"], "digits.npz"),
            "minilm_float": (minilm_stack_exports["float"], "sentences.npz"),
            "minilm_int8": (minilm_stack_exports["int8"], "sentences.npz")}
    argv = []
    for out, feeds in jobs.values():
        argv += [str(out / "model.arm64.so"), str(base / feeds)]
    for job in jobs:
        argv += ["-o", str(base / f"{job}.out.npz")]
    runner = mnist_exports["float"] / "run_tvm.py"
    r = subprocess.run([str(_arm64_python()), str(runner), *argv], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(jobs), r.stdout
    res = {"inputs": base}
    for job, report in zip(jobs, reports):
        with np.load(base / f"{job}.out.npz") as o:
            res[job] = (o["output_0"], report)
    return res


@pytest.mark.parametrize("activation", ["float", "int8"])
def test_arm64_mnist_under_qemu_matches_the_reference(qemu_runs, mnist_exports, activation):
    """The cross-compiled MNIST library, loaded by an arm64 Python with only the runtime packages,
    runs the packed NEON kernels: 64 real digits against the dequantised model (float) / the
    integer reference (int8), top-1 agreement 100%, and the host library's output."""
    from spfq_deploy.pack import container

    got, report = qemu_runs[f"mnist_{activation}"]
    assert report["spfq_tvm_calls"] == 4 and "isa neon" in report["library_info"]
    out = mnist_exports[activation]
    x = _digits(64)
    ref = load_reference(out / "model.spfq")
    with torch.no_grad():
        want = ref(x).numpy() if activation == "float" else \
            int8_activation_reference(ref, container.load(out / "model.spfq"))(x).numpy()
    assert (got.argmax(1) == want.argmax(1)).mean() == 1.0
    if activation == "float":
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    else:
        assert _cosine_rows(got, want).min() > 0.9999
    vm, _ = tvm_runtime.load(out / "model.x86_64.so")
    host = tvm_runtime.run(vm, x.numpy())[0]
    np.testing.assert_allclose(got, host, rtol=0, atol=1e-5 * np.abs(host).max())
    print(activation, {"max_abs_vs_ref": float(np.abs(got - want).max()),
                       "cos_vs_ref_min": float(_cosine_rows(got, want).min()),
                       "max_abs_vs_host": float(np.abs(got - host).max())})


@pytest.mark.parametrize("activation", ["float", "int8"])
def test_arm64_minilm_stack_under_qemu_matches_the_reference(qemu_runs, minilm_stack_exports, activation):
    """The 2-layer real MiniLM cross-compiled for arm64 under qemu: 8 real sentences against the
    dequantised model / the integer reference (the ONNX export's tolerances)."""
    import minilm_stack

    got, report = qemu_runs[f"minilm_{activation}"]
    assert report["spfq_tvm_calls"] == minilm_stack_exports["layers"] and "isa neon" in report["library_info"]
    yf, y8 = _minilm_references(minilm_stack_exports[activation] / "model.spfq", minilm_stack.feeds())
    print(activation, _check_minilm(got, yf, y8, activation))
