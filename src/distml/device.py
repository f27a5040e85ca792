"""The one place where the device and the collective backend are chosen."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def collective_backend(device: torch.device) -> str:
    """nccl on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
