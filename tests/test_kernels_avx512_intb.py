"""AVX-512 int b-bit kernels (kernels/src/intb_avx512.c) for PLANES and SPARSE, int8
activations, tested directly through their range functions against the portable oracle
(kernels/src/intb.c) and an independent numpy int64 reference, bit-exactly. PLANES twice: from
the bit planes, and from the prepare-time repack (spfq_planes_repack, used when only acc_c is
wanted).

intb.c and intb_avx512.c are compiled into a throw-away shared library and called through
ctypes, reusing the ctypes mirror and input builders of tests/test_kernels_intb.py. Skipped where
the CPU lacks AVX-512 F/BW/VL/VNNI/VBMI2 or BMI2. Extra compiler flags (e.g.
"-fsanitize=address") can be given in SPFQ_INTB_CFLAGS, as for test_kernels_intb.py.
"""

from __future__ import annotations

import ctypes as C
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_build import build_library, cpu_has  # noqa: E402
from test_kernels_intb import BITS, Job, Packed, check_i8, make_codes, make_layer, rand_xq, ref_i8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = [ROOT / "kernels/src/intb.c", ROOT / "kernels/src/intb_avx512.c"]

HAVE_AVX512 = cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi2",
                       "bmi2", "popcnt")
pytestmark = pytest.mark.skipif(not HAVE_AVX512, reason="no AVX-512 VNNI/VBMI2/BMI2")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("intb512") / "libintb512.so"
    extra = shlex.split(os.environ.get("SPFQ_INTB_CFLAGS", ""))
    so = build_library(SRC, out, ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", *extra])
    for name in ("planes_i8", "sparse_i8"):
        for isa in ("c", "avx512"):
            fn = getattr(so, f"spfq_{name}_{isa}")
            fn.argtypes = [C.POINTER(Job), C.c_int32, C.c_int32]
            fn.restype = None
    so.spfq_planes_repack.argtypes = [C.c_void_p]
    so.spfq_planes_repack.restype = C.c_int
    return so


_libc = C.CDLL(None)
_libc.free.argtypes = [C.c_void_p]


def check_repacked(p, lib, xq, ranges=None):
    """acc_c from the repacked codes (acc_s NULL selects that path) == numpy, exactly; the
    plane-decoding path (acc_s wanted) is unchanged by the repack."""
    assert lib.spfq_planes_repack(C.addressof(p.prep)) == 0 and p.prep.rp
    try:
        acc_c, acc_s = p.run_i8(lib, "avx512", xq, ranges, want_s=False)
        rc, _ = ref_i8(p.layer.codes, xq)
        np.testing.assert_array_equal(acc_c, rc.astype(np.int32))
        assert (acc_s == 0x5A5A5A5A).all()
        a = p.run_i8(lib, "avx512", xq, ranges)
        c = p.run_i8(lib, "c", xq, ranges)
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(a[1], c[1])
    finally:
        _libc.free(p.prep.rp)
        p.prep.rp = None


def check_vs_c(p, lib, xq, ranges=None):
    """avx512 == numpy reference == C oracle, both sums, and with acc_s / acc_c NULL."""
    check_i8(p, lib, "avx512", xq, ranges)
    a, c = p.run_i8(lib, "avx512", xq, ranges), p.run_i8(lib, "c", xq, ranges)
    np.testing.assert_array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[1], c[1])


KS = (1, 7, 63, 64, 65, 100, 127, 128, 129, 255, 257, 511, 512, 513, 1000, 4096, 11008)
NS = (1, 3, 64, 65)
MS = (1, 2, 3, 4, 5, 8, 16, 33)


def sweep():
    cases = []
    for ib, b in enumerate(BITS):
        for ik, K in enumerate(KS):
            N = NS[(ib + ik) % len(NS)]
            M = MS[(ib * 3 + ik) % len(MS)]
            if K >= 4096:
                M = min(M, 5)
            cases.append((b, K, N, M))
    return cases


@pytest.mark.parametrize("b,K,N,M", sweep())
def test_planes_i8(lib, b, K, N, M):
    rng = np.random.default_rng(1000 * b + K + 7 * N + M)
    p = Packed(make_layer(make_codes(rng, b, N, K), b, rng), "planes")
    check_vs_c(p, lib, rng.integers(-128, 128, size=(M, K)).astype(np.int8))


@pytest.mark.parametrize("b,K,N,M", sweep() + [(2, 4096, 200, 1), (4, 4096, 130, 6), (3, 16400, 65, 2),
                                          (8, 40000, 17, 1), (4, 300, 300, 9)])
def test_planes_i8_repacked(lib, b, K, N, M):
    rng = np.random.default_rng(3000 * b + K + 7 * N + M)
    p = Packed(make_layer(make_codes(rng, b, N, K), b, rng), "planes")
    xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
    check_repacked(p, lib, xq)
    if N > 70:  # ranges that do not start on a 64-row tile
        check_repacked(p, lib, xq, [(0, 5), (5, 70), (70, N)])


@pytest.mark.parametrize("b", BITS)
@pytest.mark.parametrize("xval", (-128, 127))
def test_planes_repacked_extremes(lib, b, xval):
    """Extreme codes, raw bit patterns (u = 0 included) and constant extreme activations over
    K long enough to need the chunked int32 partial sums (> 16384 columns)."""
    rng = np.random.default_rng(70 + b)
    Kmax = 2 ** (b - 1) - 1
    for K in (256, 4099, 33000):
        codes = np.full((5, K), Kmax, dtype=np.int8)
        codes[1] = -Kmax
        codes[2, ::2] = -Kmax
        p = Packed(make_layer(codes, b, rng), "planes")
        p.planes[:, 3:] = rng.integers(0, 2**63, size=p.planes[:, 3:].shape, dtype=np.uint64) * np.uint64(2) \
            + rng.integers(0, 2, size=p.planes[:, 3:].shape, dtype=np.uint64)
        p.planes[:, 4] = np.uint64(0)  # u = 0: c = -2^(b-1), a code the packer never writes
        if K % 64:
            p.planes[:, :, -1] &= np.uint64((1 << (K % 64)) - 1)
        u = np.zeros((5, K), np.int64)  # the codes the planes now hold
        for q in range(b):
            bits = np.unpackbits(p.planes[q].view(np.uint8), axis=1, bitorder="little")[:, :K]
            u |= bits.astype(np.int64) << q
        p.layer.codes = (u - 2 ** (b - 1)).astype(np.int8)
        for M in (1, 5):
            check_repacked(p, lib, np.full((M, K), xval, dtype=np.int8))


@pytest.mark.parametrize("b,K,N,M", sweep())
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.95, 1.0))
def test_sparse_i8(lib, b, K, N, M, sparsity):
    rng = np.random.default_rng(2000 * b + K + 7 * N + M + int(100 * sparsity))
    p = Packed(make_layer(make_codes(rng, b, N, K, sparsity), b, rng, lam=True), "sparse")
    check_vs_c(p, lib, rng.integers(-128, 128, size=(M, K)).astype(np.int8))


@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("b", BITS)
@pytest.mark.parametrize("xval", (-128, 127))
def test_i8_extremes(lib, layout, b, xval):
    """Extreme codes against constant extreme activations (incl. -128), long K: exact."""
    rng = np.random.default_rng(b)
    Kmax = 2 ** (b - 1) - 1
    for K in (256, 1000, 4099):
        for code in (Kmax, -Kmax):
            codes = np.full((3, K), code, dtype=np.int8)
            codes[1, ::2] = -code
            p = Packed(make_layer(codes, b, rng, lam=layout == "sparse"), layout)
            for M in (1, 4, 6):
                check_vs_c(p, lib, np.full((M, K), xval, dtype=np.int8))


@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("b", BITS)
def test_out_of_range_fields(lib, layout, b):
    """Bit patterns the packer never writes (PLANES u = 0, i.e. c = -2^(b-1); SPARSE fields of
    magnitude 2^(b-1), which the oracle wraps to -128 for b = 8) still match the oracle."""
    rng = np.random.default_rng(50 + b)
    N, K = 5, 300
    p = Packed(make_layer(make_codes(rng, b, N, K, 0.3 if layout == "sparse" else 0.0), b, rng,
                          lam=True), layout)
    p.planes[...] = rng.integers(0, 2**63, size=p.planes.shape, dtype=np.uint64) * np.uint64(2) \
        + rng.integers(0, 2, size=p.planes.shape, dtype=np.uint64)
    if layout == "planes":  # keep the zero padding bits past K
        p.planes[:, :, -1] &= np.uint64((1 << (K % 64)) - 1)
    for M in (1, 4, 7):
        xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
        a, c = p.run_i8(lib, "avx512", xq), p.run_i8(lib, "c", xq)
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(a[1], c[1])


@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("M", (1, 5))
def test_row_ranges(lib, layout, M):
    rng = np.random.default_rng(5 + M)
    b, N, K = 4, 130, 333
    p = Packed(make_layer(make_codes(rng, b, N, K, 0.5 if layout == "sparse" else 0.0), b, rng,
                          lam=True, bias=True), layout)
    check_vs_c(p, lib, rand_xq(rng, M, K), [(0, 64), (64, 64), (64, 65), (65, 130)])
    acc_c, acc_s = p.run_i8(lib, "avx512", rand_xq(rng, M, K), [(10, 10)])
    assert np.all(acc_c == 0x5A5A5A5A) and np.all(acc_s == 0x5A5A5A5A)


@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("b", (2, 3, 4, 6, 8))
@pytest.mark.parametrize("M", (1, 3, 4, 9))
def test_i8_null_outputs(lib, layout, b, M):
    rng = np.random.default_rng(b * 10 + M)
    K = 700
    p = Packed(make_layer(make_codes(rng, b, 5, K, 0.5 if layout == "sparse" else 0.0), b, rng,
                          lam=layout == "sparse"), layout)
    xq = rand_xq(rng, M, K)
    rc, rs = ref_i8(p.layer.codes, xq)
    acc_c, acc_s = p.run_i8(lib, "avx512", xq, want_s=False)
    np.testing.assert_array_equal(acc_c, rc.astype(np.int32))
    assert np.all(acc_s == 0x5A5A5A5A)
    acc_c, acc_s = p.run_i8(lib, "avx512", xq, want_c=False)
    np.testing.assert_array_equal(acc_s, rs.astype(np.int32))
    assert np.all(acc_c == 0x5A5A5A5A)


@pytest.mark.parametrize("b", (2, 4, 8))
def test_sparse_block_patterns(lib, b):
    """Full words next to empty ones, single bits at word edges, an empty row, a row whose kept
    count is exactly Wk*64 (the last kept word read without a successor), compact positions
    crossing word boundaries, and the buffer's last row."""
    rng = np.random.default_rng(b)
    N, K = 9, 1100
    codes = make_codes(rng, b, N, K)
    codes[codes == 0] = 1
    keep = np.zeros((N, K), dtype=bool)
    keep[0] = True
    keep[1, 64:128] = True
    keep[2, [0, 63, 64, 127, 1099]] = True
    keep[3, 256:512] = True
    keep[4, :] = rng.random(K) < 0.5
    keep[4, 512:768] = False
    keep[5, :1000] = rng.random(1000) < 0.9
    keep[6, 1024:] = True
    keep[8, 1099] = True
    codes[~keep] = 0
    p = Packed(make_layer(codes, b, rng, lam=True, bias=True), "sparse")
    for M in (1, 3, 4, 6):
        check_vs_c(p, lib, rand_xq(rng, M, K))


@pytest.mark.parametrize("b", (3, 4, 8))
def test_sparse_corrupt_mask_stays_in_bounds(lib, b):
    """More set mask bits than the kept words hold: fields past Wk*64 count as 0 (as in the
    oracle), and nothing past the kept buffer is read (run under ASan via SPFQ_INTB_CFLAGS)."""
    rng = np.random.default_rng(b)
    N, K = 4, 300
    codes = make_codes(rng, b, N, K, 0.8)
    p = Packed(make_layer(codes, b, rng, lam=True), "sparse")
    p.mask[-1, :] = np.uint64(0xFFFFFFFFFFFFFFFF)
    p.mask[-1, -1] = np.uint64((1 << (K % 64)) - 1)
    p.mask[1, 0] = np.uint64(0xFFFFFFFFFFFFFFFF)
    for M in (1, 3, 4):
        xq = rand_xq(rng, M, K)
        a, c = p.run_i8(lib, "avx512", xq), p.run_i8(lib, "c", xq)
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(a[1], c[1])
    ok = [r for r in range(N) if r not in (1, N - 1)]
    rc, rs = ref_i8(codes, xq)
    np.testing.assert_array_equal(a[0][:, ok], rc[:, ok].astype(np.int32))
    np.testing.assert_array_equal(a[1][:, ok], rs[:, ok].astype(np.int32))


@pytest.mark.parametrize("layout", ("planes", "sparse"))
@pytest.mark.parametrize("b", BITS)
def test_non_gfni_paths(lib, monkeypatch, layout, b):
    """SPFQ_AVX512_NO_GFNI forces the kmov decode paths (CPUs without GFNI): also exact."""
    monkeypatch.setenv("SPFQ_AVX512_NO_GFNI", "1")
    rng = np.random.default_rng(70 + b)
    for K, N, M in ((1, 3, 1), (65, 5, 4), (1000, 7, 6), (4099, 3, 1)):
        codes = make_codes(rng, b, N, K, 0.5 if layout == "sparse" else 0.0)
        p = Packed(make_layer(codes, b, rng, lam=True), layout)
        check_vs_c(p, lib, rng.integers(-128, 128, size=(M, K)).astype(np.int8))
        xq = rand_xq(rng, M, K)
        acc_c, acc_s = p.run_i8(lib, "avx512", xq, want_s=False)
        np.testing.assert_array_equal(acc_c, ref_i8(codes, xq)[0].astype(np.int32))
