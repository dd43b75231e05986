"""spfq_quantize_i8 (kernels/src/quant.c) through the ctypes binding, bit-exact against an
independent numpy reference of the header's formula, for every ISA this CPU has:
amax = max|x|; below 2^-100 xscale = 0 and xq = 0; else xscale = amax / 127, r = 127 / amax
(float32 divisions) and xq = float32(x * r) rounded to nearest, ties to even, clamped to
[-127, 127]. Rows with a NaN or an infinity (outside the reference's formula) must match the
portable C version bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from spfq_deploy import kernels as K

ISAS = [i for i in ("c", "avx2", "avx512", "amx", "neon") if K.lib().spfq_set_isa(i.encode()) == 0]
K.set_isa("auto")
MS = (0, 1, 3, 64)
KS = (1, 7, 8, 31, 32, 33, 384, 1536, 4097)
F32 = np.float32


@pytest.fixture(params=ISAS)
def isa(request):
    K.set_isa(request.param)
    yield request.param
    K.set_isa("auto")


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(x).max(axis=1, initial=F32(0)).astype(F32)
    ok = amax >= F32(2.0 ** -100)
    with np.errstate(divide="ignore", over="ignore"):  # 127 / amax of the rows where ok is False
        s = np.where(ok, amax / F32(127), F32(0)).astype(F32)
        r = np.where(ok, F32(127) / amax, F32(0)).astype(F32)
    t = (x * r[:, None]).astype(F32)
    q = np.clip(np.rint(t), -127, 127)  # rint: to nearest, ties to even
    return q.astype(np.int8), s


def check(x: np.ndarray) -> None:
    xq, s = K.quantize_i8(np.ascontiguousarray(x, dtype=F32))
    rq, rs = reference(x)
    assert xq.shape == x.shape and s.shape == (x.shape[0],)
    np.testing.assert_array_equal(s.view(np.uint32), rs.view(np.uint32))
    bad = np.nonzero(xq != rq)
    assert not bad[0].size, (f"{K.isa()} {x.shape}: first mismatches at {list(zip(*bad))[:5]}: "
                             f"x {x[bad][:5]} got {xq[bad][:5]} want {rq[bad][:5]}")


def ties_row(rng, k: int) -> np.ndarray:
    """Values whose product x * r is exactly j + 0.5 (and their float neighbours): r = 127 /
    amax a power of two, so every product below is exact."""
    e = int(rng.integers(-30, 30))
    r = F32(np.ldexp(1.0, e))
    amax = F32(127) / r  # exact, and 127 / amax == r
    assert F32(127) / amax == r
    j = rng.integers(-127, 127, k).astype(np.float64) + 0.5
    x = (j / float(r)).astype(F32)
    assert np.array_equal(x.astype(np.float64) * float(r), j)
    pick = rng.random(k)
    x = np.where(pick < 0.15, np.nextafter(x, F32(np.inf)), x)
    x = np.where(pick > 0.85, np.nextafter(x, F32(-np.inf)), x)
    x[rng.integers(0, k)] = amax if rng.random() < 0.5 else -amax
    return x.astype(F32)


def rows(kind: str, m: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (rng.standard_normal((m, k)) * np.exp(rng.uniform(-20, 20, (m, 1)))).astype(F32)
    if kind == "ties":
        return np.stack([ties_row(rng, k) for _ in range(m)]) if m else np.zeros((0, k), F32)
    if kind == "special":
        x = rng.standard_normal((m, k)).astype(F32)
        vals = np.array([0.0, -0.0, 1e-45, -1e-45, 1.2e-38, -3e-39, 0.5, -1.5, 2.5], F32)
        x[rng.random((m, k)) < 0.3] = F32(0)
        sel = rng.random((m, k)) < 0.3
        x[sel] = rng.choice(vals, int(sel.sum()))
        if m > 1:
            x[1] = -0.0  # a row of negative zeros
        if m > 2:
            x[2] = 0.0
        return x
    if kind == "near":  # products within an ulp or two of half-integers, for arbitrary scales
        s = np.exp(rng.uniform(-20, 20, (m, 1)))
        x = ((rng.integers(-127, 127, (m, k)) + 0.5) * s).astype(F32)
        if k:
            x[:, 0] = (127 * s[:, 0]).astype(F32)
        return x
    if kind == "denormal":
        return (rng.integers(-300, 301, (m, k)).astype(np.float64) * 2.0 ** -149).astype(F32)
    if kind == "huge":
        x = (rng.uniform(-1, 1, (m, k)) * 3.4e38).astype(F32)
        if m and k > 1:
            x[0, 0], x[0, -1] = F32(3.4028235e38), F32(-3.4028235e38)
        return x
    raise ValueError(kind)


KINDS = ("random", "ties", "near", "special", "denormal", "huge")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_quantize_i8_matches_reference(isa, kind, m, k):
    check(rows(kind, m, k, seed=100 * KS.index(k) + 10 * MS.index(m) + KINDS.index(kind)))


def test_ties_round_to_even(isa):
    """Exact halves of x * r (r = 1 here): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0; just below a
    half rounds down."""
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.0, -0.0,
                   np.nextafter(F32(0.5), F32(0)), np.nextafter(F32(-2.5), F32(0)), 0.49999997]], F32)
    xq, s = K.quantize_i8(x)
    assert s[0] == F32(1)
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 0, 0, 0, -2, 0]]
    check(x)


def test_tiny_rows_quantise_to_zero(isa):
    """A row whose max |x| is below 2^-100 (127 / amax could overflow) has xscale 0 and codes 0;
    at 2^-100 it is quantised."""
    x = np.array([[2.0 ** -101, -2.0 ** -102, 0.0], [2.0 ** -100, -(2.0 ** -101), 0.0]], F32)
    xq, s = K.quantize_i8(x)
    assert s[0] == 0 and xq[0].tolist() == [0, 0, 0]
    assert s[1] > 0 and xq[1].tolist() == [127, -64, 0]
    check(x)


@pytest.mark.parametrize("k", [1, 7, 17, 33, 384, 4097])
def test_nonfinite_rows_match_portable_c(isa, k):
    """NaN (quiet and signalling) and +-inf: outside the reference formula, so each ISA must
    give exactly what the portable C version gives."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((8, k)).astype(F32)
    snan = np.array([0x7FA00000, 0xFFA00001], np.uint32).view(F32)
    specials = np.concatenate([np.array([np.nan, -np.nan, np.inf, -np.inf], F32), snan])
    for r in range(8):
        n = int(rng.integers(1, max(2, k // 3) + 1))
        x[r, rng.integers(0, k, n)] = rng.choice(specials[: 2 + r % 5], n)
    x[7, :] = np.inf
    xq, s = K.quantize_i8(x)
    K.set_isa("c")
    try:
        cq, cs = K.quantize_i8(x)
    finally:
        K.set_isa(isa)
    np.testing.assert_array_equal(xq, cq)
    np.testing.assert_array_equal(s.view(np.uint32), cs.view(np.uint32))


def test_rejects_bad_shapes():
    with pytest.raises(K.KernelError):
        K.quantize_i8(np.zeros((2, 0), F32))
    with pytest.raises(K.KernelError):
        K.quantize_i8(np.zeros(4, F32))
