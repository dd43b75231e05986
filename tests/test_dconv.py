"""The direct few-channel conv kernel (kernels/src/dconv.c, spfq_dconv: a first conv on an RGB or
grey image) against the im2col GEMM path it replaces in the exported runtimes: bit-identical with
the C oracle's weight-only float sums for every layout and geometry, on every ISA this CPU has
(one micro-kernel source per vector width), NCHW and channels last, and against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_export_onnx import _layer as make_layer

from spfq_deploy import kernels as K
from spfq_deploy.kernel_layers import KernelLayer

ISAS = [i for i in ("c", "avx2", "avx512", "amx", "neon") if K.lib().spfq_set_isa(i.encode()) == 0]
K.set_isa("auto")

# name: (in channels, outputs, kernel, stride, padding, dilation, input (H, W)); 1-D when kernel has one entry
GEOMS = {
    "rgb 3x3 s2": (3, 32, [3, 3], [2, 2], [1, 1], [1, 1], (17, 15)),
    "grey 3x3 s1": (1, 32, [3, 3], [1, 1], [1, 1], [1, 1], (9, 10)),
    "rgb 7x7 s2 64 out": (3, 64, [7, 7], [2, 2], [3, 3], [1, 1], (19, 21)),
    "4 ch 5x5 dil2 nopad": (4, 20, [5, 5], [1, 1], [0, 0], [2, 2], (12, 13)),
    "2 ch 3x3 odd outputs": (2, 37, [3, 3], [1, 2], [2, 0], [1, 1], (6, 9)),
    "conv1d": (3, 24, [5], [2], [2], [1], (1, 31)),
}
KINDS = {  # alphabet, bits, sparsity, lam, layout
    "sign": ("binary", 1, 0.0, False, "sign"),
    "sign_mask": ("binary", 1, 0.4, False, "sign_mask"),
    "ternary": ("ternary", 2, 0.3, False, "sign_mask"),
    "int4": ("int", 4, 0.0, False, "planes"),
    "int3 lam": ("int", 3, 0.2, True, "planes"),
    "int4 sparse": ("int", 4, 0.5, True, "sparse"),
    "int8": ("int", 8, 0.0, False, "planes"),
}


def _layer(geom, kind, seed=0):
    c, n, ks, st, pd, dl, _ = GEOMS[geom]
    alphabet, bits, sparsity, lam, _ = KINDS[kind]
    conv = {"stride": st, "padding": pd, "dilation": dl, "groups": 1, "kernel_size": ks}
    return make_layer("conv1d" if len(ks) == 1 else "conv2d", alphabet, bits, sparsity, seed,
                      shape=(n, c, *ks), conv=conv, lam=lam)


def _input(geom, batch=2, seed=1):
    c, *_, (h, w) = GEOMS[geom]
    x = np.random.default_rng(seed).standard_normal((batch, c, h, w)).astype(np.float32)
    return x[:, :, 0] if len(GEOMS[geom][2]) == 1 else x


def _last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _oracle(layer, kind, x):
    K.set_isa("c")
    try:
        return KernelLayer(layer, KINDS[kind][4])(x, "f32").numpy()
    finally:
        K.set_isa("auto")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_bit_identical_with_the_gemm_oracle(geom, kind, isa):
    layer, x = _layer(geom, kind), _input(geom)
    assert K.is_few_channel(layer) and K.layer_activation(layer, "int8") == "float"
    want = _oracle(layer, kind, x)
    K.set_isa(isa)
    try:
        dc = K.FewChannelWeights(layer, KINDS[kind][4])
        got = dc(x)
        got_last = dc(_last(x), threads=3, channels_last=True)
    finally:
        K.set_isa("auto")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_last, _last(want))
    conv = F.conv1d if layer.kind == "conv1d" else F.conv2d
    c = layer.conv
    ref = conv(torch.from_numpy(x), torch.from_numpy(layer.dequantize()), torch.from_numpy(layer.bias),
               c["stride"], c["padding"], c["dilation"], 1).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_inputs_on_zero_codes_and_padding(isa):
    """Weight 0 for a zero code and a 0 for the padding are exact only for finite inputs: a patch
    holding inf or NaN is done over its live taps, as the oracle skips zero codes."""
    layer = _layer("rgb 3x3 s2", "int4 sparse", seed=3)
    x = _input("rgb 3x3 s2", seed=4)
    x[0, 1, 4, 6], x[1, 0, 9, 2], x[1, 2, 0, 0] = np.inf, np.nan, -np.inf
    want = _oracle(layer, "int4 sparse", x)
    K.set_isa(isa)
    try:
        dc = K.FewChannelWeights(layer, "sparse")
        np.testing.assert_array_equal(dc(x), want)
        np.testing.assert_array_equal(dc(_last(x), channels_last=True), _last(want))
    finally:
        K.set_isa("auto")


def test_fused_clamp_and_threads():
    layer, x = _layer("rgb 7x7 s2 64 out", "int4", seed=5), _input("rgb 7x7 s2 64 out", batch=3, seed=6)
    dc = K.FewChannelWeights(layer)
    want = dc(x)
    for t in (2, 3, 8):
        np.testing.assert_array_equal(dc(x, threads=t), want)
    dc.set_clamp(0.0, 0.5)
    np.testing.assert_array_equal(dc(x, threads=2), np.minimum(np.maximum(want, 0), 0.5))
    np.testing.assert_array_equal(dc(_last(x), channels_last=True), _last(np.minimum(np.maximum(want, 0), 0.5)))


def test_which_layers_are_few_channel():
    assert K.is_few_channel(_layer("grey 3x3 s1", "int4")) and K.is_depthwise(_layer("grey 3x3 s1", "int4"))
    wide = make_layer("conv2d", "int", 4, shape=(8, 5, 3, 3),
                      conv={"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]})
    pointwise = make_layer("conv2d", "int", 4, shape=(8, 3, 1, 1),
                           conv={"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1,
                                 "kernel_size": [1, 1]})
    assert not K.is_few_channel(wide) and K.layer_activation(wide, "int8") == "int8"
    assert not K.is_few_channel(pointwise) and K.layer_activation(pointwise, "int8") == "int8"
    with pytest.raises(K.KernelError, match="not a one-group conv"):
        K.FewChannelWeights(wide)
    with pytest.raises(K.KernelError, match="3 channels"):
        K.FewChannelWeights(_layer("rgb 3x3 s2", "int4"))(np.zeros((1, 4, 9, 9), np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["int4", "ternary", "sign", "int3 lam"])
@pytest.mark.parametrize("shape", [(8, 24, 3, 1, 1, 1), (6, 20, 3, 2, 1, 2), (32, 40, 5, 1, 2, 1)])
def test_conv_nhwc_is_im2col_then_the_gemm(isa, kind, shape):
    """spfq_conv_nhwc (a general one-group conv, channels last: im2col rows made per block inside
    the library) is bit for bit im2col + the GEMM: int8 rows quantised per patch, and weight-only
    float as the C oracle sums (under the C ISA, where the float GEMM is the oracle)."""
    c, n, ks, st, pd, dl = shape
    alphabet, bits, sparsity, lam, layout = KINDS[kind]
    conv = {"stride": [st, st], "padding": [pd, pd], "dilation": [dl, dl], "groups": 1, "kernel_size": [ks, ks]}
    layer = make_layer("conv2d", alphabet, bits, sparsity, 7, shape=(n, c, ks, ks), conv=conv, lam=lam)
    x = np.random.default_rng(8).standard_normal((3, c, 13, 11)).astype(np.float32)
    x[0, :, :4] = 0.0  # all-zero patches: xscale 0
    geom = K.ConvGeom(c, n, ks, ks, st, st, dl, dl, pd, pd, pd, pd)
    K.set_isa(isa)
    try:
        want8 = KernelLayer(layer, layout)(x, "i8").numpy()
        w = K.PackedWeights.from_layer(layer, layout)
        w.set_clamp(-0.5, 2.0)
        got8 = w.conv_nhwc(_last(x), geom, True, threads=3)
        np.testing.assert_array_equal(got8, _last(np.clip(want8, -0.5, 2.0)))
        if isa == "c":
            wantf = KernelLayer(layer, layout)(x, "f32").numpy()
            np.testing.assert_array_equal(w.conv_nhwc(_last(x), geom, False, threads=2), _last(np.clip(wantf, -0.5, 2.0)))
        w.set_clamp()  # a clamp changed after the first call reaches the reordered weights too
        np.testing.assert_array_equal(w.conv_nhwc(_last(x), geom, True), _last(want8))
    finally:
        K.set_isa("auto")
