"""--rescale (engine.py _rescale): per output channel, after compression, the layer's output
statistics on the calibration data re-estimated from the Grams and matched: "var" gives every
channel the float layer's mean and variance (a BatchNorm after it re-estimated and folded),
"ls" the least-squares gain and the mean. Checked on the model's outputs computed from data,
not from the Grams the engine used."""

import pytest
import torch
from torch import nn

from spfq_deploy.compress import compress_model
from spfq_deploy.errors import SpfqError

pytestmark = pytest.mark.usefixtures("single_thread")


def setup(seed=0, d=40, n=12, m=512):
    g = torch.Generator().manual_seed(seed)
    A = (0.9 ** torch.arange(d))[:, None] * torch.randn(d, d, generator=g)
    X = torch.relu(torch.randn(m, d, generator=g) @ A) + 0.3
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, n)).eval()
    return model, X


def outputs(model, res, X):
    with torch.no_grad():
        return model(X).double(), res.reference(X).double()


@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("bits", [1, "ternary", 3])
def test_var_matches_each_channels_mean_and_variance(bits, group_size):
    model, X = setup()
    res = compress_model(model, X, bits=bits, method="gpfq", rescale="var", progress=False, batch_size=128,
                         group_size=group_size)
    y, yq = outputs(model, res, X)
    torch.testing.assert_close(yq.std(0), y.std(0), rtol=2e-3, atol=0)  # float16 scales
    torch.testing.assert_close(yq.mean(0), y.mean(0), rtol=0, atol=2e-3 * float(y.std(0).max()))
    plain = compress_model(model, X, bits=bits, method="gpfq", progress=False, batch_size=128,
                           group_size=group_size)
    _, yp = outputs(model, plain, X)
    assert float((yp.std(0) / y.std(0) - 1).abs().max()) > 0.01  # there was something to correct


@pytest.mark.parametrize("bits", [1, "ternary", 3])
def test_ls_never_loses_to_the_mean_shift_alone(bits):
    model, X = setup(1)
    ls = compress_model(model, X, bits=bits, method="gpfq", rescale="ls", progress=False, batch_size=128)
    bc = compress_model(model, X, bits=bits, method="gpfq", bias_correction=True, progress=False, batch_size=128)
    y, y_ls = outputs(model, ls, X)
    _, y_bc = outputs(model, bc, X)
    e_ls, e_bc = ((y - y_ls) ** 2).sum(0), ((y - y_bc) ** 2).sum(0)
    assert bool((e_ls <= e_bc * (1 + 1e-3)).all()), (e_ls, e_bc)
    assert float(e_ls.sum()) < 0.99 * float(e_bc.sum())
    # the reported error is the rescaled layer's (without bias), recomputed here from data
    rel = float((y - model[0].bias.detach().double() - (y_ls - ls.reference[0].bias.detach().double())).norm()
                / (y - model[0].bias.detach().double()).norm())
    assert ls.report[0].rel_error == pytest.approx(rel, rel=1e-4)


def test_bad_rescale_is_one_error():
    with pytest.raises(SpfqError, match="rescale must be one of var, ls"):
        compress_model(*setup(), rescale="max", progress=False)
