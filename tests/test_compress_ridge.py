"""--ridge (gpfq / spfq): the objective ||X w - Xt q||^2 + rho ||w - q||^2, rho = ridge *
mean(diag H) per group. Checked against its definition: the ridge is the same run on Grams with
rho I added (bit for bit, i.e. calibration rows sqrt(rho) I appended to X and Xt), the reported
error is the undamped one recomputed from the data, a larger ridge keeps Q nearer W, ridge 0
is no ridge, and bad values are one clear error.
"""

import pytest
import torch

from spfq_deploy.compress.config import CompressConfig
from spfq_deploy.compress.layer import Grams, compress_weights
from spfq_deploy.errors import SpfqError

DT = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def data(seed, m=96, d=48, n=24):
    g = torch.Generator().manual_seed(seed)
    A = (0.85 ** torch.arange(d, dtype=DT))[:, None] * torch.randn(d, d, generator=g, dtype=DT)
    X = torch.relu(torch.randn(m, d, generator=g, dtype=DT) @ A)
    Xt = X + 0.05 * torch.randn(m, d, generator=g, dtype=DT)  # the quantised model's inputs
    W = torch.randn(1, n, d, generator=g, dtype=DT) * 0.2
    return W, X, Xt


def grams(X, Xt, rho=0.0):
    eye = rho * torch.eye(X.shape[1], dtype=DT)
    return Grams((Xt.T @ X + eye)[None], (Xt.T @ Xt + eye)[None], (X.T @ X + eye)[None], X.shape[0])


@pytest.mark.parametrize("bits", [1, "ternary", 3])
@pytest.mark.parametrize("method", ["gpfq", "spfq"])
@pytest.mark.parametrize("ridge", [0.05, 1.0])
def test_ridge_is_path_following_on_rows_sqrt_rho_appended(bits, method, ridge):
    W, X, Xt = data(1)
    rho = ridge * float((Xt.T @ Xt).diagonal().mean())
    got = compress_weights(W, grams(X, Xt), CompressConfig(bits=bits, method=method, ridge=ridge), seed=3)
    want = compress_weights(W, grams(X, Xt, rho), CompressConfig(bits=bits, method=method), seed=3)
    assert torch.equal(got.codes, want.codes)
    assert got.C == want.C
    # the stacked-rows reading of the same objective, from data: [X; sqrt(rho) I], [Xt; sqrt(rho) I]
    d = X.shape[1]
    Xs = torch.cat([X, rho ** 0.5 * torch.eye(d, dtype=DT)])
    Xts = torch.cat([Xt, rho ** 0.5 * torch.eye(d, dtype=DT)])
    obj = ((Xs @ W[0].T - Xts @ got.Q[0].T) ** 2).sum()
    calib = ((X @ W[0].T - Xt @ got.Q[0].T) ** 2).sum()
    assert float(obj - calib) == pytest.approx(rho * float(((W - got.Q) ** 2).sum()), rel=1e-9)
    # the reported error is the calibration's alone, undamped
    rel = float(calib.sqrt() / (X @ W[0].T).norm())
    assert got.rel_error == pytest.approx(rel, rel=1e-9)


def test_ridge_zero_is_no_ridge():
    W, X, Xt = data(2)
    a = compress_weights(W, grams(X, Xt), CompressConfig(bits=3, ridge=0.0), seed=0)
    b = compress_weights(W, grams(X, Xt), CompressConfig(bits=3), seed=0)
    assert torch.equal(a.codes, b.codes) and a.rel_error == b.rel_error


def test_larger_ridge_keeps_q_nearer_w_for_more_calibration_error():
    """The trade the ridge makes, on a fixed C grid point (so the scale stays put): the weight
    error falls as the ridge grows, and a large ridge costs calibration error (path following is
    greedy, so a small ridge may even lower it: not asserted)."""
    W, X, Xt = data(4, m=40)  # fewer rows than a generous fit would want
    werr, cerr = [], []
    for ridge in (0.0, 0.3, 3.0, 30.0):
        r = compress_weights(W, grams(X, Xt), CompressConfig(bits=3, ridge=ridge, c_grid=(0.9,)), seed=0)
        werr.append(float((W - r.Q).norm()))
        cerr.append(r.rel_error)
    assert werr == sorted(werr, reverse=True) and werr[-1] < 0.9 * werr[0]
    assert cerr[-1] > cerr[0]


@pytest.mark.parametrize("ridge", [-0.1, 101, float("nan"), "x"])
def test_bad_ridge_is_one_error(ridge):
    with pytest.raises(SpfqError, match="ridge must be a number in"):
        CompressConfig(ridge=ridge)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ridge_belongs_to_path_following(method):
    with pytest.raises(SpfqError, match="ridge applies to methods gpfq and spfq"):
        CompressConfig(method=method, ridge=0.1)
