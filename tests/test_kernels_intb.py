"""int b-bit kernels (kernels/src/intb.c = portable oracle, kernels/src/intb_avx2.c = AVX2) for
the PLANES and SPARSE layouts, tested directly through their range functions.

The two C files are compiled into a throw-away shared library and called through ctypes with
spfq_prepared / spfq_job mirrored as ctypes structures (independent of the package binding).
Inputs are packed by the project's own packer (spfq_deploy.pack.layouts.pack_layer), so the bytes
are exactly the file format; outputs are compared with an independent numpy reference computed
from the int8 codes: integer kernels bit-exactly, float kernels within summation-order tolerance.

Extra compiler flags (e.g. "-fsanitize=address") can be given in SPFQ_INTB_CFLAGS; under ASan
load libasan first (LD_PRELOAD=$(gcc -print-file-name=libasan.so)).
"""

from __future__ import annotations

import ctypes as C
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from kernel_build import build_library, cpu_has

from spfq_deploy.compressed import CompressedLayer
from spfq_deploy.pack.layouts import pack_layer

ROOT = Path(__file__).resolve().parents[1]
SRC = [ROOT / "kernels/src/intb.c", ROOT / "kernels/src/intb_avx2.c"]
LAYOUT = {"planes": 3, "sparse": 4}

# ------------------------------------------------------------------ ctypes mirror of the ABI

u64p, f32p, i8p, i32p = (C.POINTER(C.c_uint64), C.POINTER(C.c_float), C.POINTER(C.c_int8),
                         C.POINTER(C.c_int32))


class WeightsDesc(C.Structure):
    _fields_ = [("layout", C.c_int32), ("n", C.c_int32), ("k", C.c_int32), ("bits", C.c_int32),
                ("kept_words", C.c_int32), ("sign", u64p), ("mask", u64p), ("planes", u64p),
                ("scale", f32p), ("lam", f32p), ("bias", f32p)]


class Prepared(C.Structure):
    _fields_ = [("d", WeightsDesc), ("words", C.c_int32), ("sign", u64p), ("mask", u64p),
                ("planes", u64p), ("scale", f32p), ("lam", f32p), ("bias", f32p),
                ("rp", C.c_void_p), ("rp_cb", C.c_int32), ("rp_steps", C.c_int32), ("rp_off", C.c_int32), ("rp_mul", C.c_int32),
                ("clamped", C.c_int32), ("clamp_lo", C.c_float), ("clamp_hi", C.c_float)]


class Job(C.Structure):
    _fields_ = [("w", C.POINTER(Prepared)), ("m", C.c_int32), ("x", f32p), ("y", f32p),
                ("xq", i8p), ("acc_c", i32p), ("acc_s", i32p), ("xbits", u64p), ("dot", i32p), ("m0", C.c_int32),
                ("xscale", C.POINTER(C.c_float))]


def _ptr(a, typ):
    return None if a is None else a.ctypes.data_as(typ)


HAVE_AVX2 = cpu_has("avx2", "fma", "popcnt", "bmi1", "bmi2")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("intb") / "libintb.so"
    extra = shlex.split(os.environ.get("SPFQ_INTB_CFLAGS", ""))
    so = build_library(SRC, out, ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", *extra])
    for name in ("planes_f32", "planes_i8", "sparse_f32", "sparse_i8"):
        for isa in ("c", "avx2"):
            fn = getattr(so, f"spfq_{name}_{isa}", None)
            if fn is not None:
                fn.argtypes = [C.POINTER(Job), C.c_int32, C.c_int32]
                fn.restype = None
    return so


ISAS = ["c", pytest.param("avx2", marks=pytest.mark.skipif(not HAVE_AVX2, reason="no AVX2/BMI2"))]

# ------------------------------------------------------------------ inputs


def make_codes(rng, b, N, K, sparsity=0.0):
    Kmax = 2 ** (b - 1) - 1
    codes = rng.integers(-Kmax, Kmax + 1, size=(N, K)).astype(np.int8)
    if sparsity > 0:  # pruned layers: nonzero levels, then the mask
        codes[codes == 0] = Kmax
        codes[rng.random((N, K)) < sparsity] = 0
        if sparsity >= 1.0:
            codes[:] = 0
    if N * K >= 2 and sparsity < 1.0:  # always include both extreme levels
        codes.flat[0] = Kmax
        codes.flat[-1] = -Kmax
    return codes


def make_layer(codes, b, rng, lam=False, bias=False):
    N, K = codes.shape
    scale = (rng.random(N) + 0.5).astype(np.float16).astype(np.float32)
    return CompressedLayer(
        name="l", kind="linear", weight_shape=(N, K), alphabet="int", bits=b, codes=codes,
        scale=scale, lam=((scale * 1.75).astype(np.float16).astype(np.float32) if lam else None),
        bias=(rng.standard_normal(N).astype(np.float32) if bias else None))


class Packed:
    """A layer packed by the project's packer, viewed as a spfq_prepared (keeps buffers alive)."""

    def __init__(self, layer: CompressedLayer, layout: str):
        self.layer = layer
        bufs = pack_layer(layer, layout)
        N, K = layer.rows, layer.cols
        W = -(-K // 64)
        if layout == "planes":
            self.planes, self.mask, Wk = bufs["planes"], None, 0
            assert self.planes.shape == (layer.bits, N, W)
        else:
            self.planes, self.mask = bufs["kept"], bufs["mask"]
            Wk = self.planes.shape[2]
            assert self.mask.shape == (N, W)
        self.scale = np.ascontiguousarray(layer.scale, dtype=np.float32)
        self.lam = None if layer.lam is None else np.ascontiguousarray(layer.lam, dtype=np.float32)
        self.bias = None if layer.bias is None else np.ascontiguousarray(layer.bias, np.float32)
        # an all-zero SPARSE layer has Wk = 0 and no kept buffer at all: pass NULL (as api.c
        # allows), so a kernel that touched it would crash
        planes = _ptr(self.planes, u64p) if self.planes.size else None
        d = WeightsDesc(LAYOUT[layout], N, K, layer.bits, Wk, None, _ptr(self.mask, u64p), planes,
                        _ptr(self.scale, f32p), _ptr(self.lam, f32p), _ptr(self.bias, f32p))
        self.prep = Prepared(d, W, None, d.mask, d.planes, d.scale, d.lam, d.bias)
        self.layout = layout

    def run_i8(self, lib, isa, xq, ranges=None, want_c=True, want_s=True):
        M, N = xq.shape[0], self.layer.rows
        xq = np.ascontiguousarray(xq, dtype=np.int8)
        acc_c = np.full((M, N), 0x5A5A5A5A, dtype=np.int32)  # garbage: every output is written
        acc_s = acc_c.copy()
        job = Job(C.pointer(self.prep), M, None, None, _ptr(xq, i8p),
                  _ptr(acc_c, i32p) if want_c else None, _ptr(acc_s, i32p) if want_s else None,
                  None, None)
        fn = getattr(lib, f"spfq_{self.layout}_i8_{isa}")
        for n0, n1 in ranges or [(0, N)]:
            fn(C.byref(job), n0, n1)
        return acc_c, acc_s

    def run_f32(self, lib, isa, x, ranges=None):
        M, N = x.shape[0], self.layer.rows
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.full((M, N), np.nan, dtype=np.float32)
        job = Job(C.pointer(self.prep), M, _ptr(x, f32p), _ptr(y, f32p), None, None, None, None,
                  None)
        fn = getattr(lib, f"spfq_{self.layout}_f32_{isa}")
        for n0, n1 in ranges or [(0, N)]:
            fn(C.byref(job), n0, n1)
        return y


def ref_i8(codes, xq):
    c = codes.astype(np.int64)
    x = xq.astype(np.int64)
    return x @ c.T, x @ np.sign(c).T


def abi_values(layer):
    """value(c) = sign(c) * (lam + (|c| - 1) * scale) of spfq_kernels.h (lam = scale if None).
    Same as CompressedLayer.dequantize() except for a K == 1 (2-bit) layer that carries a lam,
    which dequantize() reads as +-scale; the compressor never produces one (it stores lam as the
    scale of K == 1 layers)."""
    c = layer.codes.astype(np.float64)
    s = layer.scale.astype(np.float64)[:, None]
    lam = s if layer.lam is None else layer.lam.astype(np.float64)[:, None]
    return np.sign(c) * (lam + (np.abs(c) - 1.0) * s)


def ref_f32(layer, x):
    """float64 reference y = x @ value(W).T + bias, and a bound for summation-order error."""
    w = abi_values(layer)
    if layer.lam is None or layer.K > 1:
        np.testing.assert_allclose(w, layer.dequantize().reshape(w.shape), rtol=1e-6, atol=0)
    x64 = x.astype(np.float64)
    y = x64 @ w.T
    if layer.bias is not None:
        y = y + layer.bias.astype(np.float64)
    tol = 1e-5 * (np.abs(x64) @ np.abs(w).T) * max(1.0, np.sqrt(layer.cols) / 8) + 1e-5
    return y, tol


def check_i8(packed, lib, isa, xq, ranges=None):
    acc_c, acc_s = packed.run_i8(lib, isa, xq, ranges)
    rc, rs = ref_i8(packed.layer.codes, xq)
    np.testing.assert_array_equal(acc_c, rc.astype(np.int32))
    np.testing.assert_array_equal(acc_s, rs.astype(np.int32))


def check_f32(packed, lib, isa, x, ranges=None):
    y = packed.run_f32(lib, isa, x, ranges)
    ry, tol = ref_f32(packed.layer, x)
    assert np.all(np.isfinite(y))
    err = np.abs(y.astype(np.float64) - ry)
    assert np.all(err <= tol), float((err / tol).max())


def rand_xq(rng, M, K):
    return rng.integers(-127, 128, size=(M, K)).astype(np.int8)


# ------------------------------------------------------------------ shape sweeps

KS = (1, 7, 63, 64, 65, 100, 255, 257, 1000, 4096, 11008)
NS = (1, 3, 64, 65)
MS = (1, 2, 16, 33)
BITS = tuple(range(2, 9))


def sweep(ks=KS):
    """(b, K, N, M) cases: every b with every K, N and M cycling so each value meets many
    others; the biggest K are paired with the smaller M to keep the oracle quick."""
    cases = []
    for ib, b in enumerate(BITS):
        for ik, K in enumerate(ks):
            N = NS[(ib + ik) % len(NS)]
            M = MS[(ib * 3 + ik) % len(MS)]
            if K >= 4096:
                M = min(M, 2)
            cases.append((b, K, N, M))
    return cases


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,K,N,M", sweep())
def test_planes_i8(lib, isa, b, K, N, M):
    rng = np.random.default_rng(1000 * b + K + 7 * N + M)
    p = Packed(make_layer(make_codes(rng, b, N, K), b, rng), "planes")
    check_i8(p, lib, isa, rand_xq(rng, M, K))


def check_repacked(p, lib, isa, xq, ranges=None, plane_acc_s=True):
    """acc_c from the prepare-time repack (spfq_planes_repack; acc_s NULL selects it) == numpy
    exactly; with acc_s wanted the plane path runs and still equals the oracle (acc_c only with
    plane_acc_s=False: the AVX2 plane path takes acc_s = acc_c at b = 2, which differs for the
    code u = 0, c = -2, that the packer never writes)."""
    lib.spfq_planes_repack.argtypes = [C.c_void_p]
    lib.spfq_planes_repack.restype = C.c_int
    libc = C.CDLL(None)
    libc.free.argtypes = [C.c_void_p]
    assert lib.spfq_planes_repack(C.addressof(p.prep)) == 0 and p.prep.rp
    try:
        acc_c, acc_s = p.run_i8(lib, isa, xq, ranges, want_s=False)
        np.testing.assert_array_equal(acc_c, ref_i8(p.layer.codes, xq)[0].astype(np.int32))
        assert (acc_s == 0x5A5A5A5A).all()
        if plane_acc_s:
            check_i8(p, lib, isa, xq, ranges)
        else:
            np.testing.assert_array_equal(p.run_i8(lib, isa, xq, ranges)[0], acc_c)
    finally:
        libc.free(p.prep.rp)
        p.prep.rp = None


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,K,N,M", sweep() + [(2, 4096, 200, 1), (4, 4096, 130, 6), (3, 16400, 65, 5)])
def test_planes_i8_repacked(lib, isa, b, K, N, M):
    rng = np.random.default_rng(4000 * b + K + 7 * N + M)
    p = Packed(make_layer(make_codes(rng, b, N, K), b, rng), "planes")
    xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
    if K >= 1000:  # extremes over long rows: the int16 partial sums at their bounds
        xq = np.where(rng.random((M, K)) < 0.5, np.int8(-128), np.int8(127))
    check_repacked(p, lib, isa, xq)
    if N > 70:
        check_repacked(p, lib, isa, xq, [(0, 5), (5, 70), (70, N)])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b", (2, 3, 4))
@pytest.mark.parametrize("xval", (-128, 127))
def test_planes_repacked_extreme_codes(lib, isa, b, xval):
    """Every row at the code extremes (u = 0 and u = 2^b - 1 included, the packer writes
    neither) against constant extreme activations: the int16 sums at their largest."""
    rng = np.random.default_rng(90 + b)
    K, N = 5000, 4
    p = Packed(make_layer(make_codes(rng, b, N, K), b, rng), "planes")
    ones = np.uint64(2**64 - 1)
    p.planes[:] = np.uint64(0)
    p.planes[:, 1] = ones  # u = 2^b - 1
    p.planes[:, 2, ::2] = ones  # u alternating
    p.planes[:, :, -1] &= np.uint64((1 << (K % 64)) - 1)
    u = np.zeros((N, K), np.int64)
    for q in range(b):
        u |= np.unpackbits(p.planes[q].view(np.uint8), axis=1, bitorder="little")[:, :K].astype(np.int64) << q
    p.layer.codes = (u - 2 ** (b - 1)).astype(np.int8)
    for M in (1, 3, 4):
        check_repacked(p, lib, isa, np.full((M, K), xval, dtype=np.int8), plane_acc_s=b > 2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,K,N,M", sweep())
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.95, 1.0))
def test_sparse_i8(lib, isa, b, K, N, M, sparsity):
    rng = np.random.default_rng(2000 * b + K + 7 * N + M + int(100 * sparsity))
    p = Packed(make_layer(make_codes(rng, b, N, K, sparsity), b, rng, lam=True), "sparse")
    check_i8(p, lib, isa, rand_xq(rng, M, K))


F32_KS = (1, 63, 65, 257, 1000, 4096)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,K,N,M", sweep(F32_KS))
@pytest.mark.parametrize("lam,bias", [(False, False), (True, True)])
def test_planes_f32(lib, isa, b, K, N, M, lam, bias):
    rng = np.random.default_rng(3000 * b + K + 7 * N + M + lam)
    p = Packed(make_layer(make_codes(rng, b, N, K), b, rng, lam=lam, bias=bias), "planes")
    check_f32(p, lib, isa, rng.standard_normal((M, K)).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,K,N,M", sweep(F32_KS))
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.95, 1.0))
@pytest.mark.parametrize("lam", (False, True))
def test_sparse_f32(lib, isa, b, K, N, M, sparsity, lam):
    rng = np.random.default_rng(4000 * b + K + 7 * N + M + int(100 * sparsity) + lam)
    p = Packed(make_layer(make_codes(rng, b, N, K, sparsity), b, rng, lam=lam, bias=True),
               "sparse")
    check_f32(p, lib, isa, rng.standard_normal((M, K)).astype(np.float32))


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("b", BITS)
@pytest.mark.parametrize("xval", (-128, 127))
def test_i8_saturation_bounds(lib, isa, layout, b, xval):
    """Extreme codes against constant extreme activations (incl. -128): no int16 overflow."""
    rng = np.random.default_rng(b)
    Kmax = 2 ** (b - 1) - 1
    for K in (256, 1000):
        for code in (Kmax, -Kmax):
            codes = np.full((3, K), code, dtype=np.int8)
            codes[1, ::2] = -code
            p = Packed(make_layer(codes, b, rng, lam=layout == "sparse"), layout)
            check_i8(p, lib, isa, np.full((2, K), xval, dtype=np.int8))
            check_i8(p, lib, isa, np.full((1, K), xval, dtype=np.int8))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("M", (1, 5))
def test_row_ranges(lib, isa, layout, M):
    """Several range calls (as the thread split does) fill exactly their rows; n0 == n1 is a
    no-op that writes nothing."""
    rng = np.random.default_rng(5 + M)
    b, N, K = 4, 130, 333
    p = Packed(make_layer(make_codes(rng, b, N, K, 0.5 if layout == "sparse" else 0.0), b, rng,
                          lam=True, bias=True), layout)
    ranges = [(0, 64), (64, 64), (64, 65), (65, 130)]
    check_i8(p, lib, isa, rand_xq(rng, M, K), ranges)
    check_f32(p, lib, isa, rng.standard_normal((M, K)).astype(np.float32), ranges)
    acc_c, acc_s = p.run_i8(lib, isa, rand_xq(rng, M, K), [(10, 10)])
    assert np.all(acc_c == 0x5A5A5A5A) and np.all(acc_s == 0x5A5A5A5A)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b", (2, 4, 8))
def test_sparse_block_patterns(lib, isa, b):
    """Masks that stress the compact-stream bookkeeping: full words next to empty ones, single
    bits at word edges, a dense row next to an empty row, a row whose kept count is exactly
    Wk*64, all-zero superblocks in the middle and at the end."""
    rng = np.random.default_rng(b)
    N, K = 9, 1100
    codes = make_codes(rng, b, N, K)
    codes[codes == 0] = 1
    keep = np.zeros((N, K), dtype=bool)
    keep[0] = True                       # dense row: kept count = K (sets Wk)
    keep[1, 64:128] = True               # one full word between empty ones
    keep[2, [0, 63, 64, 127, 1099]] = True
    keep[3, 256:512] = True              # one full superblock, others empty
    keep[4, :] = rng.random(K) < 0.5
    keep[4, 512:768] = False             # empty superblock in the middle
    keep[5, :1000] = rng.random(1000) < 0.9
    keep[6, 1024:] = True                # only the partial last superblock
    # rows 7 and 8: empty (8 is the last row: read through the padded copy path)
    keep[8, 1099] = True
    codes[~keep] = 0
    p = Packed(make_layer(codes, b, rng, lam=True, bias=True), "sparse")
    for M in (1, 3):
        check_i8(p, lib, isa, rand_xq(rng, M, K))
        check_f32(p, lib, isa, rng.standard_normal((M, K)).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("b", (2, 4, 6, 8))
@pytest.mark.parametrize("M", (1, 3))
def test_i8_null_outputs(lib, isa, layout, b, M):
    """acc_s == NULL (the sign sums are not needed when lam == scale) skips them and leaves that
    buffer alone; acc_c alone and acc_s alone are each still exact."""
    rng = np.random.default_rng(b * 10 + M)
    K = 700
    p = Packed(make_layer(make_codes(rng, b, 5, K, 0.5 if layout == "sparse" else 0.0), b, rng,
                          lam=layout == "sparse"), layout)
    xq = rand_xq(rng, M, K)
    rc, rs = ref_i8(p.layer.codes, xq)
    acc_c, acc_s = p.run_i8(lib, isa, xq, want_s=False)
    np.testing.assert_array_equal(acc_c, rc.astype(np.int32))
    assert np.all(acc_s == 0x5A5A5A5A)
    acc_c, acc_s = p.run_i8(lib, isa, xq, want_c=False)
    np.testing.assert_array_equal(acc_s, rs.astype(np.int32))
    assert np.all(acc_c == 0x5A5A5A5A)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b", (3, 4))
def test_sparse_corrupt_mask_stays_in_bounds(lib, isa, b):
    """A mask with more set bits than a row's kept words can hold (a corrupt buffer) must not
    make a kernel read past the kept buffer: both ISAs count the excess weights as 0 and agree
    exactly (the AVX2 kernel hands such a row to the portable one)."""
    rng = np.random.default_rng(b)
    N, K = 4, 300
    codes = make_codes(rng, b, N, K, 0.8)
    p = Packed(make_layer(codes, b, rng, lam=True), "sparse")
    p.mask[-1, :] = np.uint64(0xFFFFFFFFFFFFFFFF)  # last row: every column "kept"
    p.mask[-1, -1] = np.uint64((1 << (K % 64)) - 1)  # keep the zero padding bits
    p.mask[1, 0] = np.uint64(0xFFFFFFFFFFFFFFFF)
    for M in (1, 3):
        xq = rand_xq(rng, M, K)
        a, c = p.run_i8(lib, isa, xq), p.run_i8(lib, "c", xq)
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(a[1], c[1])
        x = rng.standard_normal((M, K)).astype(np.float32)
        np.testing.assert_allclose(p.run_f32(lib, isa, x), p.run_f32(lib, "c", x), rtol=1e-4,
                                   atol=1e-3)
    ok = [r for r in range(N) if r not in (1, N - 1)]
    rc, rs = ref_i8(codes, xq)
    np.testing.assert_array_equal(a[0][:, ok], rc[:, ok].astype(np.int32))


@pytest.mark.parametrize("isa", ISAS)
def test_avx2_matches_c_exactly(lib, isa):
    """Integer results of both ISAs agree with each other on one mixed case (sanity of the
    reference itself), including xq = -128 entries."""
    rng = np.random.default_rng(11)
    for layout, sp in (("planes", 0.0), ("sparse", 0.3)):
        for b in (3, 5, 8):
            codes = make_codes(rng, b, 17, 777, sp)
            p = Packed(make_layer(codes, b, rng, lam=True), layout)
            xq = rng.integers(-128, 128, size=(3, 777)).astype(np.int8)
            a = p.run_i8(lib, isa, xq)
            c = p.run_i8(lib, "c", xq)
            np.testing.assert_array_equal(a[0], c[0])
            np.testing.assert_array_equal(a[1], c[1])


# ------------------------------------------------------------------ real layers


def quantize_i8(x):
    """The ABI's activation quantiser: xscale = max|x_row| / 127, round half away, clamp."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    xs = np.where(amax > 0, amax / 127.0, 0.0).astype(np.float32)
    q = np.where(xs > 0, x / np.where(xs > 0, xs, 1), 0)
    q = np.sign(q) * np.floor(np.abs(q) + 0.5)
    return np.clip(q, -127, 127).astype(np.int8), xs


def rtn_layer(name, w, b=4, prune=0.0):
    """Per-row round-to-nearest b-bit codes; optionally magnitude-prune a fraction per row
    first (then lam = smallest kept magnitude, as a pruned layer has)."""
    w = np.asarray(w, dtype=np.float32).reshape(w.shape[0], -1)
    Kmax = 2 ** (b - 1) - 1
    scale = (np.abs(w).max(axis=1) / Kmax).astype(np.float16).astype(np.float32)
    scale = np.maximum(scale, np.float32(1e-4))
    codes = np.clip(np.rint(w / scale[:, None]), -Kmax, Kmax).astype(np.int8)
    lam = None
    if prune > 0:
        thr = np.quantile(np.abs(w), prune, axis=1, keepdims=True)
        keep = np.abs(w) > thr
        codes = np.where(keep, np.where(codes == 0, np.sign(w).astype(np.int8), codes), 0)
        codes = codes.astype(np.int8)
        lam = np.where(keep, np.abs(w), np.inf).min(axis=1)
        lam = np.where(np.isfinite(lam), lam, scale).astype(np.float16).astype(np.float32)
    return CompressedLayer(name=name, kind="linear", weight_shape=w.shape, alphabet="int", bits=b,
                           codes=codes, scale=scale, lam=lam, bias=None)


@pytest.fixture(scope="module")
def real_weights():
    import examples.minilm as minilm  # installed by make test
    import examples.mnist_cnn as mnist
    up = minilm.build().state_dict()["layers.0.ffn.up.weight"].numpy()
    cls = mnist.build().state_dict()["classifier.0.weight"].numpy()
    return {"minilm.layers.0.ffn.up": up, "mnist.classifier.0": cls}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout,prune", [("planes", 0.0), ("sparse", 0.5)])
def test_real_layers(lib, isa, real_weights, layout, prune):
    rng = np.random.default_rng(0)
    for name, w in real_weights.items():
        layer = rtn_layer(name, w, 4, prune)
        if prune:
            assert abs(layer.sparsity - prune) < 0.01
        p = Packed(layer, layout)
        K = layer.cols
        x = rng.standard_normal((4, K)).astype(np.float32)
        xq, xs = quantize_i8(x)
        for M in (1, 4):
            check_i8(p, lib, isa, xq[:M])
            check_f32(p, lib, isa, x[:M])
        # the integer path's epilogue reproduces the float layer on quantised activations
        acc_c, acc_s = p.run_i8(lib, isa, xq)
        lam = layer.scale if layer.lam is None else layer.lam
        y = xs * (layer.scale * acc_c.astype(np.float64) + (lam - layer.scale) * acc_s)
        ry, tol = ref_f32(layer, (xq.astype(np.float64) * xs).astype(np.float32))
        assert np.all(np.abs(y - ry) <= tol)
