"""The AVX-512 binary-family range functions (kernels/src/binary_avx512.c: bgemm, sign_i8,
sign_mask_i8), called directly through ctypes against the portable C oracle (binary.c) and an
independent numpy int64 reference.

Reuses the ctypes mirror, reference and helpers of tests/test_kernels_binary.py; only the
library differs (binary.c + binary_avx512.c + the same layout shim). Skipped on CPUs without
the AVX-512 subset the kernels use.

Environment: CC, SPFQ_TEST_OPT and SPFQ_TEST_SANITIZE as in test_kernels_binary.py.
"""

from __future__ import annotations

import ctypes as C
import subprocess

import numpy as np
import pytest
from kernel_build import build_library, compiler, cpu_has, env_flags
from test_kernels_binary import (
    INC,
    SHIM,
    SRC,
    Weights,
    _mirror_layout,
    activations,
    check,
    make,
    ref_i8,
    reference,
    run,
    unpack,
    weights_for,
)

from spfq_deploy.pack.bits import pack_bits

KERNELS = ["sign_i8", "sign_mask_i8", "bgemm"]
KS = [1, 63, 64, 65, 511, 512, 513, 1000, 4096]
NS = [1, 3, 65]
MS = [1, 2, 5, 16]

NEED = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vpopcntdq", "avx512_bitalg",
        "bmi2", "popcnt", "fma"}


pytestmark = pytest.mark.skipif(not cpu_has(*NEED), reason="no AVX-512 VNNI/VPOPCNTDQ CPU")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("binary_avx512_kernels")
    shim = out / "shim.c"
    shim.write_text(SHIM)
    h = build_library([SRC / "binary.c", SRC / "binary_avx512.c", shim],
                      out / "libspfq_binary_avx512_test.so", env_flags())
    h.spfq_test_layout.restype = C.c_long
    h.spfq_test_layout.argtypes = [C.c_int]
    return h


def test_struct_mirror_matches_internal_h(lib):
    got = [lib.spfq_test_layout(i) for i in range(len(_mirror_layout()))]
    assert got == _mirror_layout()


def test_file_compiles_alone_without_warnings(tmp_path):
    for opt in ("-O0", "-O2", "-O3"):
        res = subprocess.run([compiler(), opt, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic",
                              f"-I{INC}", f"-I{SRC}", "-c", str(SRC / "binary_avx512.c"),
                              "-o", str(tmp_path / "x.o")], capture_output=True, text=True)
        assert res.returncode == 0, (opt, res.stderr)


def test_no_global_isa_flags_needed_and_symbols_exported(lib):
    for k in KERNELS:
        assert hasattr(lib, f"spfq_{k}_avx512")
    # the f32 kernels stay with avx2 (api.c falls back): not defined here
    assert not hasattr(lib, "spfq_sign_f32_avx512")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_shapes_against_numpy_and_c(lib, kernel, k, n):
    rng = np.random.default_rng([k, n, KERNELS.index(kernel), 512])
    w = weights_for(kernel, rng, n, k)
    act = activations(rng, kernel, sum(MS), k)
    ref = reference(kernel, w, act)
    start = 0
    for m in MS:
        part = slice(start, start + m)
        a = np.ascontiguousarray(act[part])
        out = check(lib, "avx512", kernel, w, a, ref=ref[part])
        c, _ = run(lib, "c", kernel, w, a)
        np.testing.assert_array_equal(out, c)
        start += m


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n0,n1", [(0, 1), (1, 2), (5, 70), (64, 128), (63, 130), (127, 130),
                                   (7, 7), (3, 200)])
def test_row_range_writes_only_its_rows(lib, kernel, n0, n1):
    rng = np.random.default_rng([n0, n1, KERNELS.index(kernel), 512])
    w = weights_for(kernel, rng, 200, 300)
    for m in (1, 2, 3, 4, 5, 7):
        check(lib, "avx512", kernel, w, activations(rng, kernel, m, 300), n0, n1)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("k", [65, 1000, 4096])
def test_sign_mask_sparsity(lib, sparsity, k):
    rng = np.random.default_rng([k, int(sparsity * 100), 512])
    w = make(rng, 67, k, sparsity=sparsity)
    for m in (1, 2, 4, 7):
        out = check(lib, "avx512", "sign_mask_i8", w, activations(rng, "sign_mask_i8", m, k))
        if sparsity == 1.0:
            assert np.all(out == 0)


def test_sign_bit_under_zero_mask_is_ignored(lib):
    rng = np.random.default_rng(7)
    w = make(rng, 65, 777, sparsity=0.6, stray=True)
    assert np.any(unpack(w.sign, 777) & ~unpack(w.mask, 777))
    for m in (1, 2, 5):
        check(lib, "avx512", "sign_mask_i8", w, activations(rng, "sign_mask_i8", m, 777))


@pytest.mark.parametrize("kernel", ["sign_i8", "sign_mask_i8"])
@pytest.mark.parametrize("k", [1, 65, 1000])
def test_i8_padding_bits_are_ignored(lib, kernel, k):
    """Set bits at k >= K (not produced by the packer) must not change i8 results (the oracle
    loops k < K only)."""
    rng = np.random.default_rng([k, 99])
    w = weights_for(kernel, rng, 9, k)
    clean = w.sign.copy()
    pad = ~np.uint64(0) << np.uint64(k % 64) if k % 64 else np.uint64(0)
    w.sign[:, -1] |= pad
    if w.mask is not None:
        w.mask[:, -1] |= pad
    x = activations(rng, kernel, 5, k)
    c, _ = run(lib, "c", kernel, w, x)
    a, _ = run(lib, "avx512", kernel, w, x)
    np.testing.assert_array_equal(a, c)
    w.sign[:] = clean


@pytest.mark.parametrize("kernel", KERNELS)
def test_bit_order_one_hot(lib, kernel):
    k, n = 200, 50
    cols = (37 * np.arange(n)) % k
    words = np.zeros((n, (k + 63) // 64), dtype="<u8")
    for r, c in enumerate(cols):
        words[r, c // 64] |= np.uint64(1) << np.uint64(c % 64)
    w = Weights(words, k, words.copy() if "mask" in kernel else None)
    rng = np.random.default_rng(3)
    for m in (1, 2, 4):
        act = activations(rng, kernel, m, k)
        out = check(lib, "avx512", kernel, w, act)
        if kernel == "sign_mask_i8":
            np.testing.assert_array_equal(out, -act[:, cols].astype(np.int32))


@pytest.mark.parametrize("kernel", ["sign_i8", "sign_mask_i8"])
@pytest.mark.parametrize("k", [4096, 11008, 64 * 63 + 5])
def test_i8_extremes_do_not_overflow(lib, kernel, k):
    n = 6
    neg = np.zeros((n, k), bool)
    neg[1] = neg[3] = neg[5] = True
    nz = np.ones((n, k), bool)
    w = Weights(pack_bits(neg), k, pack_bits(nz) if "mask" in kernel else None)
    act = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8),
                    np.where(np.arange(k) % 2, 127, -128).astype(np.int8),
                    np.full(k, -128, np.int8)])
    out = check(lib, "avx512", kernel, w, act)  # M = 4 tiles
    assert out[0, 0] == -128 * k and out[0, 1] == 128 * k and out[1, 0] == 127 * k
    check(lib, "avx512", kernel, w, act[:2].copy())  # M = 2 tiles
    for row in act:  # M = 1
        check(lib, "avx512", kernel, w, row[None].copy())


def test_i8_acc_c_null_is_allowed(lib):
    rng = np.random.default_rng(11)
    for kernel in ("sign_i8", "sign_mask_i8"):
        w = weights_for(kernel, rng, 70, 999)
        for m in (1, 2, 5):
            x = activations(rng, kernel, m, 999)
            out, extra = run(lib, "avx512", kernel, w, x, acc_c=False)
            assert extra is None
            np.testing.assert_array_equal(out, ref_i8(w, x))


@pytest.mark.parametrize("kernel", KERNELS)
def test_avx512_matches_c_oracle(lib, kernel):
    rng = np.random.default_rng(KERNELS.index(kernel) + 512)
    for n, k, m in [(97, 3000, 1), (64, 129, 6), (5, 11008, 3), (130, 4096, 9)]:
        w = weights_for(kernel, rng, n, k)
        act = activations(rng, kernel, m, k)
        c, _ = run(lib, "c", kernel, w, act)
        a, _ = run(lib, "avx512", kernel, w, act)
        np.testing.assert_array_equal(a, c)


# ------------------------------------------------------------------------------ prefill M
# M >= 16 runs the expanded-weight path (sign_i8_vnni: M >= 16 at K <= 1024, M >= 24 at
# K <= 2048, in K blocks of 1024): odd K (steps of 4 columns, 64-bit words), partial groups of
# 16 rows, partial 4-row activation tiles, row ranges that are not multiples of 64.

@pytest.mark.parametrize("kernel", ["sign_i8", "sign_mask_i8"])
@pytest.mark.parametrize("k", [1, 3, 5, 63, 64, 65, 127, 384, 1000, 1024, 1025, 1537, 2048])
@pytest.mark.parametrize("n", [1, 17, 64, 65, 130])
def test_prefill_m_against_numpy_and_c(lib, kernel, k, n):
    rng = np.random.default_rng([k, n, KERNELS.index(kernel), 16])
    w = weights_for(kernel, rng, n, k)
    for m in (16, 17, 23, 24, 37, 130):
        act = activations(rng, kernel, m, k)
        out = check(lib, "avx512", kernel, w, act)
        c, _ = run(lib, "c", kernel, w, act)
        np.testing.assert_array_equal(out, c)
        out2, extra = run(lib, "avx512", kernel, w, act, acc_c=False)
        assert extra is None
        np.testing.assert_array_equal(out2, c)


@pytest.mark.parametrize("kernel", ["sign_i8", "sign_mask_i8"])
@pytest.mark.parametrize("n0,n1", [(0, 1), (5, 70), (64, 128), (63, 130), (127, 130), (7, 7), (3, 200)])
def test_prefill_m_row_range(lib, kernel, n0, n1):
    rng = np.random.default_rng([n0, n1, KERNELS.index(kernel), 16])
    w = weights_for(kernel, rng, 200, 300)
    for m in (16, 29):
        check(lib, "avx512", kernel, w, activations(rng, kernel, m, 300), n0, n1)


@pytest.mark.parametrize("kernel", ["sign_i8", "sign_mask_i8"])
@pytest.mark.parametrize("k", [1, 66, 1000, 1537])
def test_prefill_m_padding_and_stray_bits_are_ignored(lib, kernel, k):
    rng = np.random.default_rng([k, 16, 99])
    w = make(rng, 33, k, sparsity=0.6, stray=True) if "mask" in kernel else weights_for(kernel, rng, 33, k)
    pad = ~np.uint64(0) << np.uint64(k % 64) if k % 64 else np.uint64(0)
    x = activations(rng, kernel, 40, k)
    ref = ref_i8(w, x)
    w.sign[:, -1] |= pad
    if w.mask is not None:
        w.mask[:, -1] |= pad
    a, _ = run(lib, "avx512", kernel, w, x)
    np.testing.assert_array_equal(a, ref)


@pytest.mark.parametrize("kernel", ["sign_i8", "sign_mask_i8"])
@pytest.mark.parametrize("k", [1024, 2048])
def test_prefill_m_extremes_do_not_overflow(lib, kernel, k):
    n = 6
    neg = np.zeros((n, k), bool)
    neg[1] = neg[3] = neg[5] = True
    w = Weights(pack_bits(neg), k, pack_bits(np.ones((n, k), bool)) if "mask" in kernel else None)
    rows = [np.full(k, -128, np.int8), np.full(k, 127, np.int8),
            np.where(np.arange(k) % 2, 127, -128).astype(np.int8)]
    act = np.stack([rows[i % 3] for i in range(24)])
    out = check(lib, "avx512", kernel, w, act)
    assert out[0, 0] == -128 * k and out[0, 1] == 128 * k and out[1, 0] == 127 * k
