"""Activations that stay int8 between compressed layers (spfq_act): spfq_matmul_act quantises its
output per row in the epilogue, spfq_dwconv_nhwc_act runs a depthwise layer on int8-per-pixel
input. Each must be bit for bit the composition it replaces (the float result, then the next
layer's own spfq_quantize_i8), on every ISA this CPU has and any thread count: that is what
lets an export hand int8 tensors from layer to layer without changing one output bit."""

from __future__ import annotations

import numpy as np
import pytest
from test_dwconv import _layer as dw_layer
from test_kernels_api import make_layer

from spfq_deploy import kernels as K

ISAS = [i for i in ("c", "avx2", "avx512", "amx", "neon") if K.lib().spfq_set_isa(i.encode()) == 0]
K.set_isa("auto")
RNG = np.random.default_rng(21)


@pytest.fixture(params=ISAS)
def isa(request):
    K.set_isa(request.param)
    yield request.param
    K.set_isa("auto")


def _bits(a):
    return a.view(np.uint32) if a.dtype == np.float32 else a


@pytest.mark.parametrize("alphabet,bits,pruned", [("int", 4, False), ("ternary", 2, False), ("binary", 1, False),
                                                  ("int", 3, True)])
@pytest.mark.parametrize("m", [1, 37, 700])
def test_matmul_act_is_the_float_result_then_quantize(isa, alphabet, bits, pruned, m):
    layer = make_layer(alphabet, bits, 70, 90, sparsity=0.5 if pruned else 0.0, pruned=pruned, seed=m)
    w = K.PackedWeights.from_layer(layer)
    w.set_clamp(0.0, 6.0)
    x = RNG.standard_normal((m, 90)).astype(np.float32)
    x[0] = 0.0
    xq, xs = K.quantize_i8(x)
    y = w.matmul_q8(x)
    want = K.quantize_i8(y)
    for t in (1, 2, 3):
        np.testing.assert_array_equal(_bits(w.matmul_act(x, threads=t)), _bits(y))
        np.testing.assert_array_equal(_bits(w.matmul_act((xq, xs), threads=t)), _bits(y))
        for got in (w.matmul_act(x, q8_out=True, threads=t), w.matmul_act((xq, xs), q8_out=True, threads=t)):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(_bits(got[1]), _bits(want[1]))


def _pixel_reference(x):
    """Per-pixel int8 of NHWC x, dequantised as the kernels do: s * (float32)q."""
    B, H, W, C = x.shape
    q, s = K.quantize_i8(np.ascontiguousarray(x.reshape(-1, C)))
    return (s[:, None] * q.astype(np.float32)).reshape(x.shape), (q.reshape(x.shape), s.reshape(B, H, W))


@pytest.mark.parametrize("geom", ["32 channels wide", "3x3 s2", "mult 3", "9 channels", "5x5 s2"])
@pytest.mark.parametrize("kind", ["int4", "ternary", "int3 lam"])
def test_depthwise_int8_per_pixel_is_dequantised_input_then_the_float_kernel(isa, geom, kind):
    from test_dwconv import GEOMS, KINDS, _input
    layer, x = dw_layer(geom, kind, seed=9), _input(geom, seed=10)
    dw = K.DepthwiseWeights(layer, KINDS[kind][4])
    dw.set_clamp(0.0, 6.0)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    deq, (q, s) = _pixel_reference(xl)
    want = dw(deq, False, 1, channels_last=True)
    wantq = K.quantize_i8(np.ascontiguousarray(want.reshape(-1, want.shape[-1])))
    B, H, W, _ = xl.shape
    for t in (1, 3):
        for inp in (xl, (q, s)):
            got = K.dwconv_act(dw, inp, (B, H, W), threads=t)
            np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"{geom} t={t}")
            gq, gs = K.dwconv_act(dw, inp, (B, H, W), q8_out=True, threads=t)
            np.testing.assert_array_equal(gq.reshape(-1, gq.shape[-1]), wantq[0])
            np.testing.assert_array_equal(_bits(gs.reshape(-1)), _bits(wantq[1]))
        # weight-only float input, int8 output (a depthwise layer feeding a 1x1 int8 conv)
        wf = dw(xl, False, 1, channels_last=True)
        wfq = K.quantize_i8(np.ascontiguousarray(wf.reshape(-1, wf.shape[-1])))
        np.testing.assert_array_equal(_bits(K.dwconv_act(dw, xl, (B, H, W), int8_pixel=False, threads=t)), _bits(wf))
        gq, gs = K.dwconv_act(dw, xl, (B, H, W), int8_pixel=False, q8_out=True, threads=t)
        np.testing.assert_array_equal(gq.reshape(-1, gq.shape[-1]), wfq[0])
        np.testing.assert_array_equal(_bits(gs.reshape(-1)), _bits(wfq[1]))
    assert GEOMS[geom][0] * GEOMS[geom][1] == layer.rows


def test_act_rejects_inconsistent_calls():
    """Exactly one input form and one output form: anything else is SPFQ_EINVAL, nothing read."""
    import ctypes

    layer = make_layer("int", 4, 8, 16)
    w = K.PackedWeights.from_layer(layer)
    x, y = np.zeros((2, 16), np.float32), np.zeros((2, 8), np.float32)
    xq, s = np.zeros((2, 16), np.int8), np.ones(2, np.float32)
    good = dict(x=x.ctypes.data, y=y.ctypes.data)
    for bad in (dict(y=y.ctypes.data), dict(x=x.ctypes.data), dict(good, xq=xq.ctypes.data, xscale=s.ctypes.data),
                dict(good, yq=xq.ctypes.data, yscale=s.ctypes.data), dict(xq=xq.ctypes.data, y=y.ctypes.data)):
        assert K.lib().spfq_matmul_act(w._h, 2, ctypes.byref(K.Act(**bad)), 1) == 1, bad
    assert K.lib().spfq_matmul_act(w._h, 2, ctypes.byref(K.Act(**good)), 1) == 0
