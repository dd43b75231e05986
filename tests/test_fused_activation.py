"""Fused HardSwish / SiLU / PReLU epilogues (kernels/src/act.c, spfq_set_activation and the
depthwise / few-channel variants): every kernel path's output with the activation fused equals
the same kernel's unfused output passed through PyTorch's op, to float rounding (SiLU's exp is a
polynomial: a few ulp), on every ISA this CPU has; applied after the clamp and before the int8
quantisation of an int8 output; reaching the lazily built copies (spfq_conv_nhwc's reordered
weights, the weight-only lane tables) whether set before or after their first call."""

from __future__ import annotations

import json

import act_cnn
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from test_export_onnx import _layer as make_layer

from spfq_deploy import kernels as K
from spfq_deploy.cli import main

ISAS = [i for i in ("c", "avx2", "avx512", "amx", "neon") if K.lib().spfq_set_isa(i.encode()) == 0]
K.set_isa("auto")
KINDS = ["hardswish", "silu", "prelu"]


def _slope(n, seed=3):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32)


def _torch_act(kind, y, slope, axis):
    t = torch.from_numpy(np.ascontiguousarray(y))
    if kind == "hardswish":
        return F.hardswish(t).numpy()
    if kind == "silu":
        return F.silu(t).numpy()
    shape = [1] * y.ndim
    shape[axis] = -1
    return torch.where(t > 0, t, torch.from_numpy(slope).reshape(shape) * t).numpy()


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def _last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 5, 40, 300])  # GEMV, small, fused tall (AMX >= 16 rows), lane tables
def test_gemm_epilogue(isa, kind, m):
    layer = make_layer("linear", "int", 4, 0.2, seed=11, shape=(70, 130))
    x = np.random.default_rng(12).standard_normal((m, 130)).astype(np.float32) * 2
    slope = _slope(70)
    K.set_isa(isa)
    try:
        w = K.PackedWeights.from_layer(layer)
        w.set_clamp(-4.0, 5.0)
        plain = {"f32": w.matmul_f32(x), "q8": w.matmul_q8(x, threads=2)}
        w.set_activation(kind, slope)
        _close(w.matmul_f32(x, threads=2), _torch_act(kind, plain["f32"], slope, 1))
        _close(w.matmul_q8(x), _torch_act(kind, plain["q8"], slope, 1))
        # int8 output: the activation comes before the next layer's quantisation
        yq, ys = w.matmul_act(x, q8_out=True)
        wq, ws = K.quantize_i8(w.matmul_q8(x))
        np.testing.assert_array_equal(ys, ws)
        assert np.abs(yq.astype(int) - wq).max(initial=0) <= 1
        w.set_activation(None)
        np.testing.assert_array_equal(w.matmul_q8(x), plain["q8"])
    finally:
        K.set_isa("auto")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("before", [True, False])
def test_conv_nhwc_reaches_the_reordered_weights(kind, before):
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]}
    layer = make_layer("conv2d", "ternary", 2, 0.3, 7, shape=(24, 8, 3, 3), conv=conv)
    x = _last(np.random.default_rng(8).standard_normal((2, 8, 9, 11)).astype(np.float32))
    geom = K.ConvGeom(8, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
    slope = _slope(24)
    ref = K.PackedWeights.from_layer(layer)
    want = {i8: _torch_act(kind, ref.conv_nhwc(x, geom, i8), slope, 3) for i8 in (True, False)}
    w = K.PackedWeights.from_layer(layer)
    if before:
        w.set_activation(kind, slope)
    else:
        w.conv_nhwc(x, geom, True)  # builds the reordered copy first
        w.set_activation(kind, slope)
    for i8 in (True, False):
        _close(w.conv_nhwc(x, geom, i8, threads=2), want[i8])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chans,mult", [(32, 1), (6, 1), (3, 2)])  # row-major units, gathered blocks, mult > 1
def test_depthwise_epilogue(isa, kind, chans, mult):
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": chans, "kernel_size": [3, 3]}
    layer = make_layer("conv2d", "int", 4, 0.0, 5, shape=(chans * mult, 1, 3, 3), conv=conv)
    x = np.random.default_rng(6).standard_normal((2, chans, 7, 9)).astype(np.float32) * 3
    slope = _slope(chans * mult)
    K.set_isa(isa)
    try:
        dw = K.DepthwiseWeights(layer)
        dw.set_clamp(-3.0, 6.0)
        plain = {(i8, cl): dw(_last(x) if cl else x, i8, channels_last=cl) for i8 in (False, True) for cl in (False, True)}
        dw.set_activation(kind, slope)
        for (i8, cl), y in plain.items():
            _close(dw(_last(x) if cl else x, i8, threads=2, channels_last=cl), _torch_act(kind, y, slope, 3 if cl else 1))
        if mult == 1:  # the int8-pixel path with an int8 output: the activation before the quantisation
            yq, ys = K.dwconv_act(dw, _last(x), x.shape[:1] + x.shape[2:], q8_out=True)
            yf = K.dwconv_act(dw, _last(x), x.shape[:1] + x.shape[2:])
            wq, ws = K.quantize_i8(yf.reshape(-1, yf.shape[-1]))
            np.testing.assert_array_equal(ys.reshape(-1), ws)
            assert np.abs(yq.reshape(wq.shape).astype(int) - wq).max(initial=0) <= 1
    finally:
        K.set_isa("auto")


@pytest.mark.parametrize("kind", KINDS)
def test_few_channel_epilogue(kind):
    conv = {"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]}
    layer = make_layer("conv2d", "int", 4, 0.0, 9, shape=(16, 3, 3, 3), conv=conv)
    x = np.random.default_rng(10).standard_normal((2, 3, 13, 12)).astype(np.float32)
    slope = _slope(16)
    dc = K.FewChannelWeights(layer)
    want = dc(x)
    dc.set_activation(kind, slope)
    _close(dc(x, threads=2), _torch_act(kind, want, slope, 1))
    _close(dc(_last(x), channels_last=True), _last(_torch_act(kind, want, slope, 1)))


def test_silu_exp_over_the_float_range():
    """act.c's exp: SiLU within a few ulp of float64's over [-100, 100], 0 / v at the ends."""
    v = np.concatenate([np.linspace(-100, 100, 20001, dtype=np.float32), [-1e30, 1e30, 0.0, -0.0]]).astype(np.float32)
    layer = make_layer("linear", "int", 8, 0.0, 1, shape=(1, 1), bias=False)
    w = K.PackedWeights.from_layer(layer)
    scale = float(layer.scale[0] * layer.codes[0, 0])
    y0 = w.matmul_f32((v / scale)[:, None].astype(np.float32))[:, 0]
    w.set_activation("silu")
    got = w.matmul_f32((v / scale)[:, None].astype(np.float32))[:, 0]
    want = (y0.astype(np.float64) / (1 + np.exp(-np.clip(y0.astype(np.float64), -700, 700))))
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-30)


def test_bad_activation():
    layer = make_layer("linear", "int", 4, 0.0, 1, shape=(4, 8))
    w = K.PackedWeights.from_layer(layer)
    with pytest.raises(K.KernelError, match="unknown activation"):
        w.set_activation("gelu")
    with pytest.raises(ValueError):
        w.set_activation("prelu", np.ones(3, np.float32))  # not one slope per output


@pytest.fixture(scope="module")
def act_export(tmp_path_factory):
    from spfq_deploy.compress import compress_model
    from spfq_deploy.modelspec import load_model
    from spfq_deploy.pack import container

    base = tmp_path_factory.mktemp("fused_act")
    model, module = load_model("tests/act_cnn.py:build")
    res = compress_model(model, module.calibration(64), bits=4, method="rtn", progress=False,
                         model_spec="tests/act_cnn.py")
    container.save(base / "m.spfq", res.model)
    assert main(["export", str(base / "m.spfq"), "-o", str(base / "out"), "--format", "onnx", "--target",
                 "x86_64"]) == 0
    return base / "out"


def test_export_fuses_every_activation_and_validates(act_export, capsys):
    """The custom flavour of a CNN with PReLU (per channel and one slope), HardSwish and SiLU
    after each compressed layer: all of them fused (no activation node left), the slopes the
    model's, and `spfq-deploy validate` passes with every layer exact against the reference
    with the same activation."""
    g = onnx.load(str(act_export / "model.spfq.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert not {"PRelu", "HardSwish", "Sigmoid", "Mul"} & set(ops), ops
    fused = [(n.name, helper.get_attribute_value(a)) for n in g.node for a in n.attribute if a.name == "fused_activation"]
    assert [f for _, f in fused] == [b"prelu", b"hardswish", b"silu", b"prelu", b"silu"]
    slopes = [helper.get_attribute_value(a) for n in g.node for a in n.attribute if a.name == "prelu_slope"]
    ref = act_cnn.build()
    np.testing.assert_array_equal(np.float32(slopes[0]), ref.a1.weight.detach().numpy())
    assert slopes[1] == pytest.approx([0.1] * 24)
    report = act_export.parent / "report.json"
    assert main(["validate", str(act_export), "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    custom = next(r for r in rows if r["file"] == "model.spfq.onnx")
    assert custom["status"] == "ok" and len(custom["layers"]) == 6 and all(x["local_ok"] for x in custom["layers"])
    capsys.readouterr()
