"""Rebuild the compressed model in PyTorch from a .spfq file: the reference for parity checks.

The architecture comes from the model factory recorded in the file (or one given), the float
parameters and the dequantised weights come from the file. A file whose layers do not fit the
model is refused with one line, never loaded partially.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .compress.folding import fold
from .compressed import CompressedModel
from .errors import FormatError, SpfqError
from .modelspec import load_model
from .pack import container


def apply_compressed(model: nn.Module, cm: CompressedModel, source: str = "model") -> nn.Module:
    """Load cm into `model` (built by the factory) in place: fold BN as recorded, then weights."""
    pairs = [tuple(p) for p in cm.meta.get("folded_batchnorm", [])]
    mods = dict(model.named_modules())
    missing = [n for p in pairs for n in p if n not in mods]
    if missing:
        raise FormatError(f"{source}: layers do not match the model (no module {missing[0]})")
    fold(model, pairs)
    mods = dict(model.named_modules())
    state = {}
    for name, layer in cm.layers.items():
        mod = mods.get(name)
        if mod is None or not hasattr(mod, "weight"):
            raise FormatError(f"{source}: layers do not match the model (no layer '{name}')")
        if tuple(mod.weight.shape) != tuple(layer.weight_shape):
            raise FormatError(f"{source}: layer '{name}' is {tuple(layer.weight_shape)} in the file but "
                              f"{tuple(mod.weight.shape)} in the model")
        state[f"{name}.weight"] = torch.from_numpy(layer.dequantize())
        if layer.bias is not None:
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(layer.rows))
            state[f"{name}.bias"] = torch.from_numpy(np.array(layer.bias, dtype=np.float32))
    for key, value in cm.float_params.items():
        state[key] = torch.from_numpy(np.array(value))
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise FormatError(f"{source}: layers do not match the model (unexpected parameter '{unknown[0]}')")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise FormatError(f"{source}: parameter '{k}' is {tuple(v.shape)} in the file but "
                              f"{tuple(own[k].shape)} in the model")
    absent = [k for k in own if k not in state]
    if absent:
        raise FormatError(f"{source}: the file has no value for model parameter '{absent[0]}'")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_reference(path: str | os.PathLike, model_spec: str | None = None) -> nn.Module:
    """The dequantised PyTorch model of a .spfq file (factory from the file unless given)."""
    cm = container.load(path)
    spec = model_spec or cm.model_spec
    if not spec:
        raise SpfqError(f"{path}: no model factory recorded; pass the model file (path.py:factory)")
    model, _ = load_model(spec)
    return apply_compressed(model, cm, str(path))
