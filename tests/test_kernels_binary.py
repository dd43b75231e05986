"""The binary-family range functions (kernels/src/binary.c, kernels/src/binary_avx2.c), called
directly: the portable C oracle and the AVX2 path each against an independent numpy reference.

The files are compiled here into a private shared library (only these two files and a tiny
layout shim), and the range functions are called through ctypes with spfq_prepared / spfq_job
mirrored as ctypes Structures (the shim checks the mirror against the C compiler's sizeof /
offsetof). That tests C and AVX2 separately, which the dispatcher in api.c cannot, and checks
that a range [n0, n1) writes those rows and nothing else.

The reference never uses popcount or the kernels' tricks: it unpacks the bits with
np.unpackbits (bitorder="little") and does integer math in int64.

Environment: CC picks the compiler, SPFQ_TEST_OPT the optimisation flag (default -O2).
SPFQ_TEST_SANITIZE=address builds the library with AddressSanitizer (run pytest with
LD_PRELOAD=$(cc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0);
SPFQ_TEST_SANITIZE=undefined builds it with UBSan (aborts on the first report).
"""

from __future__ import annotations

import ctypes as C
import subprocess

import numpy as np
import pytest
from kernel_build import INC, SRC, build_library, compiler, cpu_has, env_flags

from spfq_deploy.pack.bits import pack_bits, words_for

SIGN, SIGN_MASK = 1, 2

KS = [1, 7, 63, 64, 65, 100, 255, 257, 1000, 4096, 11008]
NS = [1, 3, 64, 65, 130]
MS = [1, 2, 16, 33]
KERNELS = ["sign_f32", "sign_mask_f32", "sign_i8", "sign_mask_i8", "bgemm"]

# ------------------------------------------------------------------------------ the library

SHIM = r"""
#include <stddef.h>
#include "internal.h"
/* sizeof / offsetof of the structs the test mirrors, -1 past the end. */
long spfq_test_layout(int i) {
    static const long v[] = {
        (long)sizeof(spfq_weights_desc), (long)offsetof(spfq_weights_desc, sign),
        (long)offsetof(spfq_weights_desc, scale), (long)offsetof(spfq_weights_desc, bias),
        (long)sizeof(struct spfq_prepared), (long)offsetof(struct spfq_prepared, words),
        (long)offsetof(struct spfq_prepared, bias),
        (long)sizeof(spfq_job), (long)offsetof(spfq_job, m), (long)offsetof(spfq_job, x),
        (long)offsetof(spfq_job, acc_c), (long)offsetof(spfq_job, acc_s),
        (long)offsetof(spfq_job, xbits), (long)offsetof(spfq_job, dot)};
    return i >= 0 && i < (int)(sizeof v / sizeof v[0]) ? v[i] : -1;
}
"""

class WeightsDesc(C.Structure):
    _fields_ = [("layout", C.c_int32), ("n", C.c_int32), ("k", C.c_int32), ("bits", C.c_int32),
                ("kept_words", C.c_int32), ("sign", C.c_void_p), ("mask", C.c_void_p),
                ("planes", C.c_void_p), ("scale", C.c_void_p), ("lam", C.c_void_p),
                ("bias", C.c_void_p)]


class Prepared(C.Structure):
    _fields_ = [("d", WeightsDesc), ("words", C.c_int32), ("sign", C.c_void_p),
                ("mask", C.c_void_p), ("planes", C.c_void_p), ("scale", C.c_void_p),
                ("lam", C.c_void_p), ("bias", C.c_void_p), ("rp", C.c_void_p),
                ("rp_cb", C.c_int32), ("rp_steps", C.c_int32), ("rp_off", C.c_int32), ("rp_mul", C.c_int32),
                ("clamped", C.c_int32), ("clamp_lo", C.c_float), ("clamp_hi", C.c_float),
                ("act", C.c_int32), ("act_slope", C.c_void_p), ("amx", C.c_void_p), ("hwc", C.c_void_p), ("hwc_c", C.c_int32), ("f32_lanes", C.c_void_p),
                ("gscale", C.c_void_p), ("gsteps", C.c_int32), ("ngroups", C.c_int32)]


class Job(C.Structure):
    _fields_ = [("w", C.POINTER(Prepared)), ("m", C.c_int32), ("x", C.c_void_p),
                ("y", C.c_void_p), ("xq", C.c_void_p), ("acc_c", C.c_void_p),
                ("acc_s", C.c_void_p), ("xbits", C.c_void_p), ("dot", C.c_void_p), ("m0", C.c_int32),
                ("xscale", C.c_void_p), ("xstride", C.c_int32)]


def _mirror_layout() -> list[int]:
    return [C.sizeof(WeightsDesc), WeightsDesc.sign.offset, WeightsDesc.scale.offset,
            WeightsDesc.bias.offset, C.sizeof(Prepared), Prepared.words.offset,
            Prepared.bias.offset, C.sizeof(Job), Job.m.offset, Job.x.offset,
            Job.acc_c.offset, Job.acc_s.offset, Job.xbits.offset, Job.dot.offset]


HAS_AVX2 = cpu_has("avx2", "fma", "popcnt")
ISAS = ["c", pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 CPU"))]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("binary_kernels")
    shim = out / "shim.c"
    shim.write_text(SHIM)
    h = build_library([SRC / "binary.c", SRC / "binary_avx2.c", shim], out / "libspfq_binary_test.so",
                      env_flags())
    h.spfq_test_layout.restype = C.c_long
    h.spfq_test_layout.argtypes = [C.c_int]
    return h


def test_struct_mirror_matches_internal_h(lib):
    got = [lib.spfq_test_layout(i) for i in range(len(_mirror_layout()))]
    assert got == _mirror_layout()
    assert lib.spfq_test_layout(len(got)) == -1


def test_files_compile_alone_without_warnings(tmp_path):
    cc = compiler()
    for f in ("binary.c", "binary_avx2.c"):
        for opt in ("-O0", "-O3"):
            res = subprocess.run([cc, opt, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic",
                                  f"-I{INC}", f"-I{SRC}", "-c", str(SRC / f),
                                  "-o", str(tmp_path / "x.o")], capture_output=True, text=True)
            assert res.returncode == 0, (f, opt, res.stderr)


# ------------------------------------------------------------------------------ calling

def _ptr(a):
    return None if a is None else a.ctypes.data


class Weights:
    """Packed SIGN / SIGN_MASK weights + per-row floats, as spfq_prepared (arrays kept alive)."""

    def __init__(self, sign_words, k, mask_words=None, scale=None, lam=None, bias=None):
        self.sign = np.ascontiguousarray(sign_words, dtype="<u8")
        self.n = self.sign.shape[0]
        self.k = int(k)
        self.words = words_for(k)
        assert self.sign.shape == (self.n, self.words)
        self.mask = None if mask_words is None else np.ascontiguousarray(mask_words, dtype="<u8")
        self.scale = np.ascontiguousarray(np.ones(self.n, np.float32) if scale is None else scale,
                                          dtype=np.float32)
        self.lam = None if lam is None else np.ascontiguousarray(lam, dtype=np.float32)
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        p = Prepared()
        d = p.d
        d.layout = SIGN if self.mask is None else SIGN_MASK
        d.n, d.k, d.bits = self.n, self.k, 1 if self.mask is None else 2
        d.sign, d.mask = _ptr(self.sign), _ptr(self.mask)
        d.scale, d.lam, d.bias = _ptr(self.scale), _ptr(self.lam), _ptr(self.bias)
        p.words = self.words
        p.sign, p.mask, p.scale, p.lam, p.bias = d.sign, d.mask, d.scale, d.lam, d.bias
        self.prepared = p

    def level(self):
        return self.scale  # one-level layouts ignore lam (spfq_kernels.h)


def _fn(lib, name, isa):
    f = getattr(lib, f"spfq_{name}_{isa}")
    f.restype = None
    f.argtypes = [C.POINTER(Job), C.c_int32, C.c_int32]
    return f


def run(lib, isa, kernel, w: Weights, act, n0=0, n1=None, acc_c=True):
    """Call one range function on rows [n0, n1); returns the whole output (sentinels elsewhere)
    and, for i8, acc_c (or None)."""
    n1 = w.n if n1 is None else n1
    m = act.shape[0]
    job = Job()
    job.w = C.pointer(w.prepared)
    job.m = m
    act = np.ascontiguousarray(act)
    if kernel.endswith("f32"):
        out = np.full((m, w.n), np.nan, np.float32)
        job.x, job.y = _ptr(act), _ptr(out)
        extra = None
    elif kernel.endswith("i8"):
        out = np.full((m, w.n), 0x5A5A5A5A, np.int32)
        extra = np.full((m, w.n), -0x3C3C3C3C, np.int32) if acc_c else None
        job.xq, job.acc_s, job.acc_c = _ptr(act), _ptr(out), _ptr(extra)
    else:
        out = np.full((m, w.n), 0x5A5A5A5A, np.int32)
        job.xbits, job.dot = _ptr(act), _ptr(out)
        extra = None
    _fn(lib, kernel, isa)(C.byref(job), n0, n1)
    return out, extra


# ------------------------------------------------------------------------------ reference

def unpack(words, k):
    """Independent unpack: '<u8' (N, W) -> bool (N, k), bit j = bit j%64 of word j/64."""
    raw = np.ascontiguousarray(words, dtype="<u8").view(np.uint8)
    return np.unpackbits(raw, axis=-1, count=k, bitorder="little").astype(bool)


def signs(w: Weights):
    """s_nk in {-1, 0, +1} as int64 (a sign bit under a zero mask bit is ignored)."""
    s = np.where(unpack(w.sign, w.k), -1, 1).astype(np.int64)
    if w.mask is not None:
        s *= unpack(w.mask, w.k)
    return s


def ref_i8(w, xq):
    return xq.astype(np.int64) @ signs(w).T


def ref_f32(w, x):
    """float64 reference and a float32 summation-order tolerance per output."""
    s = signs(w).astype(np.float64)
    x64 = x.astype(np.float64)
    lv = w.level().astype(np.float64)
    b = np.zeros(w.n) if w.bias is None else w.bias.astype(np.float64)
    y = lv * (x64 @ s.T) + b
    tol = 2e-6 * np.abs(lv) * (np.abs(x64) @ np.abs(s).T) + 1e-6 * np.abs(b) + 1e-30
    return y, tol


def ref_bgemm(w, xbits, k):
    xs = np.where(unpack(xbits, k), -1, 1).astype(np.int64)
    ws = np.where(unpack(w.sign, k), -1, 1).astype(np.int64)
    return xs @ ws.T


def make(rng, n, k, sparsity=None, bias=True, lam=False, stray=False):
    neg = rng.random((n, k)) < 0.5
    mask = None
    if sparsity is not None:
        nz = rng.random((n, k)) >= sparsity
        if not stray:
            neg &= nz
        mask = pack_bits(nz)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return Weights(pack_bits(neg), k, mask, scale,
                   lam=rng.uniform(0.5, 2.0, n).astype(np.float32) if lam else None,
                   bias=rng.normal(size=n).astype(np.float32) if bias else None)


def activations(rng, kernel, m, k):
    if kernel.endswith("f32"):
        return rng.uniform(-1, 1, (m, k)).astype(np.float32)
    if kernel.endswith("i8"):
        return rng.integers(-128, 128, (m, k), dtype=np.int8)
    return pack_bits(rng.random((m, k)) < 0.5)


def reference(kernel, w, act):
    if kernel.endswith("f32"):
        return ref_f32(w, act)
    return ref_i8(w, act) if kernel.endswith("i8") else ref_bgemm(w, act, w.k)


def check(lib, isa, kernel, w, act, n0=0, n1=None, ref=None):
    """Run one range function and compare rows [n0, n1) with the reference (computed here
    unless given); rows outside the range must keep their sentinels."""
    n1 = w.n if n1 is None else n1
    out, extra = run(lib, isa, kernel, w, act, n0, n1)
    rows = slice(n0, n1)
    ref = reference(kernel, w, act) if ref is None else ref
    if kernel.endswith("f32"):
        y, tol = ref
        err = np.abs(out[:, rows].astype(np.float64) - y[:, rows])
        assert np.all(err <= tol[:, rows]), (kernel, isa, float(err.max()))
        outside = np.delete(out, np.arange(n0, n1), axis=1)
        assert np.all(np.isnan(outside))
    else:
        np.testing.assert_array_equal(out[:, rows], ref[:, rows], err_msg=f"{kernel} {isa}")
        outside = np.delete(out, np.arange(n0, n1), axis=1)
        assert np.all(outside == 0x5A5A5A5A)
        if extra is not None:
            np.testing.assert_array_equal(extra[:, rows], ref[:, rows])
            assert np.all(np.delete(extra, np.arange(n0, n1), axis=1) == -0x3C3C3C3C)
    return out


def weights_for(kernel, rng, n, k, **kw):
    return make(rng, n, k, sparsity=0.5 if "mask" in kernel else None, **kw)


# ------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_shapes_against_numpy(lib, isa, kernel, k, n):
    rng = np.random.default_rng([k, n, KERNELS.index(kernel)])
    w = weights_for(kernel, rng, n, k)
    act = activations(rng, kernel, sum(MS), k)  # one reference for all M, sliced per call
    ref = reference(kernel, w, act)
    start = 0
    for m in MS:
        part = slice(start, start + m)
        sub = (ref[0][part], ref[1][part]) if kernel.endswith("f32") else ref[part]
        check(lib, isa, kernel, w, np.ascontiguousarray(act[part]), ref=sub)
        start += m


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n0,n1", [(0, 1), (1, 2), (5, 70), (64, 128), (63, 130), (127, 130),
                                   (7, 7)])
def test_row_range_writes_only_its_rows(lib, isa, kernel, n0, n1):
    rng = np.random.default_rng([n0, n1, KERNELS.index(kernel)])
    w = weights_for(kernel, rng, 130, 300)
    for m in (1, 3, 5):
        check(lib, isa, kernel, w, activations(rng, kernel, m, 300), n0, n1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", ["sign_mask_f32", "sign_mask_i8"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("k", [65, 1000, 4096])
def test_sign_mask_sparsity(lib, isa, kernel, sparsity, k):
    rng = np.random.default_rng([k, int(sparsity * 100)])
    w = make(rng, 67, k, sparsity=sparsity)
    for m in (1, 4, 7):
        out = check(lib, isa, kernel, w, activations(rng, kernel, m, k))
        if sparsity == 1.0:
            expect = 0 if kernel.endswith("i8") else np.broadcast_to(w.bias, out.shape)
            np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", ["sign_mask_f32", "sign_mask_i8"])
def test_sign_bit_under_zero_mask_is_ignored(lib, isa, kernel):
    rng = np.random.default_rng(7)
    w = make(rng, 65, 777, sparsity=0.6, stray=True)
    assert np.any(unpack(w.sign, 777) & ~unpack(w.mask, 777))
    for m in (1, 5):
        check(lib, isa, kernel, w, activations(rng, kernel, m, 777))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_bit_order_one_hot(lib, isa, kernel):
    """Hand-built words (no packer): row n has only column (37 n) % K set (negative / nonzero),
    so the output picks single activations and pins the bit order."""
    k, n = 200, 50
    cols = (37 * np.arange(n)) % k
    words = np.zeros((n, words_for(k)), dtype="<u8")
    for r, c in enumerate(cols):
        words[r, c // 64] |= np.uint64(1) << np.uint64(c % 64)
    mask = words.copy() if "mask" in kernel else None
    w = Weights(words, k, mask)
    rng = np.random.default_rng(3)
    act = activations(rng, kernel, 3, k)
    out = check(lib, isa, kernel, w, act)
    if kernel == "sign_mask_i8":
        np.testing.assert_array_equal(out, -act[:, cols].astype(np.int32))
    elif kernel == "sign_i8":
        np.testing.assert_array_equal(out, act.astype(np.int64).sum(1, keepdims=True)
                                      - 2 * act[:, cols].astype(np.int64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", ["sign_i8", "sign_mask_i8"])
@pytest.mark.parametrize("k", [4096, 11008, 64 * 63 + 5])
def test_i8_extremes_do_not_overflow(lib, isa, kernel, k):
    """All-equal signs and activations at -128 / +127 make every partial sum extreme."""
    n = 6
    neg = np.zeros((n, k), bool)
    neg[1] = neg[3] = neg[5] = True
    nz = np.ones((n, k), bool)
    w = Weights(pack_bits(neg), k, pack_bits(nz) if "mask" in kernel else None)
    act = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8),
                    np.where(np.arange(k) % 2, 127, -128).astype(np.int8)])
    out = check(lib, isa, kernel, w, act)  # M = 3: the 1-weight-row x 4-activation-row tiles
    assert out[0, 0] == -128 * k and out[0, 1] == 128 * k and out[1, 0] == 127 * k
    for row in act:  # M = 1: the 4-weight-row x 1-activation-row tiles
        check(lib, isa, kernel, w, row[None].copy())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", ["sign_f32", "sign_mask_f32"])
@pytest.mark.parametrize("bias,lam", [(False, False), (True, False), (True, True)])
def test_f32_epilogue_scale_lam_bias(lib, isa, kernel, bias, lam):
    rng = np.random.default_rng([bias, lam])
    w = weights_for(kernel, rng, 33, 500, bias=bias, lam=lam)
    check(lib, isa, kernel, w, activations(rng, kernel, 4, 500))


@pytest.mark.parametrize("isa", ISAS)
def test_i8_acc_c_null_is_allowed(lib, isa):
    rng = np.random.default_rng(11)
    for kernel in ("sign_i8", "sign_mask_i8"):
        w = weights_for(kernel, rng, 70, 999)
        x = activations(rng, kernel, 5, 999)
        out, extra = run(lib, isa, kernel, w, x, acc_c=False)
        assert extra is None
        np.testing.assert_array_equal(out, ref_i8(w, x))


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 CPU")
@pytest.mark.parametrize("kernel", KERNELS)
def test_avx2_matches_c_oracle(lib, kernel):
    rng = np.random.default_rng(KERNELS.index(kernel))
    for n, k, m in [(97, 3000, 1), (64, 129, 6), (5, 11008, 3)]:
        w = weights_for(kernel, rng, n, k)
        act = activations(rng, kernel, m, k)
        c, _ = run(lib, "c", kernel, w, act)
        a, _ = run(lib, "avx2", kernel, w, act)
        if kernel.endswith("f32"):
            _, tol = ref_f32(w, act)
            assert np.all(np.abs(c.astype(np.float64) - a) <= 2 * tol)
        else:
            np.testing.assert_array_equal(a, c)


# ------------------------------------------------------------------------------ real layers

def _real_weight(which):
    if which == "minilm":  # the example packages are installed by make test
        from examples import minilm
        return minilm.build().state_dict()["layers.0.attn.q.weight"].numpy()
    from examples import mnist_cnn
    return mnist_cnn.build().state_dict()["classifier.0.weight"].numpy()


@pytest.fixture(scope="module", params=["minilm", "mnist"])
def real_layer(request):
    return request.param, _real_weight(request.param)


@pytest.mark.parametrize("isa", ISAS)
def test_real_layer_binarised(lib, isa, real_layer):
    """A real weight binarised (sign bits, scale = mean |w| per row) and ternarised (|w| below
    0.7 mean |w| dropped): every kernel against numpy, and the f32 path against torch's
    F.linear on the dequantised weights."""
    import torch
    name, wt = real_layer
    n, k = wt.shape
    rng = np.random.default_rng(0)
    absw = np.abs(wt)
    scale = absw.mean(1).astype(np.float32)
    bias = rng.normal(scale=0.1, size=n).astype(np.float32)
    binw = Weights(pack_bits(wt < 0), k, None, scale, bias=bias)
    keep = absw >= 0.7 * absw.mean(1, keepdims=True)
    ternw = Weights(pack_bits((wt < 0) & keep), k, pack_bits(keep), scale, bias=bias)
    assert 0.2 < 1 - keep.mean() < 0.8
    for w, f32, i8 in [(binw, "sign_f32", "sign_i8"), (ternw, "sign_mask_f32", "sign_mask_i8")]:
        x = rng.normal(size=(8, k)).astype(np.float32)
        y = check(lib, isa, f32, w, x)
        deq = torch.from_numpy((signs(w) * scale[:, None]).astype(np.float32))
        yt = torch.nn.functional.linear(torch.from_numpy(x), deq, torch.from_numpy(bias)).numpy()
        _, tol = ref_f32(w, x)
        assert np.all(np.abs(y - yt) <= 2 * tol), (name, f32)
        xq = rng.integers(-127, 128, (8, k), dtype=np.int8)
        check(lib, isa, i8, w, xq)
    xb = pack_bits(rng.normal(size=(8, k)) < 0)
    check(lib, isa, "bgemm", binw, xb)
