"""A small CNN with PReLU / HardSwish / SiLU after every compressed layer kind the kernels take
(few-channel, pointwise, depthwise, general 3x3, Linear): the fused-epilogue export tests. A
model file (build / calibration) for the CLI too."""

from __future__ import annotations

import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.PReLU(16)  # few-channel
        self.c2, self.a2 = nn.Conv2d(16, 32, 1), nn.Hardswish()  # pointwise
        self.c3, self.a3 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.SiLU()  # depthwise
        self.c4, self.a4 = nn.Conv2d(32, 24, 3, padding=1), nn.PReLU()  # general 3x3, one slope
        self.fc1, self.a5 = nn.Linear(24, 40), nn.SiLU()
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = self.a4(self.c4(self.a3(self.c3(self.a2(self.c2(self.a1(self.c1(x))))))))
        x = x.mean(dim=(2, 3))
        return self.fc2(self.a5(self.fc1(x)))


def build() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.a1.weight.uniform_(-0.4, 0.4)
        net.a4.weight.fill_(0.1)
    return net.eval()


def calibration(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
