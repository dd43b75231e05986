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


def _prefix(source: str | None) -> str:
    return f"{source}: " if source else ""


def _to_tensor(x, source: str | None = None):
    if isinstance(x, np.ndarray):
        kind = x.dtype.kind
        if kind in "USa":
            raise CalibrationError(f"{_prefix(source)}holds strings (dtype {x.dtype}); calibration data must be "
                                   f"numbers")
        if kind == "O":
            raise CalibrationError(f"{_prefix(source)}holds Python objects (dtype object); calibration data must "
                                   f"be a numeric array")
        if kind not in "biufc":
            raise CalibrationError(f"{_prefix(source)}has dtype {x.dtype}; calibration data must be numbers")
        if x.ndim == 0:
            raise CalibrationError(f"{_prefix(source)}is a scalar, not a batch of samples")
        if x.dtype == np.float64:
            x = x.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


def _lead(batch):
    """The tensor whose first dimension counts the batch's samples (None when there is none)."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch
    return next((v for v in items if isinstance(v, torch.Tensor)), None)


def as_batches(data: Any, batch_size: int = 64, source: str | None = None) -> list:
    """Normalise calibration data into a non-empty list of batches, each with at least one sample.
    `source` (a file or function name) prefixes the error messages."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"batch size must be a positive integer, got {batch_size!r}")
    pre = _prefix(source)
    data = _to_tensor(data, source)
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise CalibrationError(f"{pre}calibration data is a scalar, not a batch of samples")
        if data.shape[0] == 0:
            raise CalibrationError(f"{pre}calibration data has no samples (shape {tuple(data.shape)})")
        return list(torch.split(data, batch_size))
    if isinstance(data, (list, tuple)):
        out = []
        for i, item in enumerate(data):
            where = f"{source} batch {i}" if source else f"calibration batch {i}"
            if isinstance(item, (list, tuple)):
                item = tuple(_to_tensor(v, where) for v in item)
            elif isinstance(item, dict):
                item = {k: _to_tensor(v, where) for k, v in item.items()}
            elif isinstance(item, (torch.Tensor, np.ndarray)):
                item = _to_tensor(item, where)
            else:
                raise CalibrationError(f"{where} is a {type(item).__name__}, not a tensor/array, a tuple/list "
                                       f"of them or a dict of keyword inputs")
            lead = _lead(item)
            if lead is None:
                raise CalibrationError(f"{where} holds no tensor or array")
            if lead.dim() == 0:
                raise CalibrationError(f"{where} is a scalar, not a batch of samples")
            if lead.shape[0] == 0:
                raise CalibrationError(f"{where} has no samples (shape {tuple(lead.shape)})")
            out.append(item)
        if not out:
            raise CalibrationError(f"{pre}calibration data is empty (no batches)")
        return out
    raise CalibrationError(f"{pre}calibration data must be a tensor, an array or a list of batches, "
                           f"got {type(data).__name__}")


def count_samples(batches: list) -> int:
    return sum(int(_lead(b).shape[0]) for b in batches)


def non_finite(batch) -> tuple[str, int, str] | None:
    """("NaN" or "Inf", sample index in the batch, "input 0") for the first non-finite floating
    value of a batch, else None (only called on the error path: one pass over the batch)."""
    items = batch.items() if isinstance(batch, dict) else \
        enumerate(batch if isinstance(batch, tuple) else (batch,))
    for key, v in items:
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                idx = bad.nonzero()[0]
                what = "NaN" if bool(torch.isnan(v[tuple(idx)])) else "Inf"
                name = f"input '{key}'" if isinstance(batch, dict) else f"input {key}"
                return what, int(idx[0]) if v.dim() else 0, name
    return None


def call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _tensors(batch) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, dict):
        return [(str(k), v) for k, v in batch.items() if isinstance(v, torch.Tensor)]
    items = batch if isinstance(batch, tuple) else (batch,)
    return [(f"input {i}", v) for i, v in enumerate(items) if isinstance(v, torch.Tensor)]


def spread(batches: list) -> dict:
    """How far the calibration's per-sample shapes spread (README: calibrate on the input shapes
    used at inference): per input, the per-sample shape when it never changes, else each axis's
    min / median / max over the samples and the number of distinct shapes."""
    per_input: dict[str, list[tuple[tuple[int, ...], int]]] = {}
    for b in batches:
        for name, v in _tensors(b):
            if v.dim() >= 1:
                per_input.setdefault(name, []).append((tuple(v.shape[1:]), int(v.shape[0])))
    out = {"samples": count_samples(batches), "batches": len(batches), "inputs": {}}
    for name, shapes in per_input.items():
        distinct = sorted({s for s, _ in shapes})
        entry = {"distinct_shapes": len(distinct)}
        if len(distinct) == 1:
            entry["shape"] = list(distinct[0])
        elif len({len(s) for s in distinct}) == 1:
            axes = []
            for a in range(len(distinct[0])):
                vals = np.repeat([s[a] for s, _ in shapes], [n for _, n in shapes])
                axes.append([int(vals.min()), int(np.median(vals)), int(vals.max())])
            entry["axes_min_median_max"] = axes
        out["inputs"][name] = entry
    return out


def spread_line(info: dict) -> str:
    """One line for the compress summary, e.g. `656 samples in 40 batches; input 0 per sample:
    (3..18..256) over 33 shapes`."""
    parts = []
    for name, e in info["inputs"].items():
        if "shape" in e:
            parts.append(f"{name} {tuple(e['shape'])} every sample")
        elif "axes_min_median_max" in e:
            dims = ", ".join(str(lo) if lo == hi else f"{lo}..{med}..{hi}"
                             for lo, med, hi in e["axes_min_median_max"])
            parts.append(f"{name} per sample ({dims}) (min..median..max over {e['distinct_shapes']} shapes)")
        else:
            parts.append(f"{name} {e['distinct_shapes']} shapes of different ranks")
    return f"{info['samples']} samples in {info['batches']} batches; " + "; ".join(parts)


def describe(batch) -> str:
    if isinstance(batch, dict):
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in batch.items())
    if isinstance(batch, tuple):
        return ", ".join(str(tuple(v.shape)) for v in batch)
    return str(tuple(batch.shape))
