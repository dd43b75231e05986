"""Unit properties of the compression core (SPFQ.md): the rounding operators T, the Gram form of
the path-following recurrence, order-r alignment, the error formula, sparsity and scale
searches, seeds, the headline SPFQ/GPFQ-beat-RTN property, and the float16 scales.

Every check compares against an independent reference (explicit level lists, a literal
data-form recurrence written here, torch.linalg.lstsq, numpy float16, direct norms) with exact
or tight tolerances. Small float64 problems keep the whole file fast.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from spfq_deploy.compress.alphabet import Alphabet, fp16_round, make_alphabet, quantize
from spfq_deploy.compress.config import CompressConfig
from spfq_deploy.compress.layer import Grams, compress_weights
from spfq_deploy.compress.path_following import (
    align,
    gram_path_following,
    quantizing_step,
    recurrence,
    squared_output_error,
)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def t(*v):
    return torch.tensor(v, dtype=DT)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def correlated(m, d, seed, k=None):
    """X = relu(Z @ A) with a decaying spectrum: correlated, positive, m rows."""
    g = gen(seed)
    k = k or d
    Z = torch.randn(m, k, generator=g, dtype=DT)
    A = (0.8 ** torch.arange(k, dtype=DT))[:, None] * torch.randn(k, d, generator=g, dtype=DT)
    return torch.relu(Z @ A)


def grams_of(X, Xt):
    """Grams (1, d, d) for a single-group layer from data (m, d)."""
    return Grams((Xt.T @ X)[None], (Xt.T @ Xt)[None], (X.T @ X)[None], X.shape[0])


def rel_out_err(W, Q, X, Xt):
    """||X W^T - Xt Q^T||_F / ||X W^T||_F for W, Q (n, d)."""
    Y = X @ W.T
    return float((Y - Xt @ Q.T).norm() / Y.norm())


# ------------------------------------------------------------------ 1. operators T

def levels_of(alph: Alphabet) -> np.ndarray:
    """All alphabet values, written out from SPFQ.md (not from Alphabet.values)."""
    lam, delta = float(alph.lam.reshape(-1)[0]), float(alph.delta.reshape(-1)[0])
    if alph.alphabet == "binary" and not alph.pruned:
        return np.array([-lam, lam])
    K = 1 if alph.alphabet in ("binary", "ternary") else 2 ** (alph.bits - 1) - 1
    mags = [lam + j * delta for j in range(K)]
    return np.array(sorted([-m for m in mags] + [0.0] + mags))


def _alph(name, bits, delta, lam=None, pruned=False):
    lam = delta if lam is None else lam
    return Alphabet(name, bits, t(delta), t(lam), pruned)


ALPHABETS = {
    "binary": _alph("binary", 1, 0.375),
    "ternary": _alph("ternary", 2, 0.5),
    "int2": _alph("int", 2, 0.3),
    "int3": _alph("int", 3, 0.125),
    "int4": _alph("int", 4, 0.1),
    "int8": _alph("int", 8, 0.01),
    "pruned_int4": _alph("int", 4, 0.125, lam=0.3125, pruned=True),
    "pruned_int4_nondyadic": _alph("int", 4, 0.1, lam=0.37, pruned=True),
    "pruned_int4_small_lam": _alph("int", 4, 0.2, lam=0.05, pruned=True),
    "pruned_binary": _alph("binary", 1, 0.4, lam=0.4, pruned=True),
}


def sweep_points(levels, seed):
    """Points inside the range: every level (all of them, or a sample for 8-bit), midpoints,
    random points, points between 0 and the first nonzero magnitude, and the ends."""
    rng = np.random.default_rng(seed)
    lo, hi = levels[0], levels[-1]
    lv = levels if len(levels) <= 16 else levels[rng.choice(len(levels), 12, replace=False)]
    mids = (levels[:-1] + levels[1:]) / 2
    mids = mids if len(mids) <= 16 else mids[rng.choice(len(mids), 8, replace=False)]
    pos = levels[levels > 0]
    inner = np.array([0.1, 0.37, 0.5, 0.83]) * pos[0] if 0.0 in levels else np.array([])
    rand = rng.uniform(lo, hi, 10)
    return np.concatenate([lv, mids, inner, -inner, rand, [lo, hi]])


@pytest.mark.parametrize("name", list(ALPHABETS))
def test_stochastic_operator_is_unbiased_and_picks_adjacent_levels(name):
    alph = ALPHABETS[name]
    levels = levels_of(alph)
    z = torch.tensor(sweep_points(levels, 1), dtype=DT)
    M = 20000
    u = torch.rand((M, z.numel()), generator=gen(7), dtype=DT)
    codes = quantize(z.expand(M, -1), alph, True, u)
    assert codes.dtype == torch.int8
    vals = alph.values(codes).numpy()
    mean = vals.mean(0)
    for j, zj in enumerate(z.tolist()):
        # bracketing levels from the explicit list
        i = int(np.searchsorted(levels, zj, side="right")) - 1
        i = min(max(i, 0), len(levels) - 2)
        a, b = levels[i], levels[i + 1]
        on_level = np.isclose(zj, levels, rtol=0, atol=1e-12).any()
        col = vals[:, j]
        if on_level:  # exactly on a level: no randomness at all
            lv = levels[np.argmin(np.abs(levels - zj))]
            np.testing.assert_allclose(col, lv, rtol=0, atol=1e-12, err_msg=f"z={zj}")
            continue
        # only the two adjacent levels are ever chosen
        assert np.all(np.isclose(col, a, atol=1e-12) | np.isclose(col, b, atol=1e-12)), f"z={zj}"
        se = math.sqrt((b - zj) * (zj - a) / M)  # exact Bernoulli standard error
        assert abs(mean[j] - zj) <= 5 * se + 1e-12, f"{name}: z={zj} mean={mean[j]} se={se}"


@pytest.mark.parametrize("name", list(ALPHABETS))
@pytest.mark.parametrize("stochastic", [True, False])
def test_operator_clips_outside_range(name, stochastic):
    alph = ALPHABETS[name]
    top = levels_of(alph)[-1]
    z = t(top * (1 + 1e-9), top * 1.5, top * 40, -top * (1 + 1e-9), -top * 1.5, -top * 40)
    M = 500
    u = torch.rand((M, z.numel()), generator=gen(3), dtype=DT)
    vals = alph.values(quantize(z.expand(M, -1), alph, stochastic, u))
    expect = torch.sign(z) * top
    torch.testing.assert_close(vals, expect.expand(M, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(ALPHABETS))
def test_deterministic_operator_is_nearest_level(name):
    alph = ALPHABETS[name]
    levels = levels_of(alph)
    rng = np.random.default_rng(11)
    z = np.concatenate([rng.uniform(-1.3, 1.3, 400) * levels[-1], levels])
    vals = alph.values(quantize(torch.tensor(z, dtype=DT), alph, False)).numpy()
    nearest = levels[np.argmin(np.abs(z[:, None] - levels[None, :]), axis=1)]
    np.testing.assert_allclose(vals, nearest, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["pruned_int4", "pruned_int4_nondyadic", "pruned_int4_small_lam",
                                  "pruned_binary"])
def test_pruned_deterministic_zero_below_half_lambda(name):
    alph = ALPHABETS[name]
    lam = float(alph.lam[0])
    below = np.array([0.0, 1e-9, 0.2, 0.49, 0.4999999]) * lam
    above = np.array([0.5000001, 0.51, 0.9, 0.99]) * lam
    zb = torch.tensor(np.concatenate([below, -below]), dtype=DT)
    za = torch.tensor(np.concatenate([above, -above]), dtype=DT)
    assert torch.all(quantize(zb, alph, False) == 0)
    ca = quantize(za, alph, False)
    assert torch.all(ca.abs() == 1) and torch.all(torch.sign(ca.double()) == torch.sign(za))
    torch.testing.assert_close(alph.values(ca), torch.sign(za) * lam, rtol=0, atol=0)


def test_binary_deterministic_is_sign():
    alph = ALPHABETS["binary"]
    z = t(-2.0, -0.1, -1e-12, 0.0, 1e-12, 0.2, 5.0)
    assert quantize(z, alph, False).tolist() == [-1, -1, -1, 1, 1, 1, 1]
    assert set(quantize(z, alph, True, torch.rand(7, generator=gen(0), dtype=DT)).tolist()) <= {-1, 1}


# ------------------------------------------------------------------ 2. Gram form == data form

def data_form(W, X, Xt, T):
    """SPFQ.md's recurrence, literally, for every group and neuron: returns Q and the final U."""
    g, n, d = W.shape
    U = torch.zeros(g, n, X.shape[1], dtype=DT)
    Q = torch.zeros_like(W)
    for s in range(d):
        U += W[:, :, s, None] * X[:, None, :, s]
        xt = Xt[:, :, s]  # (g, m)
        nrm = (xt * xt).sum(-1)  # (g,)
        z = torch.einsum("gnm,gm->gn", U, xt)
        z = torch.where(nrm[:, None] > 0, z / torch.where(nrm > 0, nrm, 1.0)[:, None], 0.0)
        Q[:, :, s] = T(z, s)
        U -= Q[:, :, s, None] * Xt[:, None, :, s]
    return Q, U


def _gram_case(seed=0, g=2, n=5, d=37, m=50):
    gg = gen(seed)
    W = torch.randn(g, n, d, generator=gg, dtype=DT)
    X = torch.randn(g, m, d, generator=gg, dtype=DT)
    Xt = X + 0.2 * torch.randn(g, m, d, generator=gg, dtype=DT)
    Xt[:, :, 11] = 0.0  # an all-zero column of Xt: z_t = 0 there
    Xt[1, :, 30] = 0.0
    G = Xt.transpose(-1, -2) @ X
    H = Xt.transpose(-1, -2) @ Xt
    U = torch.rand(W.shape, generator=gg, dtype=DT)
    return W, X, Xt, G, H, U


def _quantizer(alph, stochastic, U):
    if stochastic:
        return lambda z, s: quantize(z, alph, True, U[..., s])
    return lambda z, s: quantize(z, alph, False)


@pytest.mark.parametrize("alphabet,bits,sparsity", [("int", 3, 0.0), ("int", 4, 0.3), ("binary", 1, 0.0),
                                                    ("ternary", 2, 0.0)])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("block", [1, 8, 128])
def test_gram_form_matches_data_form(alphabet, bits, sparsity, stochastic, block):
    W, X, Xt, G, H, U = _gram_case()
    alph = make_alphabet(alphabet, bits, W, 0.8, sparsity=sparsity)
    quant = _quantizer(alph, stochastic, U)

    ref_codes = torch.zeros(W.shape, dtype=torch.int8)
    Qref, Uend = data_form(W, X, Xt, quantizing_step(quant, alph.values, ref_codes))
    # u_d = X w - Xt q
    torch.testing.assert_close(Uend, (X @ W.transpose(-1, -2) - Xt @ Qref.transpose(-1, -2)).transpose(-1, -2),
                               rtol=0, atol=1e-9)

    codes = torch.zeros(W.shape, dtype=torch.int8)
    Q = gram_path_following(W, G, H, quantizing_step(quant, alph.values, codes), block)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(Q, Qref, rtol=0, atol=1e-9)
    torch.testing.assert_close(Q, alph.values(codes), rtol=0, atol=0)

    # the project's own data-form reference agrees too
    codes2 = torch.zeros(W.shape, dtype=torch.int8)
    Q2 = recurrence(W, X, Xt, quantizing_step(quant, alph.values, codes2))
    assert torch.equal(codes2, ref_codes)
    torch.testing.assert_close(Q2, Qref, rtol=0, atol=1e-9)

    # zero columns of Xt: z = 0 there, so the code is the one of T(0)
    zero_code = quant(torch.zeros(W.shape[:-1], dtype=DT), 11)
    assert torch.equal(codes[..., 11], zero_code)
    assert torch.equal(codes[1, :, 30], quant(torch.zeros(W.shape[:-1], dtype=DT), 30)[1])
    if alph.has_zero:
        assert torch.all(codes[..., 11] == 0)


@pytest.mark.parametrize("block", [1, 8, 128])
def test_gram_form_identity_step_matches_data_form(block):
    W, X, Xt, G, H, _ = _gram_case(seed=5)
    Qref, _ = data_form(W, X, Xt, lambda z, s: z)
    Q = gram_path_following(W, G, H, lambda z, s: z, block)
    torch.testing.assert_close(Q, Qref, rtol=0, atol=1e-9)


# ------------------------------------------------------------------ 3. r = 1 two-phase == fused

@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("alphabet,bits", [("int", 4), ("binary", 1)])
def test_order_one_two_phase_equals_fused(stochastic, alphabet, bits):
    W, X, Xt, G, H, U = _gram_case(seed=2)
    alph = make_alphabet(alphabet, bits, W, 0.9)
    quant = _quantizer(alph, stochastic, U)

    Wt = align(W, G, H, 1)
    # pass 1 alone is the identity recurrence, in data form
    Wt_ref, _ = data_form(W, X, Xt, lambda z, s: z)
    torch.testing.assert_close(Wt, Wt_ref, rtol=0, atol=1e-9)

    fused = torch.zeros(W.shape, dtype=torch.int8)
    Qf = gram_path_following(W, G, H, quantizing_step(quant, alph.values, fused))
    two = torch.zeros(W.shape, dtype=torch.int8)
    Q2 = gram_path_following(Wt, H, H, quantizing_step(quant, alph.values, two))
    assert torch.equal(fused, two)
    torch.testing.assert_close(Qf, Q2, rtol=0, atol=0)


def test_order_one_engine_is_fused_path():
    """compress_weights(order=1) reports no alignment and equals the fused recurrence."""
    X = correlated(120, 24, seed=3)
    Xt = X + 0.05 * torch.randn(X.shape, generator=gen(4), dtype=DT)
    W = torch.randn(1, 6, 24, generator=gen(5), dtype=DT)
    cfg = CompressConfig(bits=4, method="gpfq", c_grid=(1.0,))
    res = compress_weights(W, grams_of(X, Xt), cfg, 0)
    assert res.align_error is None and res.C == 1.0
    alph = make_alphabet("int", 4, W, 1.0)
    codes = torch.zeros(W.shape, dtype=torch.int8)
    data_form(W, X[None], Xt[None], quantizing_step(lambda z, s: quantize(z, alph, False), alph.values, codes))
    assert torch.equal(res.codes, codes)


# ------------------------------------------------------------------ 4. alignment error vs r

@pytest.mark.parametrize("m,d", [(30, 60), (200, 40)])
def test_alignment_error_falls_with_order(m, d):
    gg = gen(m + d)
    X = torch.randn(m, d, generator=gg, dtype=DT)
    Xt = X + 0.3 * torch.randn(m, d, generator=gg, dtype=DT)
    W = torch.randn(1, 8, d, generator=gg, dtype=DT)
    G, H = (Xt.T @ X)[None], (Xt.T @ Xt)[None]
    Y = X @ W[0].T
    errs = {r: float((Y - Xt @ align(W, G, H, r)[0].T).norm() / Y.norm()) for r in (1, 2, 5, 50)}
    assert errs[1] > errs[2] > errs[5] > errs[50], errs
    ls = torch.linalg.lstsq(Xt, Y).solution
    err_ls = float((Y - Xt @ ls).norm() / Y.norm())
    assert errs[50] >= err_ls - 1e-12
    if m < d:  # consistent system: least squares is exact, the sweeps converge to it
        assert err_ls < 1e-10 and errs[50] < 1e-6
        assert errs[5] < 0.1 * errs[1]
    else:  # overdetermined: r = 50 is the least-squares residual
        assert errs[50] == pytest.approx(err_ls, rel=1e-6)
    # squared_output_error agrees with the direct residual of the aligned weights
    Wt = align(W, G, H, 5)
    err, ref = squared_output_error(W, Wt, (X.T @ X)[None], G, H)
    assert math.sqrt(float(err.sum() / ref.sum())) == pytest.approx(errs[5], rel=1e-8)


def test_engine_reports_alignment_error():
    X = torch.randn(60, 30, generator=gen(8), dtype=DT)
    Xt = X + 0.3 * torch.randn(60, 30, generator=gen(9), dtype=DT)
    W = torch.randn(1, 5, 30, generator=gen(10), dtype=DT)
    gr = grams_of(X, Xt)
    errs = []
    for r in (2, 5):
        res = compress_weights(W, gr, CompressConfig(bits=4, method="gpfq", order=r), 0)
        direct = rel_out_err(W[0], align(W, gr.G, gr.H, r)[0], X, Xt)
        assert res.align_error == pytest.approx(direct, rel=1e-8)
        errs.append(res.align_error)
    assert errs[0] > errs[1]


# ------------------------------------------------------------------ 5. error formula

def test_squared_output_error_equals_direct():
    gg = gen(12)
    X = torch.randn(2, 40, 17, generator=gg, dtype=DT)
    Xt = X + 0.5 * torch.randn(2, 40, 17, generator=gg, dtype=DT)
    W = torch.randn(2, 6, 17, generator=gg, dtype=DT)
    Q = torch.randn(2, 6, 17, generator=gg, dtype=DT)
    F = X.transpose(-1, -2) @ X
    G = Xt.transpose(-1, -2) @ X
    H = Xt.transpose(-1, -2) @ Xt
    err, ref = squared_output_error(W, Q, F, G, H)
    direct = ((X @ W.transpose(-1, -2) - Xt @ Q.transpose(-1, -2)) ** 2).sum(-2)  # per neuron
    torch.testing.assert_close(err, direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref, ((X @ W.transpose(-1, -2)) ** 2).sum(-2), rtol=1e-10, atol=1e-10)
    err0, _ = squared_output_error(W, W, F, F, F)  # q = w, Xt = X: no error
    assert float(err0.abs().max()) < 1e-9


def test_reported_rel_error_is_the_direct_output_error():
    X = correlated(150, 32, seed=13)
    Xt = X + 0.05 * torch.randn(X.shape, generator=gen(14), dtype=DT)
    W = torch.randn(1, 8, 32, generator=gen(15), dtype=DT)
    for method in ("spfq", "gpfq", "rtn"):
        res = compress_weights(W, grams_of(X, Xt), CompressConfig(bits=3, method=method), 1)
        torch.testing.assert_close(res.Q, res.alphabet.values(res.codes), rtol=0, atol=0)
        assert res.rel_error == pytest.approx(rel_out_err(W[0], res.Q[0], X, Xt), rel=1e-8)


# ------------------------------------------------------------------ 6. sparsity reached

@pytest.fixture(scope="module")
def corr_layer():
    X = correlated(300, 48, seed=21)
    W = torch.randn(1, 16, 48, generator=gen(22), dtype=DT)
    return W, X, grams_of(X, X)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("bits", [4, 1])
@pytest.mark.parametrize("method", ["spfq", "gpfq", "rtn"])
def test_requested_sparsity_is_reached(corr_layer, sparsity, bits, method):
    W, X, gr = corr_layer
    res = compress_weights(W, gr, CompressConfig(bits=bits, method=method, sparsity=sparsity), 3)
    realised = float((res.codes == 0).double().mean())
    assert abs(realised - sparsity) <= 0.01, (realised, sparsity)
    assert res.sparsity == pytest.approx(realised, abs=1e-6)
    K = 1 if bits == 1 else 7
    assert int(res.codes.abs().max()) <= K
    assert res.alphabet.pruned and res.alphabet.has_zero
    # the values are the pruned alphabet's: 0 or +-(lam + j delta)
    lam = res.alphabet.lam[..., None].expand_as(W)
    delta = res.alphabet.delta[..., None].expand_as(W)
    mag = res.codes.abs().double()
    expect = torch.sign(res.codes.double()) * (lam + (mag - 1).clamp_min(0) * delta)
    torch.testing.assert_close(res.Q, expect, rtol=0, atol=0)
    if bits == 1:
        torch.testing.assert_close(res.alphabet.delta, res.alphabet.lam, rtol=0, atol=0)


# ------------------------------------------------------------------ 7. seeds

@pytest.mark.parametrize("method", ["spfq", "gpfq", "rtn"])
@pytest.mark.parametrize("bits", [4, 1])
def test_seed_determinism(corr_layer, method, bits):
    W, X, gr = corr_layer
    cfg = CompressConfig(bits=bits, method=method)
    a = compress_weights(W, gr, cfg, 123)
    b = compress_weights(W, gr, cfg, 123)
    assert torch.equal(a.codes, b.codes)
    assert a.codes.numpy().tobytes() == b.codes.numpy().tobytes()
    assert torch.equal(a.Q, b.Q) and a.C == b.C and a.rel_error == b.rel_error
    c = compress_weights(W, gr, cfg, 124)
    if method == "spfq":
        assert not torch.equal(a.codes, c.codes)
    else:
        assert torch.equal(a.codes, c.codes)


# ------------------------------------------------------------------ 8. C search

@pytest.mark.parametrize("bits", [4, 2, "ternary", 1])
@pytest.mark.parametrize("method", ["spfq", "gpfq", "rtn"])
def test_c_search_is_an_argmin_over_the_grid(corr_layer, bits, method):
    W, X, gr = corr_layer
    cfg = CompressConfig(bits=bits, method=method)
    res = compress_weights(W, gr, cfg, 5)
    K = 1 if bits in (1, "ternary") else 2 ** (bits - 1) - 1
    grid = cfg.default_grid(K)
    per_point = {}
    for C in grid:
        r = compress_weights(W, gr, CompressConfig(bits=bits, method=method, c_grid=(C,)), 5)
        assert r.C == C
        per_point[C] = r.rel_error
    assert res.rel_error <= min(per_point.values()) * (1 + 1e-9) + 1e-15, (res.C, res.rel_error, per_point)
    # the chosen C is a grid point or a geometric midpoint of two neighbours
    mids = [math.sqrt(a * b) for a, b in zip(grid, grid[1:])]
    assert any(abs(res.C - c) < 1e-12 for c in list(grid) + mids)
    # and its reported error is the error of that C
    again = compress_weights(W, gr, CompressConfig(bits=bits, method=method, c_grid=(res.C,)), 5)
    assert again.rel_error == pytest.approx(res.rel_error, rel=1e-9)
    assert torch.equal(again.codes, res.codes)


def test_binary_grid_reaches_low_scales():
    for bits in (1, "ternary"):
        cfg = CompressConfig(bits=bits)
        grid = cfg.default_grid(1)
        assert min(grid) <= 0.05 + 1e-12
        assert list(grid) == sorted(grid)
    assert CompressConfig(bits=4, c_grid=(0.7, 1.1)).default_grid(7) == (0.7, 1.1)


def test_binary_scale_is_chosen_far_below_max():
    """On white data the best binary scale is near mean|w| (XNOR-Net), well below max|w|."""
    X = torch.randn(400, 64, generator=gen(31), dtype=DT)
    W = torch.randn(1, 12, 64, generator=gen(32), dtype=DT)
    res = compress_weights(W, grams_of(X, X), CompressConfig(bits=1, method="rtn"), 0)
    xnor = float((W.abs().mean(-1) / W.abs().amax(-1)).mean())
    assert res.C < 0.5 and abs(res.C - xnor) < 0.15, (res.C, xnor)
    capped = compress_weights(W, grams_of(X, X), CompressConfig(bits=1, method="rtn", c_grid=(0.5, 0.8, 1.2)), 0)
    assert res.rel_error < 0.85 * capped.rel_error


# ------------------------------------------------------------------ 9. headline: SPFQ/GPFQ beat RTN

@pytest.mark.parametrize("bits", [4, 1, 3, "ternary"])
def test_path_following_beats_round_to_nearest(bits):
    X = correlated(400, 48, seed=41)
    W = torch.randn(1, 16, 48, generator=gen(42), dtype=DT)
    gr = grams_of(X, X)
    err = {m: compress_weights(W, gr, CompressConfig(bits=bits, method=m), 0).rel_error
           for m in ("spfq", "gpfq", "rtn")}
    assert err["gpfq"] < 0.9 * err["rtn"], err
    assert err["spfq"] < 0.9 * err["rtn"], err


def test_path_following_beats_rtn_with_perturbed_inputs():
    """Xt != X (earlier layers compressed): path following still wins, RTN cannot adapt."""
    X = correlated(400, 40, seed=43)
    Xt = X + 0.05 * X.std() * torch.randn(X.shape, generator=gen(44), dtype=DT)
    W = torch.randn(1, 10, 40, generator=gen(45), dtype=DT)
    gr = grams_of(X, Xt)
    for bits in (4, 1):
        err = {m: compress_weights(W, gr, CompressConfig(bits=bits, method=m), 0).rel_error
               for m in ("spfq", "gpfq", "rtn")}
        assert max(err["spfq"], err["gpfq"]) < err["rtn"], (bits, err)


# ------------------------------------------------------------------ 10. make_alphabet

def np_f16(x):
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


@pytest.mark.parametrize("alphabet,bits,K", [("int", 4, 7), ("int", 2, 1), ("int", 8, 127), ("binary", 1, 1),
                                             ("ternary", 2, 1)])
def test_make_alphabet_delta_is_fp16_of_c_max_over_k(alphabet, bits, K):
    W = torch.randn(3, 7, 20, generator=gen(51), dtype=DT) * 0.05
    C = 1.3
    a = make_alphabet(alphabet, bits, W, C)
    Wn = W.numpy()
    expect = np_f16(C * np.abs(Wn).max(-1) / K)
    assert a.K == K and a.delta.shape == (3, 7)
    np.testing.assert_array_equal(a.delta.numpy(), expect)
    np.testing.assert_array_equal(a.lam.numpy(), expect)  # unpruned: lam == delta
    assert not a.pruned


def test_make_alphabet_candidate_grid_axis():
    W = torch.randn(2, 4, 10, generator=gen(52), dtype=DT)
    Cs = [0.5, 1.0, 1.7]
    a = make_alphabet("int", 3, W, torch.tensor(Cs, dtype=DT))
    assert a.delta.shape == (3, 2, 4)
    for i, C in enumerate(Cs):
        np.testing.assert_array_equal(a.delta[i].numpy(), np_f16(C * np.abs(W.numpy()).max(-1) / 3))


def test_make_alphabet_per_layer_delta_gives_one_delta():
    W = torch.randn(9, 25, generator=gen(53), dtype=DT)
    a = make_alphabet("int", 4, W, 1.1, per_layer_delta=True)
    expect = np_f16(1.1 * np.abs(W.numpy()).max(-1).mean() / 7)
    assert a.delta.shape == (9,)
    np.testing.assert_array_equal(a.delta.numpy(), np.full(9, expect))


def test_make_alphabet_per_layer_delta_is_per_layer_for_grouped_weights():
    """A grouped conv's weight arrives as (g, n, d); 'one delta per layer' (config.py) must be
    one number for the whole layer, the mean of R_i over all its output channels."""
    W = torch.randn(4, 3, 9, generator=gen(54), dtype=DT) * torch.arange(1, 5, dtype=DT)[:, None, None]
    a = make_alphabet("int", 4, W, 1.0, per_layer_delta=True)
    expect = np_f16(np.abs(W.numpy()).max(-1).mean() / 7)
    np.testing.assert_array_equal(a.delta.numpy(), np.full((4, 3), expect))


@pytest.mark.parametrize("q", [0.5, 0.9, 1.0])
def test_make_alphabet_range_quantile(q):
    d = 20
    W = torch.randn(2, 6, d, generator=gen(55), dtype=DT)
    a = make_alphabet("int", 3, W, 1.0, range_quantile=q)
    A = np.abs(W.numpy())
    R = np.quantile(A, q, axis=-1, method="inverted_cdf")  # q*d is an integer here
    np.testing.assert_array_equal(a.delta.numpy(), np_f16(R / 3))
    if q == 1.0:
        np.testing.assert_array_equal(R, A.max(-1))
    else:
        assert np.all(R < A.max(-1))


def test_make_alphabet_pruned_lambda_is_sparsity_quantile():
    d = 40
    W = torch.randn(1, 5, d, generator=gen(56), dtype=DT)
    A = np.abs(W.numpy())
    q = np.sort(A, axis=-1)[..., int(round(0.25 * d)) - 1]
    a = make_alphabet("int", 4, W, 1.0, sparsity=0.25, lam_factor=1.5)
    np.testing.assert_array_equal(a.lam.numpy(), np_f16(1.5 * q))
    np.testing.assert_array_equal(a.delta.numpy(), np_f16(A.max(-1) / 7))
    b = make_alphabet("binary", 1, W, 1.0, sparsity=0.25, lam_factor=1.5)
    np.testing.assert_array_equal(b.lam.numpy(), np_f16(1.5 * q))
    np.testing.assert_array_equal(b.delta.numpy(), b.lam.numpy())  # single level is lam itself
    assert a.pruned and b.pruned and b.has_zero


def test_fp16_round_is_nearest_float16():
    """fp16_round must give the float16 nearest to a float64 value. Going float64 -> float32 ->
    float16 rounds twice and misses by one float16 step just below a float16 midpoint."""
    # 1 + 2^-10 + 2^-11 is the midpoint between 1 + 2^-10 and 1 + 2^-9; just below it
    v = 1.0 + 2.0 ** -10 + 2.0 ** -11 - 2.0 ** -40
    nearest = 1.0 + 2.0 ** -10
    assert abs(Fraction(v) - Fraction(nearest)) < abs(Fraction(v) - Fraction(1.0 + 2.0 ** -9))
    assert float(np.float16(v)) == nearest
    assert float(fp16_round(torch.tensor([v], dtype=DT))[0]) == nearest
    # the same case through make_alphabet: binary, C = 1, K = 1 -> delta = fp16(max|w|)
    W = torch.tensor([[[v, -0.5, 0.25]]], dtype=DT)
    assert float(make_alphabet("binary", 1, W, 1.0).delta.reshape(-1)[0]) == nearest

