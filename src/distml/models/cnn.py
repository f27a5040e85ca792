"""A small convolutional net for image-shaped inputs given as flat features (digits: 8x8)."""

from __future__ import annotations

import torch
from torch import nn


class CNN(nn.Module):
    """Conv blocks (conv -> ReLU, 2x2 max-pool while the image is at least 4 pixels wide),
    then a dense layer and the head. Input (B, C*H*W) flat, output (B, num_outputs)."""

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_outputs: int,
        channels: list[int],
        kernel_size: int = 3,
        hidden_size: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            if min(h, w) >= 4:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.image_shape)  # (B, C*H*W) -> (B, C, H, W)
        return self.head(self.features(x))
