"""Kernels with group-wise scales (spfq_grouped_*, kernels/src/grouped.c; semantics in
spfq_kernels.h): the int8 path bit for bit equal to the order written there, evaluated here in
numpy float32 from exact integer sums; the float path bit for bit the per-row float oracle (ISA
c) on each group's columns summed in group order (and close to the dequantised float64
product); every ISA this CPU has gives the same bits on both paths, at 1 and 3 threads, GEMV and
tall calls; bias, clamp and activation after the sum.
"""

from __future__ import annotations

import numpy as np
import pytest

from spfq_deploy import kernels
from spfq_deploy.compressed import CompressedLayer

ISAS = [i for i in ("c", "avx2", "avx512", "amx", "neon") if kernels.lib().spfq_set_isa(i.encode()) == 0]
kernels.set_isa("auto")


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def make_layer(alphabet, bits, n, k, group, rng, *, sparsity=0.0, lam=False):
    K = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if alphabet == "binary":
        codes = rng.choice(np.array([-1, 1], np.int8), size=(n, k))
    else:
        codes = rng.integers(-K, K + 1, size=(n, k)).astype(np.int8)
    if sparsity:
        codes[rng.random((n, k)) < sparsity] = 0
    ng = -(-k // group)
    scale = f16(rng.random((n, ng)) * 0.05 + 0.01)
    return CompressedLayer("fc", "linear", (n, k), alphabet, bits, codes, scale,
                           lam=f16(scale * 2.5) if lam else None, bias=rng.standard_normal(n).astype(np.float32),
                           meta={"sparsity_target": sparsity} if sparsity else {}, group_size=group)


CASES = [("binary", 1, 0.0, False, "sign"), ("binary", 1, 0.3, False, "sign_mask"),
         ("ternary", 2, 0.0, False, "sign_mask"), ("int", 2, 0.0, False, "planes"), ("int", 4, 0.0, False, "planes"),
         ("int", 8, 0.0, False, "planes"), ("int", 4, 0.5, True, "planes"), ("int", 3, 0.95, True, "sparse")]


def int8_semantics(layer, layout, xq, xs, clamp=None):
    """spfq_kernels.h's order in numpy float32: t_g from exact sums, s = t_0 + t_1 + ... (in
    order), + bias, clamp."""
    two = layout in ("planes", "sparse")
    G, K = layer.group_size, layer.cols
    s = None
    for g, c0 in enumerate(range(0, K, G)):
        c = layer.codes[:, c0:c0 + G].astype(np.int64)
        q = xq[:, c0:c0 + G].astype(np.int64)
        acc_c = (q @ c.T).astype(np.float32)
        acc_s = (q @ np.sign(c).T).astype(np.float32)
        sc = layer.scale[:, g]
        if not two:
            inner = sc * acc_s
        elif layer.lam is not None:
            inner = sc * acc_c + (layer.lam[:, g] - sc) * acc_s
        else:
            inner = sc * acc_c
        t = xs[:, None] * inner + np.float32(0.0)
        s = t if s is None else s + t
    y = s + layer.bias
    if clamp:
        y = np.minimum(np.maximum(y, np.float32(clamp[0])), np.float32(clamp[1]))
    return y


@pytest.mark.parametrize("alphabet,bits,sparsity,lam,layout", CASES)
@pytest.mark.parametrize("k,group", [(200, 64), (256, 32), (100, 128), (130, 64)])
def test_int8_path_is_the_written_order_on_every_isa(alphabet, bits, sparsity, lam, layout, k, group):
    rng = np.random.default_rng(bits * 7 + k)
    layer = make_layer(alphabet, bits, 37, k, group, rng, sparsity=sparsity, lam=lam)
    x = rng.standard_normal((20, k)).astype(np.float32) * np.linspace(0.1, 3, k, dtype=np.float32)
    xq, xs = kernels.quantize_i8(x)
    results = []
    try:
        for isa in ISAS:
            kernels.set_isa(isa)
            w = kernels.GroupedWeights.from_layer(layer, layout)
            for m in (1, 3, 20):  # GEMV, small, tall (>= 16 rows: the tall / AMX route)
                want = int8_semantics(layer, layout, xq[:m], xs[:m])
                for threads in (1, 3):
                    y = w.matmul_i8(xq[:m], xs[:m], threads)
                    np.testing.assert_array_equal(y, want, err_msg=f"{isa} m={m} t={threads}")
                    np.testing.assert_array_equal(w.matmul_q8(x[:m], threads), want)
            w.set_clamp(-0.5, 0.25)
            np.testing.assert_array_equal(w.matmul_i8(xq, xs), int8_semantics(layer, layout, xq, xs, (-0.5, 0.25)))
            for m in (1, 3, 20):
                results.append(w.matmul_f32(x[:m], 1))
                results.append(w.matmul_f32(x[:m], 3))
    finally:
        kernels.set_isa("auto")
    per_isa = len(results) // len(ISAS)
    for i, r in enumerate(results[per_isa:]):  # the float path too: the same bits on every ISA
        np.testing.assert_array_equal(r, results[i % per_isa])


FUSED_CASES = [("binary", 1, "sign"), ("ternary", 2, "sign_mask"), ("int", 2, "planes"), ("int", 3, "planes"),
               ("int", 4, "planes"), ("int", 8, "planes"), ("int", 4, "sparse")]


@pytest.mark.parametrize("alphabet,bits,layout", FUSED_CASES)
@pytest.mark.parametrize("n,k,group", [(130, 576, 32), (77, 300, 64), (16, 96, 32)])
def test_fused_route_is_the_written_order(alphabet, bits, layout, n, k, group):
    """The fused grouped kernels (x86-64: one pass over all columns, each group's sum turned into
    its float term in registers; grouped.c) against the order of spfq_kernels.h: partial 64-row
    tiles and 16-row groups (N = 130, 77), a short last group (K = 300), GEMV / odd / tall row
    counts (the tall driver's units and output parts at 300 rows, 3 threads), bias, clamp, an
    activation after the sum; and the per-group route, built on first use, when the ISA is
    switched to one without the fused kernel after the weights were prepared."""
    rng = np.random.default_rng(bits * 31 + n + k)
    layer = make_layer(alphabet, bits, n, k, group, rng, sparsity=0.4 if layout == "sparse" else 0.0)
    x = rng.standard_normal((300, k)).astype(np.float32) * np.linspace(0.1, 3, k, dtype=np.float32)
    xq, xs = kernels.quantize_i8(x)
    try:
        for isa in ISAS:
            kernels.set_isa(isa)
            w = kernels.GroupedWeights.from_layer(layer, layout)
            for m in (1, 2, 5, 300):
                want = int8_semantics(layer, layout, xq[:m], xs[:m])
                for threads in (1, 3):
                    np.testing.assert_array_equal(w.matmul_i8(xq[:m], xs[:m], threads), want,
                                                  err_msg=f"{isa} m={m} t={threads}")
                np.testing.assert_array_equal(w.matmul_q8(x[:m], 2), want, err_msg=f"{isa} q8 m={m}")
            w.set_clamp(-0.5, 0.25)
            np.testing.assert_array_equal(w.matmul_i8(xq, xs, 3), int8_semantics(layer, layout, xq, xs, (-0.5, 0.25)))
            w.set_clamp(-np.inf, np.inf)
            slope = np.linspace(0.05, 0.3, n, dtype=np.float32)
            w.set_activation("prelu", slope)

            def prelu(y):
                return np.where(y > 0, y, slope * y)
            np.testing.assert_array_equal(w.matmul_q8(x[:5]), prelu(int8_semantics(layer, layout, xq[:5], xs[:5])))
            kernels.set_isa("c")  # prepared under `isa`, run without its fused kernel
            np.testing.assert_array_equal(w.matmul_q8(x[:3]), prelu(int8_semantics(layer, layout, xq[:3], xs[:3])))
    finally:
        kernels.set_isa("auto")


@pytest.mark.parametrize("scales", ["float16 subnormal", "not float16"])
def test_fused_route_scales(scales):
    """The fused route keeps the scales as float16 bits (.spfq scales are float16 values): float16
    subnormals convert exactly; a scale that is no float16 value (a Python caller's) takes the
    per-group route, with the same written order."""
    rng = np.random.default_rng(3)
    layer = make_layer("int", 4, 70, 192, 32, rng)
    if scales == "float16 subnormal":
        layer.scale[::3] = f16(rng.integers(1, 1023, size=layer.scale[::3].shape) * 2.0 ** -24)
    else:
        layer.scale *= np.float32(1.0001)
    x = rng.standard_normal((7, 192)).astype(np.float32)
    xq, xs = kernels.quantize_i8(x)
    try:
        for isa in ISAS:
            kernels.set_isa(isa)
            w = kernels.GroupedWeights.from_layer(layer)
            np.testing.assert_array_equal(w.matmul_i8(xq, xs, 2), int8_semantics(layer, "planes", xq, xs), err_msg=isa)
    finally:
        kernels.set_isa("auto")


@pytest.mark.parametrize("alphabet,bits,sparsity,lam,layout", CASES)
@pytest.mark.parametrize("m", [1, 20])
def test_float_path_is_the_per_row_kernels_summed_in_group_order(alphabet, bits, sparsity, lam, layout, m):
    rng = np.random.default_rng(bits + m)
    k, group = 200, 64
    layer = make_layer(alphabet, bits, 29, k, group, rng, sparsity=sparsity, lam=lam)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = kernels.GroupedWeights.from_layer(layer, layout).matmul_f32(x)  # the best ISA here
    s = None
    kernels.set_isa("c")  # the per-row float kernel's oracle order
    for g, c0 in enumerate(range(0, k, group)):
        part = CompressedLayer("g", "linear", (29, min(group, k - c0)), alphabet, bits,
                               np.ascontiguousarray(layer.codes[:, c0:c0 + group]),
                               np.ascontiguousarray(layer.scale[:, g]),
                               lam=None if layer.lam is None else np.ascontiguousarray(layer.lam[:, g]),
                               meta=layer.meta)
        t = kernels.PackedWeights.from_layer(part, "planes" if layout == "sparse" else None).matmul_f32(
            np.ascontiguousarray(x[:, c0:c0 + group]))
        s = t if s is None else s + t
    kernels.set_isa("auto")
    np.testing.assert_array_equal(y, s + layer.bias)
    ref = x.astype(np.float64) @ layer.dequantize().astype(np.float64).T + layer.bias
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_activation_after_the_sum():
    rng = np.random.default_rng(5)
    layer = make_layer("int", 4, 24, 160, 32, rng)
    x = rng.standard_normal((4, 160)).astype(np.float32)
    w = kernels.GroupedWeights.from_layer(layer)
    plain = w.matmul_q8(x)
    w.set_activation("hardswish")
    want = plain * np.minimum(np.maximum(plain + np.float32(3), np.float32(0)), np.float32(6)) / np.float32(6)
    np.testing.assert_allclose(w.matmul_q8(x), want, rtol=1e-6, atol=1e-6)
    relu = kernels.GroupedWeights.from_layer(layer)
    relu.set_clamp(0.0, np.inf)
    np.testing.assert_array_equal(relu.matmul_q8(x), np.maximum(plain, 0))


def test_bad_arguments_are_refused():
    rng = np.random.default_rng(1)
    layer = make_layer("int", 4, 8, 64, 32, rng)
    with pytest.raises(kernels.KernelError, match="group"):
        kernels.GroupedWeights("planes", 8, 64, 0, {}, layer.scale)
    w = kernels.GroupedWeights.from_layer(layer)
    with pytest.raises(kernels.KernelError, match="K = 63"):
        w.matmul_f32(np.zeros((1, 63), np.float32))
    bad = make_layer("int", 4, 8, 64, 32, rng)
    bad.scale = bad.scale[:, :1].copy()
    with pytest.raises(kernels.KernelError, match="scale"):
        kernels.GroupedWeights("planes", 8, 64, 32, kernels.kernel_pack(bad, "planes", groups_ok=True)[2], bad.scale,
                               bits=4)


def test_kernel_layer_runs_grouped_convs():
    """kernel_layers.KernelLayer takes a conv with group-wise scales (2 conv groups, K = 72 > G):
    i8 equals the int8 reference, f32 the dequantised conv, up to float rounding."""
    import torch

    from spfq_deploy.kernel_layers import KernelLayer
    from spfq_deploy.reference import Int8ActivationLayer

    rng = np.random.default_rng(9)
    layer = make_layer("int", 4, 6, 72, 32, rng)
    layer.kind, layer.weight_shape = "conv2d", (6, 8, 3, 3)
    layer.conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 2, "kernel_size": [3, 3]}
    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(0))
    kl = KernelLayer(layer)
    with torch.no_grad():
        torch.testing.assert_close(kl(x, "i8"), Int8ActivationLayer(layer)(x), rtol=1e-5, atol=1e-5)
        ref = torch.nn.functional.conv2d(x, torch.from_numpy(layer.dequantize()), torch.from_numpy(layer.bias),
                                         padding=1, groups=2)
    torch.testing.assert_close(kl(x, "f32"), ref, rtol=1e-4, atol=1e-4)
