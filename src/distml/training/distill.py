"""Knowledge distillation: the loss, the teacher, and how a student's batches meet it.

    L = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

(Hinton et al. 2015.) ``alpha`` weights the teacher's soft targets (torchdistill's KDLoss
weights the terms the other way round); T^2 keeps the soft term's gradients the same size
as T changes (they shrink as 1/T^2). The KL divergence is summed over classes and averaged
over samples (tokens, for a language model): ``reduction="batchmean"``. ``"mean"`` would
also divide by the number of classes, the most common distillation bug in public code.

Where the teacher's logits come from:

- classification: computed once, before the student trains, over the training partitions
  on the executors, and stored next to the data (``distml.data.teacher_logits``); the
  loader packs them into each row's targets.
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

def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
            temperature: float, alpha: float) -> torch.Tensor:
    """The distillation loss (module docstring) of logits (N, C) or (B, T, V) and labels
    (N,) or (B, T); computed in float32 whatever the autocast precision."""
    s = student.flatten(0, -2).float()  # (N, C): a token is a sample for a language model
    loss = torch.zeros((), device=s.device)
    if alpha < 1:
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

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x).float()
        for m in self.members[1:]:
            out = out + m(x).float()
        return out / len(self.members)


# Teachers are named by the user's own config (its candidates, or its registry's versions),
# which runs the code it names anyway: their artifacts load as trusted.
TEACHERS_TRUSTED = TrustPolicy(trust_code=True)


def load_ensemble(artifacts: list[str | Path], device: torch.device | None = None) -> Ensemble:
    """The teachers' artifacts as one frozen model in eval mode."""
    model = Ensemble([load_artifact(a, trust=TEACHERS_TRUSTED).model
                      for a in artifacts]).eval()
    model.requires_grad_(False)
    return model.to(device) if device is not None else model


@dataclass
class Distiller:
    """A student's distillation: the loss over packed targets and, for language models, the
    online teacher that packs them."""

    temperature: float
    alpha: float
    logits_dir: Path | None = None  # stored teacher outputs (classification)
    teacher: nn.Module | None = None  # the online teacher (language modeling)

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels, teacher = unpack(targets)
        return kd_loss(out, teacher, labels, temperature=self.temperature, alpha=self.alpha)

    def attach(self, batch: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, labels) -> (x, targets) with the online teacher's logits, on its device."""
        if self.teacher is None:
            return batch
        x, y = batch
        device = next(self.teacher.parameters()).device
        x = x.to(device, non_blocking=True)
        with torch.inference_mode():
            logits = self.teacher(x)
        return x, pack(y.to(device, non_blocking=True), logits)  # a normal tensor again

    @classmethod
    def for_candidate(cls, spec: Any, folder: CandidateDir, *, device: torch.device
                      ) -> Distiller:
        """``spec``: the candidate's DistillConfig; ``folder``: its folder, where the
        pipeline wrote which teachers it learns from."""
        info = folder.read_teacher()
        if info["logits_dir"] is not None:
            return cls(spec.temperature, spec.alpha, logits_dir=Path(info["logits_dir"]))
        teacher = load_ensemble([t["artifact"] for t in info["teachers"]], device)
        return cls(spec.temperature, spec.alpha, teacher=teacher)
