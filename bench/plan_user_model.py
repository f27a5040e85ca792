"""The user model of bench/plan.py: not from distml's zoo, built by a factory the config
names ('path/to/file.py:make'): residual blocks with layer norm, a sequence a pipeline can
cut (an nn.Sequential), with no tensor plan."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, W)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def make(in_features: int, num_outputs: int, width: int = 128, depth: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width),
                         *[Residual(width) for _ in range(depth)],
                         nn.LayerNorm(width), nn.Linear(width, num_outputs))
