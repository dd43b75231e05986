"""Fold eval-mode BatchNorm into the conv/linear right before it (so the scales get quantized).

Pairs are found as adjacent children of an nn.Sequential (conv then BN), the layout of most
CNNs; the BN is replaced by nn.Identity. The pairs are recorded so a loader can repeat the fold
on a freshly built model before loading the compressed weights.
"""

from __future__ import annotations

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        kids = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(kids, kids[1:]):
            if isinstance(a, _FOLDABLE) and isinstance(b, _BN) and b.track_running_stats \
                    and b.num_features == (a.out_channels if hasattr(a, "out_channels") else a.out_features):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


@torch.no_grad()
def fold(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """W' = W * gamma/sqrt(var+eps); b' = (b - mean) * gamma/sqrt(var+eps) + beta; BN -> Identity."""
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        s = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        layer.weight.mul_(s.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (b - bn.running_mean) * s + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, nn.Identity())
