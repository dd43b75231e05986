"""The kernel library through its public ABI (dispatcher + ctypes binding), against an
independent numpy reference computed from the int8 codes: every layout, every ISA the CPU has,
1 and 2 threads, bad arguments rejected in Python."""

from __future__ import annotations

import numpy as np
import pytest

from spfq_deploy import kernels as K
from spfq_deploy.compressed import CompressedLayer

RNG = np.random.default_rng(7)
ISAS = [i for i in ("c", "avx2", "avx512", "amx", "neon") if K.lib().spfq_set_isa(i.encode()) == 0]
K.set_isa("auto")


def make_layer(alphabet, bits, n, k, sparsity=0.0, pruned=False, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    Kmax = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if alphabet == "binary" and not pruned:
        codes = rng.choice(np.array([-1, 1], np.int8), size=(n, k))
    else:
        codes = rng.integers(-Kmax, Kmax + 1, size=(n, k)).astype(np.int8)
        if sparsity:
            codes[rng.random((n, k)) < sparsity] = 0
        if pruned and alphabet == "int":
            codes[codes == 0] = 1
            codes[rng.random((n, k)) < sparsity] = 0
    scale = (rng.random(n) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    lam = (scale * 1.7).astype(np.float16).astype(np.float32) if (pruned and Kmax > 1) else None
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return CompressedLayer("t", "linear", (n, k), alphabet, bits, codes, scale, lam, b,
                           meta={"sparsity_target": sparsity if pruned else 0.0})


def reference_i8(layer, xq):
    c = layer.codes.astype(np.int64)
    s = np.sign(c)
    x = xq.astype(np.int64)
    return x @ c.T, x @ s.T


CASES = [("binary", 1, False), ("ternary", 2, False), ("binary", 1, True)] + \
        [("int", b, False) for b in range(2, 9)] + [("int", b, True) for b in (2, 4, 8)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("alphabet,bits,pruned", CASES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (2, 3, 65), (5, 70, 257), (16, 65, 1000)])
def test_i8_and_f32_match_reference(isa, alphabet, bits, pruned, m, n, k):
    K.set_isa(isa)
    try:
        layer = make_layer(alphabet, bits, n, k, sparsity=0.5 if pruned else 0.0, pruned=pruned,
                           seed=m * 1000 + n + k)
        w = K.PackedWeights.from_layer(layer)
        xq = RNG.integers(-127, 128, size=(m, k)).astype(np.int8)
        acc_c, acc_s = w.matmul_i8_raw(xq)
        want_c, want_s = reference_i8(layer, xq)
        assert np.array_equal(acc_s, want_s) and np.array_equal(acc_c, want_c)
        xs = (RNG.random(m) + 0.5).astype(np.float32)
        Wd = layer.dequantize().astype(np.float64)
        y = w.matmul_i8(xq, xs)
        want = xs[:, None].astype(np.float64) * (xq.astype(np.float64) @ Wd.T) + layer.bias
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
        x = RNG.standard_normal((m, k)).astype(np.float32)
        want = x.astype(np.float64) @ Wd.T + layer.bias
        np.testing.assert_allclose(w.matmul_f32(x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max() + 1e-6)
    finally:
        K.set_isa("auto")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 64, 64), (4, 65, 63), (33, 130, 1000)])
def test_bgemm_exact_and_rebinarised(isa, m, n, k):
    K.set_isa(isa)
    try:
        layer = make_layer("binary", 1, n, k, seed=n + k)
        w = K.PackedWeights.from_layer(layer)
        x = RNG.standard_normal((m, k)).astype(np.float32)
        xbits, xs = K.binarize(x)
        dot, y, yb = w.bgemm(xbits, xs, rebinarize=True)
        sx = np.where(x < 0, -1, 1).astype(np.int64)
        want = sx @ layer.codes.astype(np.int64).T
        assert np.array_equal(dot, want)
        yw = xs[:, None] * layer.scale[None, :] * want + layer.bias
        np.testing.assert_allclose(y, yw, rtol=1e-6, atol=1e-5)
        bits = np.unpackbits(yb.view(np.uint8), axis=1, bitorder="little")[:, :n].astype(bool)
        assert np.array_equal(bits, y < 0)
        assert not np.unpackbits(yb.view(np.uint8), axis=1, bitorder="little")[:, n:].any()
    finally:
        K.set_isa("auto")


def test_threads_give_identical_results():
    layer = make_layer("int", 4, 300, 777, sparsity=0.5, pruned=True)
    w = K.PackedWeights.from_layer(layer)
    xq = RNG.integers(-127, 128, size=(17, 777)).astype(np.int8)
    a1 = w.matmul_i8_raw(xq, threads=1)
    a2 = w.matmul_i8_raw(xq, threads=2)
    assert all(np.array_equal(p, q) for p, q in zip(a1, a2))
    x = RNG.standard_normal((17, 777)).astype(np.float32)
    assert np.array_equal(w.matmul_f32(x, threads=1), w.matmul_f32(x, threads=2))


def test_thread_pool_concurrent_callers_and_fork():
    """The persistent pool (kernels/src/pool.c): Python threads calling at once (ctypes drops the
    GIL, so the calls overlap; a caller that finds the pool busy runs single-threaded), thread
    counts changing between calls, and a forked child that must build its own pool."""
    import os
    import threading

    layer = make_layer("int", 4, 9 * 64 + 5, 300)
    w = K.PackedWeights.from_layer(layer)
    xq = RNG.integers(-127, 128, size=(6, 300)).astype(np.int8)
    want = reference_i8(layer, xq)
    bad = []

    def caller(seed):
        for i in range(30):
            got = w.matmul_i8_raw(xq, threads=(2, 3, 1, 8, 5)[(seed + i) % 5])
            if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
                bad.append((seed, i))

    ts = [threading.Thread(target=caller, args=(s,)) for s in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad
    pid = os.fork()
    if pid == 0:  # child: no workers survive the fork; a 3-thread call must still work
        ok = False
        try:
            got = w.matmul_i8_raw(xq, threads=3)
            ok = np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert np.array_equal(w.matmul_i8_raw(xq, threads=2)[0], want[0])


def test_quantizers_match_numpy():
    x = RNG.standard_normal((9, 300)).astype(np.float32) * 3
    x[3] = 0.0
    xq, s = K.quantize_i8(x)
    amax = np.abs(x).max(1)
    assert np.array_equal(s, (amax / np.float32(127)).astype(np.float32))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = x / s[:, None]
    want = np.where(s[:, None] > 0, np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), -127, 127), 0)
    assert np.array_equal(xq, want.astype(np.int8))
    bits, m = K.binarize(x)
    unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :300].astype(bool)
    assert np.array_equal(unpacked, x < 0)
    np.testing.assert_allclose(m, np.abs(x).mean(1), rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    layer = make_layer("int", 4, 8, 100)
    w = K.PackedWeights.from_layer(layer)
    with pytest.raises(K.KernelError, match="int8"):
        w.matmul_i8_raw(np.zeros((2, 100), np.int16))
    with pytest.raises(K.KernelError, match="K = 99"):
        w.matmul_f32(np.zeros((2, 99), np.float32))
    with pytest.raises(K.KernelError, match="C-contiguous"):
        w.matmul_f32(np.zeros((100, 2), np.float32).T)
    raw = np.zeros(2 * 100 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(2, 100)
    with pytest.raises(K.KernelError, match="aligned"):
        w.matmul_f32(raw)
    from spfq_deploy.pack import layouts as L
    bufs = L.pack_layer(layer, "planes")
    with pytest.raises(K.KernelError, match="planes must have shape"):
        K.PackedWeights("planes", 8, 100, {"planes": bufs["planes"][:, :, :1].copy()}, layer.scale, bits=4)
    with pytest.raises(K.KernelError, match="bgemm needs binary"):
        w.bgemm(np.zeros((1, 2), np.uint64))
    with pytest.raises(K.KernelError, match="ISA"):
        K.set_isa("sse9")


@pytest.mark.parametrize("layout", ["sign", "sign_mask", "planes", "sparse"])
def test_conv_shaped_calls_split_rows_across_threads(layout):
    """Many rows, few outputs (a conv's pixels x 20 channels): api.c splits M over the threads;
    every element equals the 1-thread result (int8 exact; f32 the same per-element sums)."""
    alphabet, bits, sp = {"sign": ("binary", 1, 0.0), "sign_mask": ("ternary", 2, 0.3),
                          "planes": ("int", 4, 0.0), "sparse": ("int", 3, 0.95)}[layout]
    layer = make_layer(alphabet, bits, 20, 70, sparsity=sp, pruned=sp > 0)
    w = K.PackedWeights.from_layer(layer, layout)
    xq = RNG.integers(-127, 128, size=(1000, 70)).astype(np.int8)
    xs = RNG.random(1000).astype(np.float32)
    x = RNG.standard_normal((1000, 70)).astype(np.float32)
    want = w.matmul_i8_raw(xq, threads=1), w.matmul_i8(xq, xs, threads=1), w.matmul_f32(x, threads=1)
    for t in (2, 3, 8):
        got = w.matmul_i8_raw(xq, threads=t), w.matmul_i8(xq, xs, threads=t), w.matmul_f32(x, threads=t)
        assert all(np.array_equal(a, b) for a, b in zip(got[0], want[0]))
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_fused_clamp_is_min_max_of_the_unclamped_output():
    layer = make_layer("int", 4, 70, 90)
    w = K.PackedWeights.from_layer(layer)
    xq = RNG.integers(-127, 128, size=(300, 90)).astype(np.int8)
    xs = RNG.random(300).astype(np.float32)
    x = RNG.standard_normal((300, 90)).astype(np.float32)
    y8, yf = w.matmul_i8(xq, xs), w.matmul_f32(x)
    w.set_clamp(0.0, 6.0)
    for t in (1, 3):
        np.testing.assert_array_equal(w.matmul_i8(xq, xs, threads=t), np.minimum(np.maximum(y8, 0), 6))
        np.testing.assert_array_equal(w.matmul_f32(x, threads=t), np.minimum(np.maximum(yf, 0), 6))
    w.set_clamp()  # off again
    np.testing.assert_array_equal(w.matmul_i8(xq, xs), y8)
    with pytest.raises(K.KernelError):
        w.set_clamp(1.0, 0.0)


@pytest.mark.parametrize("alphabet,bits,pruned", [("ternary", 2, False), ("int", 2, False), ("int", 3, False),
                                                  ("int", 4, False), ("binary", 1, False), ("int", 8, False),
                                                  ("int", 4, True)])
@pytest.mark.parametrize("m,n,k", [(4, 16, 16), (7, 17, 9), (600, 24, 27), (37, 144, 24), (9, 1, 1),
                                   (300, 65, 100), (5, 40, 33), (1100, 20, 70)])
@pytest.mark.parametrize("bias,clamp", [(True, None), (False, (0.0, 6.0))])
def test_i8_epilogue_bit_identical_to_portable_c(alphabet, bits, pruned, m, n, k, bias, clamp):
    """Tall int8 calls run in row blocks with the epilogue fused into the kernel where the ISA has
    one (AVX2: RP codes of b <= 4 and ternary; AVX-512: every layout with RP codes; lam: the
    kernel, then the epilogue; partial 16-row groups, K tails shorter than a step, 600 and 1100
    rows = several blocks): y must equal the C version's bit for bit, since all compute
    clamp(xs * (scale * acc) + b)."""
    layer = make_layer(alphabet, bits, n, k, sparsity=0.5 if pruned else 0.0, pruned=pruned, bias=bias,
                       seed=m + n + k)
    xq = RNG.integers(-127, 128, size=(m, k)).astype(np.int8)
    xs = (RNG.random(m) * 0.02).astype(np.float32)
    got = {}
    for isa in ISAS:
        K.set_isa(isa)
        try:
            w = K.PackedWeights.from_layer(layer)
            if clamp:
                w.set_clamp(*clamp)
            got[isa] = [w.matmul_i8(xq, xs, threads=t) for t in (1, 2)]
        finally:
            K.set_isa("auto")
    for isa, ys in got.items():
        for y in ys:
            np.testing.assert_array_equal(y.view(np.uint32), got["c"][0].view(np.uint32), err_msg=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("alphabet,bits", [("ternary", 2), ("int", 4), ("binary", 1)])
@pytest.mark.parametrize("m,k", [(1, 70), (700, 27), (64, 1000)])
def test_matmul_q8_is_quantize_then_matmul_i8(isa, alphabet, bits, m, k):
    """spfq_matmul_q8 quantises the float rows itself (in blocks, on the call's threads): bit for
    bit spfq_quantize_i8 followed by spfq_matmul_i8, NaN and all-zero rows included."""
    layer = make_layer(alphabet, bits, 40, k, seed=m + k)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    x[0, :] = 0.0
    if m > 2:
        x[2, 3] = np.nan
    K.set_isa(isa)
    try:
        w = K.PackedWeights.from_layer(layer)
        w.set_clamp(-1.0, 1.0)
        xq, xs = K.quantize_i8(x)
        want = w.matmul_i8(xq, xs)
        for t in (1, 2, 3):
            np.testing.assert_array_equal(w.matmul_q8(x, threads=t).view(np.uint32), want.view(np.uint32))
    finally:
        K.set_isa("auto")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("alphabet,bits,pruned", [("int", 4, False), ("ternary", 2, False), ("binary", 1, False),
                                                  ("int", 3, True), ("binary", 1, True)])
def test_tall_f32_lane_tables_match_the_oracle(isa, alphabet, bits, pruned):
    """Weight-only calls of 16+ rows run on float tables in output-lane order (dconv.c's
    micro-kernel): bit for bit the C oracle's column-order sums (computed here a row at a time,
    below the threshold), zero codes skipped even against inf / NaN inputs, clamp applied."""
    layer = make_layer(alphabet, bits, 37, 70, sparsity=0.5 if pruned else 0.3, pruned=pruned, seed=5)
    x = RNG.standard_normal((40, 70)).astype(np.float32)
    x[3, 5], x[7, 0], x[11, 69] = np.inf, np.nan, -np.inf
    K.set_isa("c")
    try:
        w = K.PackedWeights.from_layer(layer)
        w.set_clamp(-2.0, 3.0)
        want = np.concatenate([w.matmul_f32(x[i:i + 1]) for i in range(len(x))])
    finally:
        K.set_isa("auto")
    K.set_isa(isa)
    try:
        w = K.PackedWeights.from_layer(layer)
        w.set_clamp(-2.0, 3.0)
        for t in (1, 3):
            np.testing.assert_array_equal(w.matmul_f32(x, threads=t).view(np.uint32), want.view(np.uint32))
    finally:
        K.set_isa("auto")
