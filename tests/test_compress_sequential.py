"""The sequential engine (compress/sequential.py) against the replay engine it replaces (issue 14).

Same seed and settings -> the same .spfq bytes (the arithmetic is the same ATen kernels on the
same batches), on the real MNIST CNN, the real MiniLM encoder (2 layers), a residual stack and
the layer zoo, with sparsity and bias correction; live activations bounded by liveness, not by
depth; a zero memory budget spills everything and still gives the same bytes; a model that
torch.export cannot capture falls back with a warning naming why; a layer input that becomes
non-finite stops the run naming the layer.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from spfq_deploy.compress import compress_model
from spfq_deploy.compress.engine import EngineWarning
from spfq_deploy.errors import CalibrationError, SpfqError
from spfq_deploy.pack import container

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _bytes(tmp_path: Path, res, tag: str) -> bytes:
    path = tmp_path / f"{tag}.spfq"
    container.save(path, res.model)
    return path.read_bytes()


def _both(tmp_path, model, calib, **opts):
    """Compress with both engines (no fallback allowed) and return (sequential, replay, bytes equal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineWarning)
        seq = compress_model(model, calib, engine="sequential", progress=False, **opts)
    rep = compress_model(model, calib, engine="replay", progress=False, **opts)
    assert seq.engine["engine"] == "sequential" and rep.engine["engine"] == "replay"
    return seq, rep, _bytes(tmp_path, seq, "seq") == _bytes(tmp_path, rep, "rep")


class Residual(nn.Module):
    """x + fc2(relu(fc1(norm(x)))): the residual branch is live across both layers of a block."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def residual_stack(blocks: int, d: int = 16) -> nn.Module:
    torch.manual_seed(blocks)
    return nn.Sequential(nn.Linear(8, d), *[Residual(d) for _ in range(blocks)], nn.Linear(d, 4)).eval()


def _calib(n=96, d=8):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3))


def test_mnist_same_bytes_as_replay(tmp_path):
    import examples.mnist_cnn as mnist

    _, _, same = _both(tmp_path, mnist.build(), mnist.calibration(128), bits=4, method="gpfq")
    assert same


def test_minilm_same_bytes_as_replay(tmp_path):
    """The real MiniLM encoder (2 layers: q/k/v share an input, residuals, LayerNorm, GELU),
    variable-length sentence batches (the graph's sequence axis is symbolic)."""
    import minilm_stack

    calib = minilm_stack.calibration(64, 16)
    assert len({b.shape[1] for b in calib}) > 1  # batches of different lengths run one graph
    _, _, same = _both(tmp_path, minilm_stack.build(), calib, bits="ternary", method="spfq", seed=5)
    assert same


@pytest.mark.parametrize("opts", [dict(bits=3, method="gpfq", sparsity=0.3, bias_correction=True),
                                  dict(bits=1, method="spfq", seed=2)])
def test_zoo_and_residual_stack_same_bytes(tmp_path, opts):
    import zoo_model

    for model, calib in ((zoo_model.build(), zoo_model.calibration()), (residual_stack(4), _calib())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few samples
            _, _, same = _both(tmp_path, model, calib, **opts)
        assert same


def test_live_activations_do_not_grow_with_depth():
    """Peak RAM of live activations is set by the widest cut (a block's input and its hidden
    layer, for both models), the same for 4 and 16 blocks; the replay engine would not hold
    them at all, and a leak would grow with depth."""
    peaks = {}
    for blocks in (4, 16):
        res = compress_model(residual_stack(blocks), _calib(), bits=4, method="rtn", engine="sequential",
                             progress=False)
        peaks[blocks] = res.engine["peak_activation_bytes"]
    one_cut = 96 * (16 + 32) * 4 * 2  # a block input and its hidden layer, float32, both models
    assert 0 < peaks[4] == peaks[16] <= 3 * one_cut, peaks


def test_zero_memory_budget_spills_and_keeps_bytes(tmp_path, monkeypatch):
    import tempfile

    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    model, calib = residual_stack(3), _calib()
    spilled = compress_model(model, calib, bits=4, engine="sequential", memory_budget=0, progress=False)
    plain = compress_model(model, calib, bits=4, engine="sequential", progress=False)
    # in RAM only the calibration batches (views of the caller's tensor, never copied)
    assert spilled.engine["spilled_bytes"] > 0 and spilled.engine["peak_activation_bytes"] == 96 * 8 * 4
    assert plain.engine["spilled_bytes"] == 0
    assert _bytes(tmp_path, spilled, "a") == _bytes(tmp_path, plain, "b")
    assert os.listdir(spill) == []  # mapped files are unlinked, the folder removed


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


def test_untraceable_model_falls_back_with_reason(tmp_path, capfd):
    torch.manual_seed(0)
    model = Branchy().eval()
    with pytest.warns(EngineWarning, match=r"replay engine .*: torch.export cannot capture it"):
        auto = compress_model(model, _calib(), bits=4, progress=False)
    assert capfd.readouterr() == ("", "")  # torch.export's partial-graph dump is not shown
    assert auto.engine["engine"] == "replay" and "torch.export" in auto.engine["fallback_reason"]
    replay = compress_model(model, _calib(), bits=4, engine="replay", progress=False)
    assert _bytes(tmp_path, auto, "a") == _bytes(tmp_path, replay, "b")
    with pytest.raises(SpfqError, match="sequential engine cannot take this model"):
        compress_model(model, _calib(), bits=4, engine="sequential", progress=False)


def test_batches_of_other_sizes_run_one_graph(tmp_path):
    """64 + 64 + 1 samples: the graph is captured from a full batch (a batch of 1 would fix the
    batch axis at 1) and the batch of one runs it too; same bytes as the replay engine."""
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).eval()
    x = torch.randn(129, 2, 8, generator=torch.Generator().manual_seed(4))
    calib = [x[:1], x[1:65], x[65:]]
    _, _, same = _both(tmp_path, model, calib, bits=4)
    assert same


def test_batch_the_model_rejects_is_a_one_line_error_in_both_engines():
    """Both name the batch and its shape (the replay engine's first full float pass meets the
    Linear's error; the sequential one sees the layer's rows first and says so)."""
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 3)).eval()
    calib = [torch.randn(64, 2, 8), torch.randn(64, 2, 8), torch.randn(64, 2, 9)]
    msgs = set()
    for engine in ("sequential", "replay"):
        with pytest.raises(CalibrationError) as err:
            compress_model(model, calib, bits=4, engine=engine, progress=False)
        msgs.add(str(err.value))
    assert msgs == {"calibration batch 2 ((64, 2, 9)) gives layer '2' rows of 28 features, earlier batches 24",
                    "calibration batch 2 ((64, 2, 9)) does not fit the model: RuntimeError: mat1 and mat2 shapes "
                    "cannot be multiplied (64x28 and 24x3)"}


class Overflow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.exp(self.a(x) * 500))  # overflows float32 to Inf


def test_non_finite_layer_input_names_the_layer():
    torch.manual_seed(0)
    with pytest.raises(CalibrationError, match=r"calibration batch 0 .*input of layer 'b' is Inf in the float model"):
        compress_model(Overflow().eval(), _calib(), bits=4, engine="sequential", progress=False)


def test_bad_engine_and_budget_are_errors():
    with pytest.raises(SpfqError, match="engine must be one of"):
        compress_model(residual_stack(1), _calib(), engine="fast", progress=False)
    with pytest.raises(SpfqError, match="memory budget"):
        compress_model(residual_stack(1), _calib(), memory_budget=-1, progress=False)
