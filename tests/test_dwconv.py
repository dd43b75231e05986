"""The direct depthwise kernel (kernels/src/dwconv.c, spfq_dwconv) against the im2col GEMM path
(kernel_layers.KernelLayer) it replaces in the exported runtimes: bit-identical outputs for
every layout, geometry and activation mode (f32 against the C oracle, whose summation order it
keeps; i8 under every ISA, since its integer sums are exact), and against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_export_onnx import _layer as make_layer

from spfq_deploy import kernels as K
from spfq_deploy.compressed import CompressedLayer
from spfq_deploy.kernel_layers import KernelLayer

# name: (in channels, mult, kernel, stride, padding, dilation, input (H, W)); 1-D when kernel has one entry
GEOMS = {
    "3x3 s1": (8, 1, [3, 3], [1, 1], [1, 1], [1, 1], (9, 11)),
    "3x3 s2": (6, 1, [3, 3], [2, 2], [1, 1], [1, 1], (12, 13)),
    "5x5 s2": (5, 1, [5, 5], [2, 2], [2, 2], [1, 1], (14, 9)),
    "3x3 dil2 nopad": (4, 1, [3, 3], [1, 1], [0, 0], [2, 2], (10, 12)),
    "mult 3": (3, 3, [3, 3], [1, 2], [1, 0], [1, 1], (7, 8)),
    "1 channel": (1, 16, [3, 3], [1, 1], [0, 0], [1, 1], (28, 28)),
    "wide": (2, 1, [3, 3], [1, 1], [1, 1], [1, 1], (5, 70)),
    "conv1d": (6, 1, [5], [2], [2], [1], (1, 33)),
    "9 channels": (9, 1, [3, 3], [1, 1], [1, 1], [1, 1], (6, 7)),
    "16 channels s2": (16, 1, [3, 3], [2, 2], [1, 1], [1, 1], (15, 8)),
    "32 channels wide": (32, 1, [3, 3], [1, 1], [1, 1], [1, 1], (5, 21)),  # AVX-512 16-lane blocks, 8-pixel runs
}
KINDS = {  # alphabet, bits, sparsity, lam, layout
    "sign": ("binary", 1, 0.0, False, "sign"),
    "sign_mask": ("binary", 1, 0.4, False, "sign_mask"),
    "ternary": ("ternary", 2, 0.3, False, "sign_mask"),
    "int4": ("int", 4, 0.0, False, "planes"),
    "int3 lam": ("int", 3, 0.0, True, "planes"),
    "int4 sparse": ("int", 4, 0.5, True, "sparse"),
    "int8": ("int", 8, 0.0, False, "planes"),
}


def _layer(geom, kind, seed=0):
    c, mult, ks, st, pd, dl, _ = GEOMS[geom]
    alphabet, bits, sparsity, lam, _ = KINDS[kind]
    conv = {"stride": st, "padding": pd, "dilation": dl, "groups": c, "kernel_size": ks}
    return make_layer("conv1d" if len(ks) == 1 else "conv2d", alphabet, bits, sparsity, seed,
                      shape=(c * mult, 1, *ks), conv=conv, lam=lam)


def _input(geom, batch=2, seed=1):
    c, *_, (h, w) = GEOMS[geom]
    x = np.random.default_rng(seed).standard_normal((batch, c, h, w)).astype(np.float32)
    x[0, 0, :3] = 0.0  # patches that are all zero: xscale 0 in int8 mode
    return x[:, :, 0] if len(GEOMS[geom][2]) == 1 else x


@pytest.fixture
def isa_c():
    K.set_isa("c")
    yield
    K.set_isa("auto")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_float_bit_identical_with_the_gemm_oracle(geom, kind, isa_c):
    layer, x = _layer(geom, kind), _input(geom)
    want = KernelLayer(layer, KINDS[kind][4])(x, "f32").numpy()
    got = K.DepthwiseWeights(layer, KINDS[kind][4])(x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    conv = F.conv1d if layer.kind == "conv1d" else F.conv2d
    c = layer.conv
    ref = conv(torch.from_numpy(x), torch.from_numpy(layer.dequantize()), torch.from_numpy(layer.bias),
               c["stride"], c["padding"], c["dilation"], c["groups"]).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("isa", ["auto", "c"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_int8_bit_identical_with_the_gemm_path(geom, kind, isa):
    K.set_isa(isa)
    try:
        layer, x = _layer(geom, kind, seed=3), _input(geom, seed=4)
        want = KernelLayer(layer, KINDS[kind][4])(x, "i8").numpy()
        got = K.DepthwiseWeights(layer, KINDS[kind][4])(x, int8=True)
    finally:
        K.set_isa("auto")
    np.testing.assert_array_equal(got, want)


def _last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


@pytest.mark.parametrize("isa", ["auto", "c"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_channels_last_is_the_same_result_transposed(geom, kind, isa):
    """spfq_dwconv_nhwc: full blocks read in place, partial blocks (9 channels) and mult > 1
    gathered; every element equal to the NCHW kernel's."""
    K.set_isa(isa)
    try:
        layer, x = _layer(geom, kind, seed=6), _input(geom, seed=7)
        dw = K.DepthwiseWeights(layer, KINDS[kind][4])
        for int8 in (False, True):
            want = dw(x, int8)
            for threads in (1, 3):
                np.testing.assert_array_equal(dw(_last(x), int8, threads, channels_last=True), _last(want))
    finally:
        K.set_isa("auto")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_the_result(threads):
    layer, x = _layer("3x3 s2", "int4"), _input("3x3 s2", batch=3)
    dw = K.DepthwiseWeights(layer)
    for int8 in (False, True):
        np.testing.assert_array_equal(dw(x, int8, threads), dw(x, int8, 1))


def test_non_finite_inputs_follow_the_gemm_path():
    """NaN is ignored by max |x| and quantises to 0; inf saturates: as quant.c does."""
    layer, x = _layer("3x3 s1", "int4", seed=5), _input("3x3 s1")
    x[1, 2, 4, 5], x[0, 3, 1, 1], x[1, 4, 6, 0] = np.nan, np.inf, -np.inf
    want = KernelLayer(layer)(x, "i8").numpy()
    got = K.DepthwiseWeights(layer)(x, int8=True)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(want))


@pytest.mark.parametrize("kind", ["int4 sparse", "ternary", "int4"])
def test_float_non_finite_inputs_on_zero_codes(kind):
    """Weight-only float, channels last (the SIMD interiors use zero codes as weight 0 without a
    mask): an inf or NaN input on a zero-code tap adds nothing, as in the C oracle."""
    layer, x = _layer("32 channels wide", kind, seed=15), _input("32 channels wide", seed=16)
    x[0, :, 2, 5], x[1, :, 3, 9], x[1, :, 0, 0] = np.inf, np.nan, -np.inf
    K.set_isa("c")
    try:
        want = K.DepthwiseWeights(layer, KINDS[kind][4])(x)
    finally:
        K.set_isa("auto")
    got = K.DepthwiseWeights(layer, KINDS[kind][4])(_last(x), False, 1, channels_last=True)
    np.testing.assert_array_equal(got, _last(want))


def test_bad_calls_are_errors():
    layer = _layer("3x3 s1", "int4")
    dw = K.DepthwiseWeights(layer)
    with pytest.raises(K.KernelError, match="8 channels"):
        dw(np.zeros((1, 3, 9, 9), np.float32))
    with pytest.raises(K.KernelError, match="smaller than the kernel"):
        K.DepthwiseWeights(_layer("3x3 dil2 nopad", "int4"))(np.zeros((1, 4, 3, 3), np.float32))
    dense = CompressedLayer(name="c", kind="conv2d", weight_shape=(4, 2, 3, 3), alphabet="int", bits=4,
                            codes=np.ones((4, 18), np.int8), scale=np.ones(4, np.float32), lam=None, bias=None,
                            conv={"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1,
                                  "kernel_size": [3, 3]})
    assert not K.is_depthwise(dense)
    with pytest.raises(K.KernelError, match="not depthwise"):
        K.DepthwiseWeights(dense)


@pytest.mark.parametrize("scale", [0.1, 0.37, 3e-3, 1e-37])
def test_int8_quotients_at_rounding_edges(scale):
    """Inputs (k + 1/2) * s next to patch maxima 127 * s: the quotients x / xs lie on or within
    an ulp of half-integers, where a reciprocal product may round the other way; the SIMD
    kernels redo those exactly (and subnormal scales at s = 1e-37), so results stay
    bit-identical with the division of the GEMM path."""
    rng = np.random.default_rng(11)
    layer = _layer("16 channels s2", "int4", seed=12)
    c, *_, (h, w) = GEOMS["16 channels s2"]
    k = rng.integers(-127, 127, (2, c, h, w)) + 0.5
    x = (k * scale).astype(np.float32)
    x[..., ::3] = np.float32(127 * scale) * np.where(rng.random((2, c, h, (w + 2) // 3)) < 0.5, -1, 1)
    want = KernelLayer(layer)(x, "i8").numpy()
    dw = K.DepthwiseWeights(layer)
    np.testing.assert_array_equal(dw(x, int8=True), want)
    np.testing.assert_array_equal(dw(_last(x), True, 1, channels_last=True), _last(want))


def test_fused_clamp():
    layer, x = _layer("16 channels s2", "int4", seed=13), _input("16 channels s2", seed=14)
    dw = K.DepthwiseWeights(layer)
    want = {i: dw(x, i) for i in (False, True)}
    dw.set_clamp(0.0, 0.5)
    for int8 in (False, True):
        clamped = np.minimum(np.maximum(want[int8], 0), 0.5)
        np.testing.assert_array_equal(dw(x, int8), clamped)
        np.testing.assert_array_equal(dw(_last(x), int8, 2, channels_last=True), _last(clamped))
