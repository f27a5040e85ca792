"""What each task trains on and measures: loss, metrics, output shape, prediction."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.metrics import f1_score, r2_score
from torch import nn


def output_shape(task: str, *, num_outputs: int, sequence_length: int | None) -> tuple[int, ...]:
    """Shape of one sample's model output (without the batch dimension)."""
    if task == "language_modeling":
        return (sequence_length, num_outputs)
    return (num_outputs,)


def loss_fn(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss over the batch: cross-entropy, or MSE for regression."""
    if task == "regression":
        return F.mse_loss(outputs.squeeze(-1).float(), targets)
    # (B, C) vs (B,), or (B, T, V) vs (B, T) flattened to (B*T, V) vs (B*T,)
    return F.cross_entropy(outputs.flatten(0, -2).float(), targets.flatten())


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024
) -> torch.Tensor:
    """Model outputs for all rows, in eval mode, on the model's device; returns CPU float32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = [
        model(x[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    model.train(was_training)
    return torch.cat(outs)


def evaluate(
    task: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
) -> tuple[dict[str, float], np.ndarray]:
    """Every metric of the task on (x, y); also the predictions (class ids or values)."""
    return metrics_from_outputs(task, predict(model, x, batch_size=batch_size), y)


def metrics_from_outputs(task: str, outputs: torch.Tensor, y: torch.Tensor
                         ) -> tuple[dict[str, float], np.ndarray]:
    """Every metric of the task from the model's outputs; also the predictions."""
    loss = float(loss_fn(task, outputs, y))
    if task == "language_modeling":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}, outputs.argmax(-1).numpy()
    if task == "regression":
        pred = outputs.squeeze(-1).numpy()
        target = y.numpy()
        return {
            "loss": loss,
            "mae": float(np.abs(pred - target).mean()),
            "r2": float(r2_score(target, pred)) if len(target) > 1 else 0.0,
        }, pred
    pred = outputs.argmax(-1).numpy()
    target = y.numpy()
    return {
        "loss": loss,
        "accuracy": float((pred == target).mean()),
        "f1_macro": float(f1_score(target, pred, average="macro", zero_division=0)),
    }, pred
