"""A candidate's ``distill`` section: which teacher(s) it learns from, and how.

The loss (Hinton et al. 2015), with ``s`` the student's logits, ``t`` the teacher's (an
ensemble's: the mean of its members' logits), ``y`` the labels and ``T`` the temperature:

    L = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

``alpha`` is the weight of the teacher's soft targets (torchdistill's KDLoss weights the two
terms the other way round), and the KL divergence is averaged per sample (per token for
language models): PyTorch's ``reduction="batchmean"``, not ``"mean"``, which would divide
it by the number of classes too. Nothing here imports torch.
"""

from __future__ import annotations

import graphlib
import re
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from distml.config.base import Strict

if TYPE_CHECKING:
    from distml.config.train import Candidate

_NAME = r"[A-Za-z0-9][\w.-]*"
REGISTERED = re.compile(rf"^{_NAME}(@{_NAME}|:\d+)$")  # name@alias or name:version
CANDIDATE = re.compile(rf"^{_NAME}$")


class TransferConfig(Strict):
    """The rows a student learns its teachers' answers on (the transfer set): the data's
    unlabelled split (data.split.unlabelled), the labelled training rows, and jittered copies
    of them. Unlabelled rows and copies carry the soft term alone."""

    labelled: bool = Field(
        True, description="The labelled training rows join (hard and soft terms); false: "
        "the student learns from the teachers alone.")
    copies: int = Field(
        0, ge=0, le=16, description="Jittered copies of each batch's rows, labelled by the "
        "teachers only (function matching); the teachers then answer online.")
    noise: float = Field(
        0.0, ge=0, description="Standard deviation of the Gaussian noise added to the copies' "
        "features (in their transformed units: standard deviations after standardize).")

    @field_validator("noise")
    @classmethod
    def _finite(cls, value: float) -> float:
        if value != value or value == float("inf"):
            raise ValueError(f"noise={value} is not a finite number; use e.g. 0.5")
        return value


class DistillConfig(Strict):
    """Knowledge distillation: train this candidate on a teacher's softened outputs as well
    as on the labels."""

    teacher: str | list[str] = Field(
        description="The teacher: another candidate of this run (trained first), a registered "
        "model as name@alias or name:version, or a list of them (an ensemble: their logits "
        "are averaged).")
    temperature: float = Field(
        2.0, gt=0, description="Softens both distributions (T); the soft term is scaled by "
        "T^2 so its gradients keep their size as T changes. Default chosen on tuning seeds "
        "(README).")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the teacher's soft targets: L = (1 - alpha) * "
        "CE(labels) + alpha * T^2 * KL(teacher || student); 0 is plain training.")
    transfer: TransferConfig | None = Field(
        None, description="Learn the teachers' answers on a transfer set: the data's "
        "unlabelled split, the labelled rows (transfer.labelled) and jittered copies "
        "(transfer.copies, transfer.noise); null: on the labelled training rows only.")
    calibrate: bool = Field(
        False, description="Temperature-scale the teachers' logits on the validation split "
        "(one scalar, minimizing their log loss) before the soft targets are taken, so an "
        "over-confident teacher's targets carry information (classification).")

    @field_validator("teacher")
    @classmethod
    def _valid_references(cls, value: str | list[str]) -> str | list[str]:
        refs = [value] if isinstance(value, str) else value
        if not refs:
            raise ValueError("an empty list names no teacher; give a candidate name, "
                             "name@alias, name:version, or a list of them")
        for ref in refs:
            if not (CANDIDATE.match(ref) or REGISTERED.match(ref)):
                raise ValueError(
                    f"{ref!r} is not a teacher reference; use a candidate name, a registered "
                    "model as name@alias or name:version, or a list of them")
        repeated = sorted({r for r in refs if refs.count(r) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} is listed twice; an ensemble "
                             "names each teacher once")
        return value

    @property
    def teachers(self) -> list[str]:
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def candidate_teachers(self) -> list[str]:
        """Teachers that are candidates of this run (the others are registered models)."""
        return [t for t in self.teachers if not is_registered(t)]

    def registered_teachers(self) -> list[str]:
        return [t for t in self.teachers if is_registered(t)]


def is_registered(ref: str) -> bool:
    """Whether a teacher reference names a registered model rather than a candidate."""
    return bool(REGISTERED.match(ref))


def check_teachers(candidates: list[Candidate], *, task: str | None = None) -> None:
    """Refuse teachers that cannot work: an unknown candidate, a candidate teaching itself or
    a cycle of teachers, and distillation of a task without logits (regression)."""
    names = {c.name: i for i, c in enumerate(candidates)}
    for i, c in enumerate(candidates):
        if c.distill is None:
            continue
        where = f"train.candidates[{i}].distill"
        if task == "regression":
            raise ValueError(
                f"{where}: distillation matches a teacher's class or token distribution, and "
                "a regression model has none; remove distill or use a classification or "
                "language-modeling task")
        if task == "language_modeling" and (c.distill.transfer or c.distill.calibrate):
            key = "transfer" if c.distill.transfer else "calibrate"
            raise ValueError(
                f"{where}.{key}: transfer sets and calibration are for classification; a "
                "language model's teacher answers online on every token the student reads "
                f"(remove {key})")
        for ref in c.distill.candidate_teachers():
            if ref not in names:
                raise ValueError(
                    f"{where}.teacher = {ref!r}: names no candidate of this run (candidates: "
                    f"{', '.join(names)}); name one of them, or a registered model as "
                    f"{ref}@production or {ref}:1")
            if ref == c.name:
                raise ValueError(f"{where}.teacher = {ref!r}: is the candidate itself; a "
                                 "teacher is another candidate or a registered model")
    cycle = _cycle(candidates)
    if cycle:
        first = names[cycle[0]]
        raise ValueError(
            f"train.candidates[{first}].distill.teacher: {' -> '.join(cycle)} teach each other "
            "in a cycle, but a teacher is trained before its student; remove one of these "
            "teachers")


def _edges(candidates: list[Candidate]) -> dict[str, list[str]]:
    """Student -> its candidate teachers."""
    return {c.name: (c.distill.candidate_teachers() if c.distill else []) for c in candidates}


def _cycle(candidates: list[Candidate]) -> list[str] | None:
    """A cycle of teachers, as student -> teacher -> ... -> student; None if none."""
    try:
        graphlib.TopologicalSorter(_edges(candidates)).prepare()
    except graphlib.CycleError as e:
        return e.args[1][::-1]  # graphlib lists it teacher-first
    return None


def training_order(candidates: list[Candidate], only: str | None = None) -> list[Any]:
    """The candidates with every teacher before its students (otherwise in config order);
    with ``only``, that candidate and the candidates it learns from, directly or not."""
    by_name = {c.name: c for c in candidates}
    edges = _edges(candidates)
    wanted = set(by_name) if only is None else _with_teachers(only, edges)
    order: list[Any] = []
    done: set[str] = set()

    def place(name: str) -> None:
        if name in done:
            return
        done.add(name)
        for dep in edges[name]:
            place(dep)
        order.append(by_name[name])

    for c in candidates:
        if c.name in wanted:
            place(c.name)
    return order


def _with_teachers(name: str, edges: dict[str, list[str]]) -> set[str]:
    found, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in found:
            found.add(n)
            todo += edges[n]
    return found
