"""A split of a data set as tensors, for evaluation and the loops that read it whole."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distml.data.dataset import Manifest, load_split


@dataclass
class SplitTensors:
    """A split loaded once and shared by every candidate."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def load(cls, manifest: Manifest, split: str) -> SplitTensors:
        x, y = load_split(manifest, split)
        return cls(torch.from_numpy(x), torch.from_numpy(y))
