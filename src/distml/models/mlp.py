"""Multi-layer perceptron on flat features, with its tensor-parallel plan and pipeline
layers."""

from __future__ import annotations

from typing import Any

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
        # Where each Linear (with what follows it) starts: the layers a pipeline cuts at.
        self.layer_starts = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]

    def pipeline_layers(self) -> list[tuple[Any, list[str]]]:
        """(callable, the module paths it owns) in forward order: each Linear with the
        activation and dropout after it."""
        bounds = [*self.layer_starts, len(self)]
        return [(nn.Sequential(*list(self)[a:b]), [str(i) for i in range(a, b)])
                for a, b in zip(bounds, bounds[1:], strict=False)]

    def tensor_plan(self) -> dict[str, Any]:
        """Hidden Linears in pairs: the first split by output columns, the second by input
        rows, so the activation between them stays sharded and one all-reduce ends the pair;
        an unpaired last Linear stays whole."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        linears = [str(i) for i in self.layer_starts]
        plan: dict[str, Any] = {}
        for up, down in zip(linears[0::2], linears[1::2], strict=False):
            plan[up], plan[down] = ColwiseParallel(), RowwiseParallel()
        return plan
