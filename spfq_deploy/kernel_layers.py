"""Run a compressed Linear / Conv1d / Conv2d layer through the packed kernels.

Convs go through the same GEMMs: input patches (im2col, the rows the compressor used, per
group) times each group's packed weights. Modes: "f32" (weight-only, matches the dequantised
PyTorch layer up to summation order) and "i8" (activations quantised per row to int8, exact
int32 accumulation, then scale and bias).
"""

from __future__ import annotations

import numpy as np
import torch

from .compress.capture import patch_rows, rows_to_output
from .compressed import CompressedLayer, rows_slice
from .kernels import GroupedWeights, KernelError, PackedWeights, quantize_i8


class KernelLayer:
    """One compressed layer, packed once, callable on torch or numpy inputs."""

    def __init__(self, layer: CompressedLayer, layout: str | None = None):
        self.layer = layer
        self.groups = int(layer.conv["groups"]) if layer.conv else 1
        n = layer.rows // self.groups
        kind = GroupedWeights if layer.group_size else PackedWeights  # group-wise scales: spfq_grouped_*
        self.parts = [kind.from_layer(rows_slice(layer, g * n, (g + 1) * n), layout) for g in range(self.groups)]

    def __call__(self, x, mode: str = "f32", threads: int = 1) -> torch.Tensor:
        if mode not in ("f32", "i8"):
            raise KernelError(f"mode must be 'f32' or 'i8', got {mode!r}")
        x = torch.as_tensor(x, dtype=torch.float32)
        layer = self.layer
        in_ch = layer.weight_shape[1] * self.groups if layer.conv else layer.weight_shape[1]
        channel_dim = -1 if layer.kind == "linear" else 1
        if x.dim() < 2 or x.shape[channel_dim] != in_ch:
            raise KernelError(f"layer {layer.name} expects {in_ch} input features/channels, got shape {tuple(x.shape)}")
        rows = patch_rows(x, layer.kind, layer.conv)  # (g, m, d)
        outs = []
        for g, w in enumerate(self.parts):
            r = np.ascontiguousarray(rows[g].numpy())
            if mode == "f32":
                outs.append(w.matmul_f32(r, threads))
            else:
                xq, xs = quantize_i8(r)
                outs.append(w.matmul_i8(xq, xs, threads))
        y = torch.from_numpy(np.concatenate(outs, axis=1))  # (m, N), group-major channels
        return rows_to_output(y, x, layer.kind, layer.conv)
