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
from torch import nn

from spfq_deploy.cli import main as cli_main
from spfq_deploy.compressed import CompressedModel
from spfq_deploy.errors import SpfqError
from spfq_deploy.export import tvm_export, tvm_graph
from spfq_deploy.export.capture import ExportInputs
from spfq_deploy.reference import Int8ActivationLayer, int8_activation_reference, load_reference
from spfq_deploy.targets import get_target

from test_export_onnx import CASES, CONVS, INPUTS, SHAPES, _cosine_rows, _layer, _torch_float

ROOT = Path(__file__).resolve().parents[1]
HOST = get_target("x86_64")


def _kind(geometry: str) -> str:
    return "linear" if geometry == "linear" else ("conv1d" if geometry == "conv1d" else "conv2d")


# ------------------------------------------------------------------ every layout x geometry

class _Branches(nn.Module):
    """One independent layer per input (placeholders: the export replaces each by its marker)."""

    def __init__(self, n: int):
        super().__init__()
        for i in range(n):
            setattr(self, f"b{i}", nn.Identity())
        self.n = n

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
    mod, infos, _ = tvm_export.build_module(_Branches(len(xs)), cm, inputs, activation, log=lambda *a: None)
    assert {i["layout"] for i in infos.values()} == {"sign", "sign_mask", "planes", "sparse"}
    vm, lib = tvm_export.load(tvm_export.compile_library(mod, HOST, tmp_path / "m.so"))
    calls = tvm_export.kernel_calls(lib)
    got = tvm_export.run(vm, *[x.numpy() for x in xs])
    groups = sum(int(la.conv["groups"]) if la.conv else 1 for la in layers)
    assert tvm_export.kernel_calls(lib) - calls == groups  # one kernel GEMM per layer and conv group
    for layer, x, y in zip(layers, xs, got):
        want = _torch_float(layer, x).numpy() if activation == "float" else Int8ActivationLayer(layer)(x).double().numpy()
        tol = 2e-5 * max(1.0, float(np.abs(want).max()))
        assert y.shape == want.shape, layer.name
        np.testing.assert_allclose(y, want, rtol=0, atol=tol, err_msg=f"{layer.name} {layer.alphabet} {layer.kind}")


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = nn.Identity()

    def forward(self, x0):
        return self.b0(x0)


def test_packed_function_reports_bad_input(tmp_path):
    layer = _layer("linear", "int", 4, shape=(8, 70))
    cm = CompressedModel(layers={"b0": dataclasses.replace(layer, name="b0")}, float_params={})
    inputs = ExportInputs((torch.zeros(1, 2, 70),), ["x0"], ["y0"], {"x0": {1: "seq"}})
    mod, _, dyn = tvm_export.build_module(_One(), cm, inputs, "float", log=lambda *a: None)
    assert dyn == {"x0": [1]}
    vm, _ = tvm_export.load(tvm_export.compile_library(mod, HOST, tmp_path / "m.so"))
    assert tvm_export.run(vm, np.zeros((1, 0, 70), np.float32))[0].shape == (1, 0, 8)
    assert tvm_export.run(vm, np.ones((1, 5, 70), np.float32))[0].shape == (1, 5, 8)
    with pytest.raises(Exception):  # the VM checks the static last axis before the kernel runs
        tvm_export.run(vm, np.zeros((1, 2, 69), np.float32))


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
    tvm_export.export_tvm(mnist_spfq, base / "float", target="x86_64", activations="float", log=lambda *a: None)
    tvm_export.export_tvm(mnist_spfq, base / "int8", target="arm64", activations="int8", log=lambda *a: None)
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
    vm, lib = tvm_export.load(out / "model.x86_64.so")
    before = tvm_export.kernel_calls(lib)
    got = tvm_export.run(vm, x.numpy())[0]
    assert tvm_export.kernel_calls(lib) - before == 4  # conv1, conv2, fc1, fc2: all packed
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() == 1.0
    # dynamic batch: another batch size runs through the same library
    assert tvm_export.run(vm, x[:3].numpy())[0].shape == (3, 10)


def test_mnist_int8_activations_match_the_integer_reference(mnist_exports):
    out = mnist_exports["int8"]
    from spfq_deploy.pack import container

    x = _digits()
    cm = container.load(out / "model.spfq")
    ref = load_reference(out / "model.spfq")
    with torch.no_grad():
        y8 = int8_activation_reference(ref, cm)(x).numpy()
    vm, _ = tvm_export.load(out / "model.x86_64.so")
    got = tvm_export.run(vm, x.numpy())[0]
    assert (got.argmax(1) == y8.argmax(1)).mean() == 1.0
    assert _cosine_rows(got, y8).min() > 0.9999


def test_packed_kernels_are_the_compiled_path(mnist_exports, mnist_spfq):
    """No float copy of a compressed weight in the Relax module; the library holds the kernels
    (hidden symbols in .symtab) and exports the packed function the VM calls."""
    from spfq_deploy.export.onnx_export import export_inputs
    from spfq_deploy.modelspec import load_model
    from spfq_deploy.pack import container
    from spfq_deploy.reference import apply_compressed
    from tvm import ir, relax

    cm = container.load(mnist_spfq)
    model, module = load_model(cm.model_spec)
    apply_compressed(model, cm)
    mod, _, _ = tvm_export.build_module(model, cm, export_inputs(module, module.calibration), "float",
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
    m = json.loads((out / tvm_export.MANIFEST).read_text())
    assert m["target"] == "arm64" and m["activations"] == "int8"
    assert set(m["libraries"]) == {"arm64", "x86_64"}
    assert tvm_export.elf_machine(out / "model.arm64.so") == "aarch64" == m["libraries"]["arm64"]["elf_machine"]
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
    vm, _ = tvm_export.load(out / "model.x86_64.so")
    with np.load(out / "inputs.npz") as feeds, np.load(out.parent / "o.npz") as o:
        np.testing.assert_array_equal(o["output_0"], tvm_export.run(vm, *[feeds[k] for k in feeds.files])[0])


# ------------------------------------------------------------------ zoo model: dynamic spatial axes

def test_zoo_model_dynamic_batch_and_spatial_axes(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo_model
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    res = compress_model(zoo_model.build(), zoo_model.calibration(), bits=2, method="rtn", progress=False,
                         model_spec="tests/zoo_model.py")
    container.save(tmp_path / "z.spfq", res.model)
    m = tvm_export.export_tvm(tmp_path / "z.spfq", tmp_path / "out", target="x86_64", activations="float",
                              log=lambda *a: None)
    assert m["inputs"]["dynamic_axes"] == {"input": [0, 2, 3]}
    ref = load_reference(tmp_path / "z.spfq")
    vm, _ = tvm_export.load(tmp_path / "out" / "model.x86_64.so")
    for shape in [(2, 3, 12, 12), (3, 3, 9, 14)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = ref(x).numpy()
        got = tvm_export.run(vm, x.numpy())[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


# ------------------------------------------------------------------ MiniLM (dynamic batch + sequence)

@pytest.mark.slow
def test_minilm_dynamic_batch_and_sequence(tmp_path):
    import examples.minilm as ml
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    res = compress_model(ml.build(), ml.calibration(16), bits=4, sparsity=0.5, method="rtn", progress=False,
                         model_spec="examples/minilm.py")
    container.save(tmp_path / "m.spfq", res.model)
    m = tvm_export.export_tvm(tmp_path / "m.spfq", tmp_path / "out", target="x86_64", activations="float",
                              log=lambda *a: None)
    assert m["inputs"]["dynamic_axes"] == {"input_ids": [0, 1], "attention_mask": [0, 1]}
    ref = load_reference(tmp_path / "m.spfq")
    vm, lib = tvm_export.load(tmp_path / "out" / "model.x86_64.so")
    for texts in (ml.calibration_sentences(40)[30:35], ml.calibration_sentences(2)):
        ids, mask = ml.pad_batch(ml._token_ids(texts))
        before = tvm_export.kernel_calls(lib)
        got = tvm_export.run(vm, ids.numpy(), mask.numpy())[0]
        assert tvm_export.kernel_calls(lib) - before == len(res.model.layers)
        with torch.no_grad():
            want = ref(ids, mask).numpy()
        assert _cosine_rows(got, want).min() >= 0.9999


# ------------------------------------------------------------------ CLI and bad input

def test_cli_tvm_export_and_bad_input(tmp_path, mnist_spfq, capsys):
    out = tmp_path / "o"
    assert cli_main(["export", str(mnist_spfq), "--format", "tvm", "--target", "x86_64", "--activations", "float",
                     "-o", str(out)]) == 0
    assert (out / "model.x86_64.so").is_file() and (out / tvm_export.MANIFEST).is_file()
    assert cli_main(["export", str(mnist_spfq), "--format", "tvm", "-o", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert cli_main(["export", str(mnist_spfq), "--format", "tvm", "--target", "nope", "-o", str(tmp_path / "n")]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    bad = tmp_path / "bad.spfq"
    bad.write_bytes(b"not a container")
    assert cli_main(["export", str(bad), "--format", "tvm", "-o", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_missing_tvm_target_table_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "bare.toml").write_text('name = "bare"\narch = "x86_64"\ntriple = "x86_64-linux-gnu"\n'
                                        'run = "native"\ncc = "cc"\ncxx = "c++"\n')
    monkeypatch.setenv("SPFQ_TARGETS_DIR", str(tmp_path))
    with pytest.raises(SpfqError, match=r"no \[tvm\] table"):
        tvm_export.tvm_target(get_target("bare"))


def test_format_all_writes_both_exports(tmp_path, mnist_spfq):
    out = tmp_path / "all"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "spfq_deploy.cli", "export", str(mnist_spfq), "--format", "all",
                        "--flavours", "stock", "-o", str(out)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert {"manifest.json", tvm_export.MANIFEST, "model.stock.onnx", "model.x86_64.so"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------ arm64 under qemu-aarch64

def _arm64_python() -> Path:
    """build/arm64-python (kernels/tvm/arm64_python.sh makes it once: Debian arm64 python3.11 +
    aarch64 wheels of numpy / apache-tvm / apache-tvm-ffi); a failure to make it fails the test."""
    py = ROOT / "build" / "arm64-python" / "python3"
    if not py.is_file():
        r = subprocess.run(["bash", str(ROOT / "kernels" / "tvm" / "arm64_python.sh")], capture_output=True, text=True,
                           env=dict(os.environ, PYTHON=sys.executable))
        assert r.returncode == 0, r.stderr
    return py


def test_arm64_library_runs_under_qemu_with_neon_kernels(mnist_exports, tmp_path):
    """The cross-compiled library, loaded by an arm64 Python with only the runtime packages, runs
    the packed NEON kernels and computes what the host library computes."""
    out = mnist_exports["int8"]
    r = subprocess.run([str(_arm64_python()), "run_tvm.py", "model.arm64.so", "inputs.npz", "-o", str(tmp_path / "a.npz")],
                       cwd=out, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["spfq_tvm_calls"] == 4 and "isa neon" in report["library"]
    vm, _ = tvm_export.load(out / "model.x86_64.so")
    with np.load(out / "inputs.npz") as feeds, np.load(tmp_path / "a.npz") as got:
        want = tvm_export.run(vm, *[feeds[k] for k in feeds.files])[0]
        np.testing.assert_allclose(got["output_0"], want, rtol=0, atol=1e-5 * np.abs(want).max())
