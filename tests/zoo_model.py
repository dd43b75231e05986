"""A small model with every layer kind the kernels take: grouped, strided + dilated, depthwise
and 1-D convs and a Linear over a sequence. A model file (build / calibration) for the CLI too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.c4 = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        x = x.flatten(2)  # (B, 8, L)
        x = F.relu(self.c4(x))
        return self.fc(x.transpose(1, 2))  # Linear over a sequence


def build() -> nn.Module:
    torch.manual_seed(0)
    return Zoo().eval()


def calibration() -> torch.Tensor:
    return torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def export_inputs() -> dict:
    """Batch and both spatial axes dynamic (the convs' output sizes follow the input)."""
    axes = {0: "batch", 2: "height", 3: "width"}
    return {"args": (calibration()[:2],), "input_names": ["input"], "output_names": ["output"],
            "dynamic_axes": {"input": axes, "output": {0: "batch", 1: "length"}}}
