"""Group-wise scales (--group-size G, issue 16): one float16 scale per (output row, group of G
consecutive input columns), the last group shorter when G does not divide the columns.

Checked here: the C column loop rounds column t with its group's scale bit for bit as the
Python reference does; round to nearest with groups equals a plain numpy rounding; group
scales beat per-row scales on a layer's output error for every alphabet and method; the
dequantised weights are codes times the group's scale; the .spfq container (format version 3)
round-trips grouped layers exactly and refuses inconsistent tables; files without groups keep
their version; the command line takes 32 / 64 / 128 and refuses anything else with one line;
`export --format all` (custom ops, stock: DequantizeLinear blocks = groups, MatMulNBits in ORT;
QONNX; TVM) of a linear model and of a CNN (few-channel, depthwise, pointwise, grouped, 3x3
convs) validates exactly at 1-bit, ternary and 4-bit; the CUDA kernels (per-row scales only)
refuse such a file with one line and no output, and PackedWeights refuses a grouped layer.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from cli_run import run_cli
from gptq_reference import published_gptq

from spfq_deploy import kernels
from spfq_deploy.compress import compress_model, native
from spfq_deploy.compress.alphabet import Alphabet, make_alphabet, quantize
from spfq_deploy.compress.config import CompressConfig
from spfq_deploy.compress.layer import Grams, compress_weights
from spfq_deploy.compress.path_following import gram_path_following
from spfq_deploy.compressed import CompressedLayer, CompressedModel
from spfq_deploy.errors import FormatError, SpfqError
from spfq_deploy.pack import load, read_header, save
from spfq_deploy.reference import Int8ActivationLayer, load_reference, quantize_rows_i8

DT = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def layer_data(g=1, n=12, d=200, m=256, seed=0):
    """A layer whose input columns have very different weight magnitudes (where per-row scales
    lose most): W (g, n, d), Grams of X and a perturbed Xt, and the data itself."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.relu(torch.randn(g, m, d, generator=gen, dtype=DT))
    Xt = X + 0.05 * torch.randn(g, m, d, generator=gen, dtype=DT)
    X[..., 5] = Xt[..., 5] = 0.0  # a dead input column
    W = torch.randn(g, n, d, generator=gen, dtype=DT) * torch.linspace(0.05, 3.0, d, dtype=DT)
    tr = Xt.transpose(-1, -2)
    return W, Grams(tr @ X, tr @ Xt, X.transpose(-1, -2) @ X, m)


# ---------------------------------------------------------------- compression

@pytest.mark.parametrize("alphabet,bits,sparsity", [("int", 4, 0.0), ("int", 3, 0.4), ("binary", 1, 0.0),
                                                     ("binary", 1, 0.3), ("ternary", 2, 0.0), ("ternary", 2, 0.5)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_c_column_loop_rounds_each_column_with_its_group_scale(alphabet, bits, sparsity, stochastic):
    W, gr = layer_data(g=2, n=9, d=150, seed=bits)
    group = 64  # 150 = 64 + 64 + 22
    Cs = torch.tensor([0.4, 1.1], dtype=DT)
    f = torch.tensor([1.5, 2.5], dtype=DT) if sparsity else None
    alph = make_alphabet(alphabet, bits, W, Cs, lam_factor=f, sparsity=sparsity, group=group)
    assert alph.delta.shape == (2, 2, 9, 3)
    cols = alph.columns(W.shape[-1])
    assert cols.delta.shape == (2, 2, 9, 150)
    assert torch.equal(cols.delta[..., 128:], alph.delta[..., 2:3].expand(2, 2, 9, 22))
    U = torch.rand(W.shape, generator=torch.Generator().manual_seed(3), dtype=DT) if stochastic else None
    shape = (2,) + W.shape
    codes_ref = torch.zeros(shape, dtype=torch.int8)

    def step(z, t):  # the Python reference: column t on its own group's alphabet
        a_t = Alphabet(cols.alphabet, cols.bits, cols.delta[..., t], cols.lam[..., t], cols.pruned)
        c = quantize(z, a_t, stochastic, None if U is None else U[..., t])
        codes_ref[..., t] = c
        return a_t.values(c)

    Q_ref = gram_path_following(W, gr.G, gr.H, step, 48, shape)
    codes, Q, _ = native.path_following(W, gr.G, gr.H, cols, U, 48, shape, per_column=True)
    assert torch.equal(codes, codes_ref)
    assert torch.equal(Q, Q_ref)
    assert torch.equal(Q, alph.values(codes))  # the values are the group scales' levels


def numpy_rtn(W, K, C, group, binary):
    """Round to nearest with one scale per (row, group), written plainly: delta = float16(C R / K)
    with R the group's max |w|; codes round half away from zero, clipped to [-K, K]."""
    n, d = W.shape
    codes = np.zeros((n, d), np.int8)
    scales = np.zeros((n, -(-d // group)), np.float64)
    for i in range(n):
        for j, c0 in enumerate(range(0, d, group)):
            w = W[i, c0:c0 + group]
            delta = float(np.float16(C * np.abs(w).max() / K))
            scales[i, j] = delta
            if binary:
                codes[i, c0:c0 + group] = np.where(w >= 0, 1, -1)
            else:
                codes[i, c0:c0 + group] = np.clip(np.sign(w) * np.floor(np.abs(w) / delta + 0.5), -K, K)
    return codes, scales


@pytest.mark.parametrize("bits,K", [(1, 1), ("ternary", 1), (4, 7), (8, 127)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_rtn_with_groups_equals_a_plain_numpy_rounding(bits, K, group):
    W, gr = layer_data(n=7, d=200)
    res = compress_weights(W, gr, CompressConfig(bits=bits, method="rtn", group_size=group, c_grid=(0.8,)), 0)
    codes, scales = numpy_rtn(W[0].numpy(), K, 0.8, group, bits == 1)
    assert res.alphabet.delta.shape == (1, 7, -(-200 // group))
    np.testing.assert_array_equal(res.alphabet.delta[0].numpy(), scales)
    np.testing.assert_array_equal(res.codes[0].numpy(), codes)


@pytest.mark.parametrize("bits", [1, "ternary", 4])
@pytest.mark.parametrize("method", ["rtn", "gpfq", "spfq", "gptq"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_group_scales_beat_row_scales_on_the_output_error(bits, method, sparsity):
    W, gr = layer_data(seed=2)
    errs = []
    for group in (0, 64):
        cfg = CompressConfig(bits=bits, method=method, sparsity=sparsity, group_size=group)
        res = compress_weights(W, gr, cfg, 0)
        errs.append(res.rel_error)
        assert abs(res.sparsity - sparsity) <= 0.01 or (sparsity == 0 and bits != 1)
    assert errs[1] < errs[0], errs


@pytest.mark.parametrize("bits", [1, 4])
def test_mse_scale_is_chosen_per_group(bits):
    W, gr = layer_data(n=5, d=150, seed=4)
    cfg = CompressConfig(bits=bits, method="rtn", scale="mse", group_size=32)
    res = compress_weights(W, gr, cfg, 0)
    K = 1 if bits == 1 else 7
    lowest = 0.05 if bits == 1 else 0.2
    shrinks = [1.0 - i * 0.01 for i in range(round((1.0 - lowest) / 0.01) + 1)]
    A = W[0].abs().numpy()
    for i in range(5):
        for j, c0 in enumerate(range(0, 150, 32)):
            w, R = W[0, i, c0:c0 + 32].numpy(), A[i, c0:c0 + 32].max()

            def err(c):
                delta = float(np.float16(c * R / K))
                q = np.where(w >= 0, delta, -delta) if bits == 1 else \
                    np.clip(np.sign(w) * np.floor(np.abs(w) / delta + 0.5), -K, K) * delta
                return ((w - q) ** 2).sum()
            best = min(shrinks, key=lambda c: (err(c), -c))  # ties keep the larger factor
            assert float(res.alphabet.delta[0, i, j]) == float(np.float16(best * R / K))


@pytest.mark.parametrize("bits,sparsity", [(3, 0.0), (4, 0.3), ("ternary", 0.0)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_groups_equals_published_gptq_on_the_group_alphabets(bits, sparsity, act_order):
    W, gr = layer_data(n=6, d=130, seed=5)
    cfg = CompressConfig(bits=bits, method="gptq", act_order=act_order, group_size=32, sparsity=sparsity,
                         c_grid=(0.9,), block=40)
    res = compress_weights(W, gr, cfg, 0)
    a = res.alphabet
    assert a.delta.shape == (1, 6, 5)
    cols = a.columns(130)
    lam, delta = cols.lam[0].numpy(), cols.delta[0].numpy()
    mags = np.stack([lam + j * delta for j in range(a.K)], -1)  # (n, d, K)
    vals = np.concatenate([-mags, mags] + ([np.zeros(lam.shape + (1,))] if a.has_zero else []), -1)
    ks = np.arange(1, a.K + 1)
    codes_of = np.broadcast_to(np.concatenate([-ks, ks] + ([[0]] if a.has_zero else [])), vals.shape)
    want = published_gptq(W[0], gr.H[0], vals, codes_of, act_order=act_order)
    np.testing.assert_array_equal(res.codes[0].numpy(), want)


def test_config_refuses_bad_group_sizes():
    for bad in (48, 256, -64, 1, True, "64"):
        with pytest.raises(SpfqError, match="group size"):
            CompressConfig(group_size=bad)
    with pytest.raises(SpfqError, match="per_layer_delta"):
        CompressConfig(group_size=64, per_layer_delta=True)
    assert "group_size" not in CompressConfig().to_dict()  # files without groups: same config record
    assert CompressConfig(group_size=32).to_dict()["group_size"] == 32


# ---------------------------------------------------------------- the compressed layer and the file

def grouped_layer(name, alphabet, bits, shape, group, rng, *, sparsity=0.0, lam=False, kind="linear", conv=None):
    N, d = shape[0], int(np.prod(shape[1:]))
    K = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if alphabet == "binary":
        codes = rng.choice(np.array([-1, 1], np.int8), size=(N, d))
    else:
        codes = rng.integers(-K, K + 1, size=(N, d)).astype(np.int8)
    if sparsity:
        codes[rng.random((N, d)) < sparsity] = 0
    ng = -(-d // group)
    f16 = (lambda a: a.astype(np.float16).astype(np.float32))
    scale = f16(rng.random((N, ng)) + 0.1)
    return CompressedLayer(name=name, kind=kind, weight_shape=tuple(shape), alphabet=alphabet, bits=bits,
                           codes=codes, scale=scale, lam=f16(scale * 2.5) if lam else None,
                           bias=rng.standard_normal(N).astype(np.float32), conv=conv,
                           meta={"method": "gpfq", **({"sparsity_target": sparsity} if sparsity else {})},
                           group_size=group)


@pytest.fixture
def grouped_model():
    rng = np.random.default_rng(16)
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]}
    layers = [grouped_layer("fc.bin", "binary", 1, (5, 200), 64, rng),
              grouped_layer("fc.bin_pruned", "binary", 1, (4, 96), 32, rng, sparsity=0.4),
              grouped_layer("conv.tern", "ternary", 2, (6, 8, 3, 3), 32, rng, kind="conv2d", conv=conv),
              grouped_layer("fc.int4", "int", 4, (7, 256), 128, rng),
              grouped_layer("fc.sparse", "int", 5, (3, 130), 64, rng, sparsity=0.6, lam=True),
              grouped_layer("fc.short", "int", 3, (2, 20), 64, rng)]  # one group shorter than G
    return CompressedModel({lay.name: lay for lay in layers}, {"emb": np.arange(4, dtype=np.float32)},
                           "m.py:build", {"seed": 1})


def test_dequantised_weights_are_codes_times_the_group_scale(grouped_model):
    for layer in grouped_model.layers.values():
        W = layer.dequantize().reshape(layer.rows, -1)
        G = layer.group_size
        for i in range(layer.rows):
            for j in range(layer.cols):
                k, s = int(layer.codes[i, j]), float(layer.scale[i, j // G])
                if layer.K == 1:
                    want = np.sign(k) * s
                elif layer.lam is None:
                    want = k * s
                else:
                    want = np.sign(k) * (float(layer.lam[i, j // G]) + (abs(k) - 1) * s) if k else 0.0
                assert W[i, j] == np.float32(want), (layer.name, i, j)


def test_container_round_trip_is_exact(tmp_path, grouped_model):
    path = tmp_path / "g.spfq"
    table = save(path, grouped_model)
    back = load(path)
    for name, a in grouped_model.layers.items():
        b = back.layers[name]
        assert b.group_size == a.group_size and b.scale.shape == (a.rows, -(-a.cols // a.group_size))
        np.testing.assert_array_equal(b.codes, a.codes)
        np.testing.assert_array_equal(b.scale, a.scale)
        assert (a.lam is None) == (b.lam is None)
        if a.lam is not None:
            np.testing.assert_array_equal(b.lam, a.lam)
        np.testing.assert_array_equal(b.dequantize(), a.dequantize())
    h = read_header(path)
    assert h["format_version"] == 3
    e = h["layers"]["fc.sparse"]
    assert e["group_size"] == 64 and table["layers"]["fc.sparse"]["group_size"] == 64
    assert h["tensors"]["layer/fc.sparse/scale"] == {"dtype": "F16", "shape": [3, 3]}
    assert h["tensors"]["layer/fc.sparse/lam"] == {"dtype": "F16", "shape": [3, 3]}
    sr = e["storage_report"]
    assert sr["scale_bits"] == 2 * 16 * 3 * 3
    assert sr["bits_per_weight"] == sr["total_bits"] / (3 * 130)
    save(tmp_path / "again.spfq", back)
    assert (tmp_path / "again.spfq").read_bytes() == path.read_bytes()  # deterministic bytes


def test_a_file_without_groups_keeps_its_version(tmp_path, grouped_model):
    rng = np.random.default_rng(3)
    plain = grouped_layer("fc", "int", 4, (4, 128), 64, rng)
    plain.scale, plain.group_size = plain.scale[:, 0].copy(), 0
    table = save(tmp_path / "p.spfq", CompressedModel({"fc": plain}, {}, None, {}))
    assert "group_size" not in table["layers"]["fc"]
    assert read_header(tmp_path / "p.spfq")["format_version"] == 1


def _edit_table(path, edit):
    import hashlib

    from safetensors import numpy as st_numpy

    tensors = st_numpy.load_file(str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    edit(meta)
    meta["spfq_sha256"] = hashlib.sha256(meta["spfq"].encode()).hexdigest()
    st_numpy.save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.update(format_version="2"), ["group_size needs format version 3"]),
    (lambda m: m.update(spfq=m["spfq"].replace('"group_size": 128', '"group_size": "128"')), ["group_size"]),
    (lambda m: m.update(spfq=m["spfq"].replace('"group_size": 128', '"group_size": 0')), ["group_size 0"]),
    (lambda m: m.update(spfq=m["spfq"].replace('"group_size": 128', '"group_size": 64')), ["scale", "[7, 4]"]),
    (lambda m: m.update(spfq=m["spfq"].replace('"group_size": 128, ', '')), ["scale", "[7]"]),
])
def test_inconsistent_group_tables_are_refused(tmp_path, grouped_model, edit, words):
    path = tmp_path / "g.spfq"
    save(path, grouped_model)
    _edit_table(path, edit)
    for read in (load, read_header):
        with pytest.raises(FormatError) as info:
            read(path)
        msg = str(info.value)
        assert "\n" not in msg and "fc.int4" in msg or "group_size needs" in msg, msg
        for w in words:
            assert w in msg, msg


def test_int8_reference_sums_the_groups(grouped_model):
    """Int8ActivationLayer with groups is the dequantised layer applied to the int8-quantised input."""
    layer = grouped_model.layers["fc.sparse"]
    x = torch.randn(4, layer.cols, generator=torch.Generator().manual_seed(0))
    y = Int8ActivationLayer(layer)(x).double()
    q, xs = quantize_rows_i8(x)
    want = xs.double()[:, None] * (q @ torch.from_numpy(layer.dequantize()).double().T) + \
        torch.from_numpy(layer.bias).double()
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_kernels_refuse_grouped_layers(grouped_model):
    with pytest.raises(kernels.KernelError, match="group-wise scales"):
        kernels.PackedWeights.from_layer(grouped_model.layers["fc.int4"])


# ---------------------------------------------------------------- command line

MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 10)).eval()

    def calibration():
        g = torch.Generator().manual_seed(1)
        return torch.randn(128, 96, generator=g) * torch.linspace(0.1, 2.0, 96)
''')


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "mlp.py"
    p.write_text(MODEL_SRC)
    return p


def test_cli_compress_inspect_reference_with_groups(model_file, tmp_path, capsys):
    out = tmp_path / "g.spfq"
    code, stdout, err = run_cli(capsys, "compress", model_file, "--bits", "4", "--group-size", "64", "-o", out, "-q")
    assert code == 0, err
    cm = load(out)
    assert {n: (lay.group_size, lay.scale.shape) for n, lay in cm.layers.items()} == \
        {"0": (64, (80, 2)), "2": (64, (10, 2))}  # 96 = 64 + 32, 80 = 64 + 16 columns
    assert cm.meta["config"]["group_size"] == 64
    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0 and "g64" in stdout and "format version 3" in stdout
    h = read_header(out)
    sr = h["layers"]["0"]["storage_report"]
    assert sr["scale_bits"] == 16 * 80 * 2 and sr["bits_per_weight"] == pytest.approx(4 + 16 * 2 / 96)
    # the file alone rebuilds the model that compress evaluated
    model, module = _load(model_file)
    res = compress_model(model, module.calibration(), bits=4, group_size=64, progress=False)
    x = module.calibration()[:8]
    with torch.no_grad():
        assert torch.equal(load_reference(out)(x), res.reference(x))


def _load(path):
    from spfq_deploy.modelspec import load_model
    return load_model(str(path))


@pytest.mark.parametrize("value", ["48", "0", "256", "-64", "abc", "", "64.0"])
def test_cli_bad_group_size_is_one_line(model_file, tmp_path, capsys, value):
    out = tmp_path / "g.spfq"
    code, _, err = run_cli(capsys, "compress", model_file, "--group-size", value, "-o", out, "-q")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("spfq-deploy: error: --group-size"), err
    assert "32, 64, 128" in lines[0] and not out.exists()


def test_cli_group_size_with_per_layer_delta_is_one_line(model_file, tmp_path, capsys):
    out = tmp_path / "g.spfq"
    code, _, err = run_cli(capsys, "compress", model_file, "--group-size", "32", "--per-layer-delta", "-o", out, "-q")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "per_layer_delta" in lines[0] and not out.exists(), err


@pytest.fixture(scope="module")
def cuda_emulation():
    """The CUDA kernel library's host-emulation build (no GPU here): the kernels' code run on the
    CPU with host memory as the device's."""
    from spfq_deploy.cuda_runtime import CudaLibrary
    from spfq_deploy.export.cuda import library as cuda_library
    from spfq_deploy.targets import get_target

    return CudaLibrary(cuda_library.build(get_target("cuda"), emulate=True))


@pytest.mark.parametrize("alphabet,bits,sparsity,lam", [("binary", 1, 0.0, False), ("binary", 1, 0.4, False),
                                                        ("ternary", 2, 0.0, False), ("int", 4, 0.0, False),
                                                        ("int", 3, 0.95, True), ("int", 8, 0.5, True)])
def test_cuda_grouped_layers_equal_the_cpu_grouped_kernels(cuda_emulation, alphabet, bits, sparsity, lam):
    """cuda_runtime.CudaGroupedWeights (one per-row GPU kernel call per scale group on the rows
    quantised once over K, float sums in group order, then bias) bit for bit the CPU
    spfq_grouped_matmul_q8, on the CUDA library's host-emulation build (sparse groups included);
    a grouped conv through CudaLayer agrees with the int8 reference."""
    from spfq_deploy.cuda_runtime import CudaGroupedWeights, CudaLayer

    rng = np.random.default_rng(bits)
    layer = grouped_layer("fc", alphabet, bits, (19, 200), 64, rng, sparsity=sparsity, lam=lam)
    x = (rng.standard_normal((5, 200)) * np.linspace(0.1, 3, 200)).astype(np.float32)
    want = kernels.GroupedWeights.from_layer(layer).matmul_q8(x)
    np.testing.assert_array_equal(CudaGroupedWeights(cuda_emulation, layer).forward_f32(x), want)
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 2, "kernel_size": [3, 3]}
    cl = grouped_layer("conv", alphabet, bits, (6, 8, 3, 3), 32, rng, sparsity=sparsity, lam=lam, kind="conv2d",
                       conv=conv)
    xi = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        got, ref = CudaLayer(cuda_emulation, cl)(xi), Int8ActivationLayer(cl)(xi)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


LINEAR_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(200, 96), nn.ReLU(), nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, 10)).eval()

    def calibration():
        g = torch.Generator().manual_seed(1)
        return torch.randn(128, 200, generator=g) * torch.linspace(0.1, 2.0, 200)
''')


@pytest.mark.parametrize("bits,extra", [("1", []), ("ternary", []), ("4", ["--sparsity", "0.3"])])
def test_linear_model_exports_format_all_and_validates(tmp_path, capsys, bits, extra):
    """Linear layers with --group-size 64 (K = 200: a short last group; K = 64; the fused ReLU and
    HardSwish after the sum), `export --format all`: the custom ops (int8 and float activations:
    PackedMatMul with group_size, spfq_grouped_*), stock, QONNX and the TVM library (packed
    layers with group_size) all validate, every ONNX layer exact against model.spfq."""
    model = tmp_path / "lin.py"
    model.write_text(LINEAR_SRC)
    spfq = tmp_path / "g.spfq"
    assert run_cli(capsys, "compress", model, "--bits", bits, "--group-size", "64", *extra, "-o", spfq, "-q")[0] == 0
    for act in ("int8", "float"):
        out = tmp_path / f"out_{act}"
        flavours = "custom,stock,qonnx" if act == "int8" else "custom"
        fmt = "all" if act == "int8" else "onnx"
        code, _, err = run_cli(capsys, "export", spfq, "-o", out, "--target", "x86_64", "--activations", act,
                               "--flavours", flavours, "--format", fmt)
        assert code == 0, err
        report = tmp_path / f"v_{act}.json"
        code, stdout, _ = run_cli(capsys, "validate", out, "--json", report)
        assert code == 0, stdout
        rows = [r for r in json.loads(report.read_text())["rows"] if r.get("file") and r["kind"] != "info"]
        want = [f"model.{f}.onnx" for f in flavours.replace("custom", "spfq").split(",")]
        assert sorted(r["file"] for r in rows) == sorted(want + (["model.x86_64.so"] if fmt == "all" else []))
        for r in rows:
            assert r["status"] == "ok", r
            assert r["file"].endswith(".so") or r["weights"]["exact"] == 3, r
            assert all(x["local_ok"] for x in r.get("layers", [])), r.get("layers")
        import onnx
        g = onnx.load(str(out / "model.spfq.onnx")).graph
        sizes = [a.i for n in g.node for a in n.attribute if a.name == "group_size"]
        assert sizes == [64, 64, 64]


CNN_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                             nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=2),
                             nn.Hardswish(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(24 * 36, 40), nn.ReLU(), nn.Linear(40, 10)).eval()

    def calibration():
        g = torch.Generator().manual_seed(1)
        return torch.randn(96, 3, 6, 6, generator=g)
''')


@pytest.mark.parametrize("bits", ["1", "ternary", "4"])
def test_cnn_exports_format_all_and_validates(tmp_path, capsys, bits):
    """A CNN compressed with --group-size 64: a few-channel first conv (K = 27, one short group),
    a depthwise conv (K = 9), a pointwise one (K = 8), a grouped one (2 conv groups, K = 72: a
    short last group), a 3x3 one (K = 144), Linear K = 864 and 40, fused ReLU / HardSwish.
    `export --format all` (custom ops int8: grouped convs through im2col GEMMs with float edges;
    stock; QONNX; TVM) then `spfq-deploy validate`: every artifact passes (the custom ops and TVM
    against the integer reference, layer by layer where validate checks layers), every ONNX
    layer's weights exact against model.spfq;
    the stock Linear layer fuses to MatMulNBits with block_size 64 in onnxruntime."""
    import onnx
    import onnxruntime as ort

    model = tmp_path / "cnn.py"
    model.write_text(CNN_SRC)
    spfq, out = tmp_path / "g.spfq", tmp_path / "out"
    assert run_cli(capsys, "compress", model, "--bits", bits, "--group-size", "64", "-o", spfq, "-q")[0] == 0
    code, _, err = run_cli(capsys, "export", spfq, "-o", out, "--format", "all", "--target", "x86_64")
    assert code == 0, err
    report = tmp_path / "v.json"
    code, stdout, _ = run_cli(capsys, "validate", out, "--json", report)
    assert code == 0, stdout
    rows = {r["file"]: r for r in json.loads(report.read_text())["rows"] if r.get("file") and r["kind"] != "info"}
    assert sorted(rows) == ["model.qonnx.onnx", "model.spfq.onnx", "model.stock.onnx", "model.x86_64.so"]
    for f, r in rows.items():
        assert r["status"] == "ok", r
        if f.endswith(".onnx"):
            assert r["weights"]["status"] == "ok" and r["weights"]["exact"] == 7
        assert all(x["local_ok"] for x in r.get("layers", [])), r.get("layers")
    sizes = [a.i for n in onnx.load(str(out / "model.spfq.onnx")).graph.node for a in n.attribute
             if a.name == "group_size"]
    assert sizes == [64] * 7
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    ort.InferenceSession(str(out / "model.stock.onnx"), so, providers=["CPUExecutionProvider"])
    nbits = [{a.name: a.i for a in n.attribute} for n in onnx.load(so.optimized_model_filepath).graph.node
             if n.op_type == "MatMulNBits"]
    # (the first Linear, after Flatten on rank-2 rows, is taken by ORT's Gemm fusion first, as without groups)
    assert [(a["K"], a["block_size"]) for a in nbits] == [(40, 64)], nbits


def test_cnn_float_activations_custom_and_tvm_validate(tmp_path, capsys):
    """--activations float: the custom ops and TVM run the weight-only grouped kernels; both
    validate against the dequantised model."""
    model = tmp_path / "cnn.py"
    model.write_text(CNN_SRC)
    spfq, out = tmp_path / "g.spfq", tmp_path / "out"
    assert run_cli(capsys, "compress", model, "--bits", "4", "--group-size", "32", "--method", "gptq",
                   "--act-order", "-o", spfq, "-q")[0] == 0
    code, _, err = run_cli(capsys, "export", spfq, "-o", out, "--format", "all", "--flavours", "custom",
                           "--activations", "float", "--target", "x86_64")
    assert code == 0, err
    report = tmp_path / "v.json"
    code, stdout, _ = run_cli(capsys, "validate", out, "--json", report)
    assert code == 0, stdout
    rows = {r["file"]: r for r in json.loads(report.read_text())["rows"] if r.get("file")}
    assert sorted(rows) == ["model.spfq.onnx", "model.x86_64.so"]
    assert all(r["status"] == "ok" and r["kind"] == "float" for r in rows.values()), rows


def test_cnn_arm64_tvm_library_validates_under_qemu(tmp_path, capsys):
    """The TVM library cross-compiled for arm64 (NEON kernels, group-wise scales in every conv
    and Linear) validates under qemu-aarch64 against the integer reference."""
    model = tmp_path / "cnn.py"
    model.write_text(CNN_SRC)
    spfq, out = tmp_path / "g.spfq", tmp_path / "out"
    assert run_cli(capsys, "compress", model, "--bits", "4", "--group-size", "64", "-o", spfq, "-q")[0] == 0
    code, _, err = run_cli(capsys, "export", spfq, "-o", out, "--format", "tvm", "--target", "arm64")
    assert code == 0, err
    report = tmp_path / "v.json"
    code, stdout, _ = run_cli(capsys, "validate", out, "--target", "arm64", "--json", report)
    assert code == 0, stdout
    rows = [r for r in json.loads(report.read_text())["rows"] if r.get("file")]
    assert [(r["file"], r["target"], r["status"]) for r in rows] == [("model.arm64.so", "arm64", "ok")], rows


def test_cuda_export_records_the_group_size(tmp_path, capsys):
    """export --target cuda of a grouped CNN: the CUDA library and manifest.cuda.json (each layer's
    group_size, which cuda_runtime runs per scale group); validate passes its CPU rows and skips
    the cuda line only for the missing GPU."""
    model = tmp_path / "cnn.py"
    model.write_text(CNN_SRC)
    spfq, out = tmp_path / "g.spfq", tmp_path / "out"
    assert run_cli(capsys, "compress", model, "--bits", "ternary", "--group-size", "32", "-o", spfq, "-q")[0] == 0
    code, _, err = run_cli(capsys, "export", spfq, "-o", out, "--target", "cuda", "--flavours", "stock")
    assert code == 0, err
    layers = json.loads((out / "manifest.cuda.json").read_text())["layers"]
    assert len(layers) == 7 and all(e["group_size"] == 32 for e in layers.values()), layers
    report = tmp_path / "v.json"
    code, stdout, _ = run_cli(capsys, "validate", out, "--json", report)
    assert code == 0, stdout
    rows = json.loads(report.read_text())["rows"]
    assert all(r["status"] in ("ok", "info") for r in rows if r["target"] != "cuda"), rows
