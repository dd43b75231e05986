"""Rebuild the compressed model in PyTorch from a .spfq file: the reference for parity checks.

The architecture comes from the model factory recorded in the file (or one given), the float
parameters and the dequantised weights come from the file. A file whose layers do not fit the
model is refused with one line, never loaded partially.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torch import nn

from .compress.capture import patch_rows, rows_to_output
from .compress.folding import fold
from .compressed import CompressedLayer, CompressedModel
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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` inside `model`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantize_rows_i8(rows: torch.Tensor, rule: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantiser in torch (kernels/src/quant.c), per row; returns
    (q as float64, xscale float32). Rule 2 (spfq-deploy >= 0.x exports record "int8_quantizer": 2):
    amax = max|x| (NaN ignored); below 2^-100 xscale = 0 and q = 0; else xscale = amax / 127,
    r = 127 / amax (float32) and q = float32(x * r) rounded to nearest even, in [-127, 127]
    (NaN -> 0). Rule 1 (earlier exports, no record): xscale = amax / 127, q = float32(x / xscale)
    rounded half away from zero, in [-127, 127]."""
    rows = rows.float()
    if rule == 1:
        xs = rows.abs().amax(dim=-1) / 127.0
        safe = torch.where(xs > 0, xs, torch.ones_like(xs))
        v = (rows / safe[..., None]).double()  # float32 quotient as C computes it; rounding exact in float64
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)
        return torch.where(xs[..., None] > 0, q.clamp(-127, 127), torch.zeros_like(q)), xs
    amax = torch.nan_to_num(rows.abs(), nan=0.0, posinf=float("inf")).amax(dim=-1)
    ok = amax >= 2.0 ** -100
    xs = torch.where(ok, amax / 127.0, torch.zeros_like(amax))
    r = torch.where(ok, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    t = rows * r[..., None]  # float32 product, as the kernels
    q = torch.nan_to_num(torch.round(t).clamp(-127, 127), nan=0.0)
    return q.double(), xs


class Int8ActivationLayer(nn.Module):
    """A compressed layer as the int8-activation kernels compute it, written independently of
    them: activations quantised per row, exact integer sums (float64 holds them exactly), then
    y = xscale * (scale * acc_c + (lam - scale) * acc_s) + bias; with group-wise scales the
    sums are per group of columns and y = xscale * sum_g (scale_g * acc_c,g + (lam_g - scale_g)
    * acc_s,g) + bias, groups in ascending order."""

    def __init__(self, layer: CompressedLayer, rule: int = 2):
        super().__init__()
        self.kind, self.conv, self.rule = layer.kind, layer.conv, rule
        self.bounds = [(c0, min(c0 + layer.group_size, layer.cols)) for c0 in range(0, layer.cols, layer.group_size)] \
            if layer.group_size else [(0, layer.cols)]
        self.groups = int(layer.conv["groups"]) if layer.conv else 1
        codes = torch.from_numpy(layer.codes.astype(np.float64))
        self.register_buffer("codes", codes)
        self.register_buffer("signs", torch.sign(codes))
        scale = torch.from_numpy(layer.scale.astype(np.float64).reshape(layer.rows, -1))  # (N, groups)
        lam = scale if layer.lam is None or layer.K == 1 else \
            torch.from_numpy(layer.lam.astype(np.float64).reshape(layer.rows, -1))
        self.register_buffer("scale", scale)
        self.register_buffer("extra", lam - scale)
        bias = np.zeros(layer.rows) if layer.bias is None else layer.bias
        self.register_buffer("bias", torch.from_numpy(np.asarray(bias, dtype=np.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = patch_rows(x.float(), self.kind, self.conv)  # (g, m, d)
        n = self.codes.shape[0] // self.groups
        outs = []
        for g in range(self.groups):
            q, xs = quantize_rows_i8(rows[g], self.rule)
            c, sg = self.codes[g * n:(g + 1) * n], self.signs[g * n:(g + 1) * n]
            sc, ex = self.scale[g * n:(g + 1) * n], self.extra[g * n:(g + 1) * n]
            acc = None
            for j, (c0, c1) in enumerate(self.bounds):
                qj = q[:, c0:c1]
                term = qj @ c[:, c0:c1].T * sc[:, j] + (qj @ sg[:, c0:c1].T) * ex[:, j]
                acc = term if acc is None else acc + term
            outs.append(xs.double()[:, None] * acc + self.bias[g * n:(g + 1) * n])
        return rows_to_output(torch.cat(outs, dim=1).float(), x, self.kind, self.conv)


def int8_activation_reference(model: nn.Module, cm: CompressedModel, float_layers=(), rule: int = 2) -> nn.Module:
    """A copy of the reference `model` whose compressed layers quantise their inputs to int8 per
    row as the integer kernels do: the reference for artifacts built with int8 activations.
    float_layers: layers such an artifact runs weight-only (kernels.layer_activation), left as
    the dequantised modules; rule: the artifact's quantiser (its manifest's int8_quantizer)."""
    model = copy.deepcopy(model)
    for name, layer in cm.layers.items():
        if name not in float_layers:
            replace_module(model, name, Int8ActivationLayer(layer, rule))
    return model.eval()
