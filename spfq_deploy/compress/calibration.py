"""Calibration data as a list of model inputs, and running a model on one of them.

Accepted: a tensor or array (split along dim 0 into batches), or a list whose items are each
one batch: a tensor (model(x)), a tuple/list (model(*x)) or a dict (model(**x)).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CalibrationError


def _to_tensor(x):
    if isinstance(x, np.ndarray):
        if x.dtype == np.float64:
            x = x.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


def as_batches(data: Any, batch_size: int = 64) -> list:
    """Normalise calibration data into a non-empty list of batches."""
    data = _to_tensor(data)
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise CalibrationError("calibration data is empty")
        return list(torch.split(data, batch_size))
    if isinstance(data, (list, tuple)):
        out = []
        for item in data:
            if isinstance(item, (list, tuple)):
                out.append(tuple(_to_tensor(v) for v in item))
            elif isinstance(item, dict):
                out.append({k: _to_tensor(v) for k, v in item.items()})
            else:
                out.append(_to_tensor(item))
        if not out:
            raise CalibrationError("calibration data is empty")
        return out
    raise CalibrationError(f"calibration data must be a tensor, an array or a list of batches, "
                           f"got {type(data).__name__}")


def count_samples(batches: list) -> int:
    def first(b):
        if isinstance(b, dict):
            return next(iter(b.values()))
        return b[0] if isinstance(b, tuple) else b
    return sum(int(first(b).shape[0]) for b in batches)


def call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def describe(batch) -> str:
    if isinstance(batch, dict):
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in batch.items())
    if isinstance(batch, tuple):
        return ", ".join(str(tuple(v.shape)) for v in batch)
    return str(tuple(batch.shape))
