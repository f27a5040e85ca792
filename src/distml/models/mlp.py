"""Multi-layer perceptron on flat features."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Sequential):
    """Linear -> activation -> dropout blocks, then a linear head. Input (B, F), output (B, C)."""

    def __init__(
        self,
        *,
        in_features: int,
        num_outputs: int,
        hidden_sizes: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)
