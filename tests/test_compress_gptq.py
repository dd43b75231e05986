"""GPTQ (compress/gptq.py, --method gptq) against GPTQ as published, written out here: the
reference code's Hessian preparation (dead columns, act-order, damping), the Cholesky factor of
the inverse Hessian, and its column loop unblocked in float64, rounding to the nearest element
of an explicit level list. The engine's codes must equal the reference's bit for bit (a tie
between two levels, measure zero on this data, is where the two roundings could differ).
Also: damping guards zero columns, GPTQ beats round to nearest on the layer output error,
pruning reaches its sparsity with the threshold operator inside the column loop, the mse scale
is an argmin over its grid, the same input gives the same bytes in both engines, and the
options are recorded in the file.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gptq_reference import published_gptq

from spfq_deploy.cli import main
from spfq_deploy.compress import compress_model, gptq
from spfq_deploy.compress.config import CompressConfig
from spfq_deploy.compress.layer import Grams, compress_weights
from spfq_deploy.compress.path_following import align
from spfq_deploy.errors import SpfqError
from spfq_deploy.pack import container

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def correlated(m, d, seed):
    """X = relu(Z @ A) with a decaying spectrum: correlated, positive, m rows."""
    g = gen(seed)
    A = (0.8 ** torch.arange(d, dtype=DT))[:, None] * torch.randn(d, d, generator=g, dtype=DT)
    return torch.relu(torch.randn(m, d, generator=g, dtype=DT) @ A)


def grams_of(X, Xt):
    """Grams (g, d, d) from data (g, m, d)."""
    tr = Xt.transpose(-1, -2)
    return Grams(tr @ X, tr @ Xt, X.transpose(-1, -2) @ X, X.shape[-2])


def level_table(alph, g):
    """(values, codes), each (n, L): every row of group g's alphabet written out from SPFQ.md,
    {0 if it has one} U +-{lam + j delta : j < K}, with each value's signed code."""
    vals, codes = [], []
    for i in range(alph.lam.shape[-1]):
        lam, delta = float(alph.lam[g, i]), float(alph.delta[g, i])
        mags = [lam + j * delta for j in range(alph.K)]
        vals.append([-m for m in mags] + mags + ([0.0] if alph.has_zero else []))
        codes.append([-(j + 1) for j in range(alph.K)] + [j + 1 for j in range(alph.K)] + ([0] if alph.has_zero else []))
    return np.array(vals), np.array(codes)


def reference_gptq(W, H, table, damp=0.01, act_order=False):
    """GPTQ's fasterquant (tests/gptq_reference.py) with each row's level table."""
    return torch.from_numpy(published_gptq(W, H, *table, damp=damp, act_order=act_order))


def reference_codes(W, gr, alph, **kw):
    """The reference's codes (g, n, d) on the alphabet the engine chose."""
    return torch.stack([reference_gptq(W[g], gr.H[g], level_table(alph, g), **kw) for g in range(W.shape[0])])


def layer(g=1, n=16, d=48, m=300, seed=0, noise=0.0):
    """W (g, n, d) and Grams of correlated inputs; Xt = X + noise (earlier layers compressed)."""
    X = torch.stack([correlated(m, d, seed + k) for k in range(g)])
    Xt = X + noise * X.std() * torch.randn(X.shape, generator=gen(seed + 50), dtype=DT)
    W = torch.randn(g, n, d, generator=gen(seed + 99), dtype=DT)
    return W, X, Xt, grams_of(X, Xt)


def rel_out_err(W, Q, X, Xt):
    Y = X @ W.transpose(-1, -2)
    return float((Y - Xt @ Q.transpose(-1, -2)).norm() / Y.norm())


# ------------------------------------------------------------------ 1. equals GPTQ as published

@pytest.mark.parametrize("bits", [4, 3, "ternary", 1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [1, 7, 128])
def test_codes_equal_published_gptq(bits, act_order, block):
    W, X, Xt, gr = layer(noise=0.05)
    cfg = CompressConfig(bits=bits, method="gptq", act_order=act_order, block=block, c_grid=(0.8,))
    res = compress_weights(W, gr, cfg, 0)
    ref = reference_codes(W, gr, res.alphabet, act_order=act_order)
    assert torch.equal(res.codes, ref)
    torch.testing.assert_close(res.Q, res.alphabet.values(res.codes), rtol=0, atol=0)
    assert res.rel_error == pytest.approx(rel_out_err(W, res.Q, X, Xt), rel=1e-8)


@pytest.mark.parametrize("n", [1, 5])
def test_groups_take_their_own_order(n):
    """A grouped (n = 5) or depthwise (n = 1: the row parts split the groups) conv: every group
    has its own Hessian, act-order and factor."""
    W, X, Xt, gr = layer(g=3, n=n, d=20, m=80, seed=3)
    res = compress_weights(W, gr, CompressConfig(bits=3, method="gptq", act_order=True), 0)
    assert torch.equal(res.codes, reference_codes(W, gr, res.alphabet, act_order=True))
    perms = gptq.plan(W, gr.H, 0.01, True).perm
    assert len({tuple(p.tolist()) for p in perms}) == 3


def test_act_order_is_decreasing_diag_and_changes_the_codes():
    W, X, Xt, gr = layer(seed=4)
    pl = gptq.plan(W, gr.H, 0.01, True)
    diag = torch.diagonal(gr.H, dim1=-2, dim2=-1)[0]
    assert torch.equal(pl.perm[0], torch.sort(diag, descending=True, stable=True).indices)
    assert not torch.equal(pl.perm[0], torch.arange(48))
    cfg = dict(bits=4, method="gptq", c_grid=(0.9,))
    plain = compress_weights(W, gr, CompressConfig(**cfg), 0)
    ordered = compress_weights(W, gr, CompressConfig(act_order=True, **cfg), 0)
    assert not torch.equal(plain.codes, ordered.codes)
    assert torch.equal(ordered.codes, reference_codes(W, gr, ordered.alphabet, act_order=True))


@pytest.mark.parametrize("damp", [0.001, 0.1, 0.5])
def test_damp_is_a_fraction_of_the_mean_diagonal(damp):
    W, X, Xt, gr = layer(seed=5)
    res = compress_weights(W, gr, CompressConfig(bits=3, method="gptq", damp=damp, c_grid=(0.8,)), 0)
    assert torch.equal(res.codes, reference_codes(W, gr, res.alphabet, damp=damp))


def test_order_r_runs_gptq_on_the_aligned_weights():
    """--order r >= 2: GPTQ quantises w~ of the data alignment (SPFQ.md phase 1), not w."""
    W, X, Xt, gr = layer(seed=13, noise=0.1)
    res = compress_weights(W, gr, CompressConfig(bits=3, method="gptq", order=3, c_grid=(0.8,)), 0)
    Wt = align(W, gr.G, gr.H, 3)
    assert torch.equal(res.codes, reference_codes(Wt, gr, res.alphabet))
    plain = compress_weights(W, gr, CompressConfig(bits=3, method="gptq", c_grid=(0.8,)), 0)
    assert res.rel_error < plain.rel_error


def test_plan_factor_is_the_inverse_hessians_cholesky_factor():
    """K (S's lower triangle) is U^-T for the upper Cholesky factor U of the damped H^-1."""
    _, _, _, gr = layer(seed=6)
    S = gptq.plan(torch.zeros(1, 1, 48, dtype=DT), gr.H, 0.01, False).S[0]
    H = gr.H[0] + 0.01 * torch.diagonal(gr.H[0]).mean() * torch.eye(48, dtype=DT)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    K = torch.tril(S)
    torch.testing.assert_close(K, torch.linalg.inv(U).T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(K.T @ K, H, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(S, S.T, rtol=0, atol=0)


# ------------------------------------------------------------------ 2. damping, dead columns

def test_damping_guards_zero_columns_and_rank_deficient_inputs():
    """m < d and all-zero input columns: H is singular (no Cholesky), the damped one is not;
    a dead column's weight is zeroed first, so its code is T(0) = 0."""
    W, X, Xt, _ = layer(m=30, seed=7)
    X[..., [3, 40]] = 0.0
    Xt[..., [3, 40]] = 0.0
    gr = grams_of(X, Xt)
    assert int(torch.linalg.cholesky_ex(gr.H[0])[1]) != 0
    for act_order in (False, True):
        res = compress_weights(W, gr, CompressConfig(bits=4, method="gptq", act_order=act_order), 0)
        assert torch.all(res.codes[..., [3, 40]] == 0)
        assert torch.equal(res.codes, reference_codes(W, gr, res.alphabet, act_order=act_order))
        assert 0.0 < res.rel_error < 1.0


def test_all_zero_input_is_no_error():
    W = torch.randn(1, 4, 10, generator=gen(8), dtype=DT)
    X = torch.zeros(1, 20, 10, dtype=DT)
    res = compress_weights(W, grams_of(X, X), CompressConfig(bits=4, method="gptq"), 0)
    assert torch.all(res.codes == 0) and res.rel_error == 0.0


def test_not_positive_definite_is_one_clear_error():
    H = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]], dtype=DT)  # indefinite: no damping in (0, 1) helps
    with pytest.raises(SpfqError, match="not positive definite"):
        gptq.plan(torch.ones(1, 1, 2, dtype=DT), H, 0.01, False)


# ------------------------------------------------------------------ 3. quality vs round to nearest

@pytest.mark.parametrize("bits", [4, 3, "ternary", 1])
@pytest.mark.parametrize("noise", [0.0, 0.05])
@pytest.mark.parametrize("scale", ["search", "mse"])
def test_output_error_below_round_to_nearest(bits, noise, scale):
    W, X, Xt, gr = layer(m=400, seed=9, noise=noise)
    err = {m: compress_weights(W, gr, CompressConfig(bits=bits, method=m, scale=scale), 0).rel_error
           for m in ("gptq", "rtn")}
    assert err["gptq"] < 0.9 * err["rtn"], err


# ------------------------------------------------------------------ 4. pruning

@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("bits", [4, 1])
@pytest.mark.parametrize("scale", ["search", "mse"])
def test_requested_sparsity_is_reached_inside_the_column_loop(sparsity, bits, scale):
    W, X, Xt, gr = layer(seed=10)
    res = compress_weights(W, gr, CompressConfig(bits=bits, method="gptq", sparsity=sparsity, scale=scale), 3)
    realised = float((res.codes == 0).double().mean())
    assert abs(realised - sparsity) <= 0.01, (realised, sparsity)
    assert res.alphabet.pruned and res.sparsity == pytest.approx(realised, abs=1e-9)
    # the threshold operator is rounding to the nearest value of {0} U +-{lam, lam + delta, ...}
    assert torch.equal(res.codes, reference_codes(W, gr, res.alphabet))


# ------------------------------------------------------------------ 5. the mse scale

@pytest.mark.parametrize("bits", [4, 2, 1])
def test_mse_scale_is_the_per_row_argmin_of_the_weight_error(bits):
    W, X, Xt, gr = layer(seed=11)
    res = compress_weights(W, gr, CompressConfig(bits=bits, method="gptq", scale="mse"), 0)
    K = 1 if bits in (1, 2) else 2 ** (bits - 1) - 1
    Wn = W.numpy()[0]
    R = np.abs(Wn).max(-1)
    lowest = 0.05 if K == 1 else 0.2
    best = []
    for i in range(Wn.shape[0]):
        errs = []
        for c in [1.0 - 0.01 * k for k in range(round((1 - lowest) / 0.01) + 1)]:
            delta = float(np.float16(c * R[i] / K))
            lv = np.array([-delta, delta]) if bits == 1 else delta * np.arange(-K, K + 1)
            q = lv[np.abs(Wn[i, :, None] - lv).argmin(1)]
            errs.append((((Wn[i] - q) ** 2).sum(), delta))
        best.append(min(errs, key=lambda e: e[0])[1])  # first minimum: the larger factor on ties
    np.testing.assert_array_equal(res.alphabet.delta[0].numpy(), np.array(best))


# ------------------------------------------------------------------ 6. determinism, engines, file

def test_same_input_same_bytes():
    W, X, Xt, gr = layer(seed=12, noise=0.05)
    cfg = CompressConfig(bits=4, method="gptq", act_order=True, sparsity=0.5)
    a, b = compress_weights(W, gr, cfg, 1), compress_weights(W, gr, cfg, 1)
    c = compress_weights(W, gr, cfg, 2)  # deterministic: the seed does not enter
    assert a.codes.numpy().tobytes() == b.codes.numpy().tobytes() == c.codes.numpy().tobytes()
    assert torch.equal(a.alphabet.delta, b.alphabet.delta) and torch.equal(a.alphabet.lam, b.alphabet.lam)


def test_both_engines_write_the_same_bytes(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo_model

    files = []
    for engine in ("sequential", "replay", "sequential"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few samples
            res = compress_model(zoo_model.build(), zoo_model.calibration(), bits=3, method="gptq",
                                 act_order=True, sparsity=0.3, engine=engine, progress=False)
        assert res.engine["engine"] == engine
        path = tmp_path / f"{len(files)}.spfq"
        container.save(path, res.model)
        files.append(path.read_bytes())
    assert files[0] == files[1] == files[2]


def test_cli_records_the_options(tmp_path, capsys):
    out = tmp_path / "m.spfq"
    code = main(["compress", str(ROOT / "tests" / "zoo_model.py"), "--method", "gptq", "--act-order",
                 "--damp", "0.05", "--scale", "mse", "--bits", "4", "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    header = container.read_header(out)
    cfg = header["meta"]["config"]
    assert (cfg["method"], cfg["act_order"], cfg["damp"], cfg["scale"]) == ("gptq", True, 0.05, "mse")
    assert {e["meta"]["method"] for e in header["layers"].values()} == {"gptq"}
