"""Knowledge distillation: the loss, the teacher, and how a student's batches meet it.

    L = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

(Hinton et al. 2015.) ``alpha`` weights the teacher's soft targets (torchdistill's KDLoss
weights the terms the other way round); T^2 keeps the soft term's gradients the same size
as T changes (they shrink as 1/T^2). The KL divergence is summed over classes and averaged
over samples (tokens, for a language model): ``reduction="batchmean"``. ``"mean"`` would
also divide by the number of classes, the most common distillation bug in public code.

Where the teacher's logits come from:

- classification: computed once, before the student trains, over the training and
  unlabelled partitions on the executors, and stored next to the data
  (``distml.data.teacher_logits``); the loader packs them into each row's targets. With a
  transfer set's jittered copies (or a loader map function) the teacher answers online,
  as below, on the very rows the student gets.
- language modeling: online, the teacher's forward on each micro-batch in inference mode on
  the student's device, packed the same way (a (B, T, V) store per epoch would be larger
  than the data), under whatever strategy trains the student.

Either way a batch's targets are ``(..., 1 + C)`` float32: the label, then the teacher's
logits; every strategy passes targets through untouched, so distillation composes with all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from distml.artifact import load_artifact
from distml.rundir import CandidateDir
from distml.trust import TrustPolicy

logger = logging.getLogger(__name__)

UNLABELLED = -1  # the label of a transfer row: the soft term alone


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
            temperature: float, alpha: float, masked: bool = False) -> torch.Tensor:
    """The distillation loss (module docstring) of logits (N, C) or (B, T, V) and labels
    (N,) or (B, T); computed in float32 whatever the autocast precision. ``masked``: rows
    labelled ``UNLABELLED`` (a transfer set's) take no hard term; the hard term is the mean
    over the labelled rows (0 if none), the soft term the mean over all."""
    s = student.flatten(0, -2).float()  # (N, C): a token is a sample for a language model
    loss = torch.zeros((), device=s.device)
    if alpha < 1 and masked:
        y = labels.flatten()
        ce = F.cross_entropy(s, y, ignore_index=UNLABELLED, reduction="sum")
        loss = loss + (1 - alpha) * ce / (y != UNLABELLED).sum().clamp(min=1)
    elif alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, labels.flatten())
    if alpha > 0:
        t = teacher.flatten(0, -2).float()
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      reduction="batchmean", log_target=True)  # sum over C, mean over N
        loss = loss + alpha * temperature**2 * kl
    return loss


def pack(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels (...,) and teacher logits (..., C) -> targets (..., 1 + C) float32."""
    return torch.cat([labels.unsqueeze(-1).float(), logits.float()], -1)


def unpack(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (..., 1 + C) -> labels (...,) int64 and teacher logits (..., C)."""
    return targets[..., 0].long(), targets[..., 1:]


class Ensemble(nn.Module):
    """Teachers whose logits are averaged (one teacher: itself)."""

    def __init__(self, members: list[nn.Module], *, scale: float = 1.0) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scale = scale  # calibration: the mean logits are divided by it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x).float()
        for m in self.members[1:]:
            out = out + m(x).float()
        return out / (len(self.members) * self.scale)


# Teachers are named by the user's own config (its candidates, or its registry's versions),
# which runs the code it names anyway: their artifacts load as trusted.
TEACHERS_TRUSTED = TrustPolicy(trust_code=True)


def load_ensemble(artifacts: list[str | Path], device: torch.device | None = None, *,
                  scale: float = 1.0) -> Ensemble:
    """The teachers' artifacts as one frozen model in eval mode (logits divided by
    ``scale``: its calibration)."""
    model = Ensemble([load_artifact(a, trust=TEACHERS_TRUSTED).model
                      for a in artifacts], scale=scale).eval()
    model.requires_grad_(False)
    return model.to(device) if device is not None else model


def calibration_scale(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the scalar that divides the logits (N, C) to
    minimize their log loss on ``labels`` (N,); searched on a log grid, then refined."""
    logits, labels = logits.float(), labels.long()

    def nll(t: float) -> float:
        return float(F.cross_entropy(logits / t, labels))

    grid = torch.logspace(-1.5, 1.5, 61).tolist()  # 0.03 .. 32
    best = min(grid, key=nll)
    fine = torch.logspace(-0.05, 0.05, 21).mul(best).tolist()
    return min(fine, key=nll)


@dataclass
class Distiller:
    """A student's distillation: the loss over packed targets and, where the teacher
    answers online (language models, loader map functions, jittered copies), the teacher
    that packs them."""

    temperature: float
    alpha: float
    logits_dir: Path | None = None  # stored teacher outputs (classification)
    teacher: nn.Module | None = None  # the online teacher
    splits: tuple[str, ...] = ("train",)  # what the student reads: + "unlabelled" (transfer)
    masked: bool = False  # some rows are unlabelled: the hard term skips them
    copies: int = 0  # jittered copies of each batch, labelled by the teacher alone
    noise: float = 0.0
    generator: torch.Generator | None = None  # the copies' noise, seeded

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels, teacher = unpack(targets)
        return kd_loss(out, teacher, labels, temperature=self.temperature, alpha=self.alpha,
                       masked=self.masked)

    def attach(self, batch: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, labels) -> (x, targets) with the online teacher's logits, on its device;
        with copies, the batch grows by its jittered copies (labelled UNLABELLED)."""
        if self.teacher is None:
            return batch
        x, y = batch
        device = next(self.teacher.parameters()).device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.copies:
            noise = torch.randn((self.copies, *x.shape), generator=self.generator,
                                dtype=x.dtype).to(device)  # (K, B, F)
            x = torch.cat([x, (x + self.noise * noise).flatten(0, 1)])
            y = torch.cat([y, y.new_full((self.copies * len(y),), UNLABELLED)])
        with torch.inference_mode():
            logits = self.teacher(x)
        return x, pack(y, logits)  # a normal tensor again

    @classmethod
    def for_candidate(cls, spec: Any, folder: CandidateDir, *, device: torch.device,
                      seed: int = 0) -> Distiller:
        """``spec``: the candidate's DistillConfig; ``folder``: its folder, where the
        pipeline wrote which teachers it learns from."""
        info = folder.read_teacher()
        transfer = spec.transfer
        common: dict[str, Any] = {"splits": tuple(info.get("splits", ["train"]))}
        if transfer is not None:
            common.update(masked=True, copies=transfer.copies, noise=transfer.noise,
                          generator=torch.Generator().manual_seed(seed))
        if info["logits_dir"] is not None:
            return cls(spec.temperature, spec.alpha, logits_dir=Path(info["logits_dir"]),
                       **common)
        teacher = load_ensemble([t["artifact"] for t in info["teachers"]], device,
                                scale=info.get("calibration", 1.0))
        return cls(spec.temperature, spec.alpha, teacher=teacher, **common)
