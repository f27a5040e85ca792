"""Distillation in the pipeline: find each student's teachers, check that they fit this run's
data, calibrate them on the validation split if asked, compute their outputs for
classification once (in parallel over the training and unlabelled partitions, on the
executors), and measure teacher, student and twin for the report. Which splits a student
reads (``student_splits``: its transfer set) and the calibration go to its teacher.json.

A student's teachers are written to its candidate folder (``CandidateDir.teacher``), which
the training processes read (``distml.training.distill.Distiller``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distml.artifact import SPEC, WEIGHTS, load_artifact, read_spec
from distml.config import Candidate, Config, ExecutionConfig
from distml.config.distill import is_registered
from distml.data.dataset import Manifest, read_partition
from distml.data.teacher_logits import (
    is_complete,
    read_row_ids,
    store_root,
    write_logits,
    write_store_manifest,
)
from distml.data.tensors import SplitTensors
from distml.errors import ArtifactError, ConfigError, DistmlError
from distml.execution import make_executor
from distml.execution.base import ProgressFactory
from distml.models import count_parameters
from distml.registry import Registry
from distml.rundir import RunDir
from distml.tasks import evaluate, predict
from distml.training.distill import TEACHERS_TRUSTED as OWN  # this run's own artifacts
from distml.training.distill import calibration_scale, load_ensemble

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Teacher:
    ref: str  # as the config names it
    name: str  # the candidate or registered model
    version: int | None  # registered models only
    artifact: str


def _where(cfg: Config, cand: Candidate) -> str:
    return f"train.candidates[{cfg.train.candidates.index(cand)}].distill.teacher"


def resolve_teachers(cfg: Config, cand: Candidate, run: RunDir, manifest: Manifest
                     ) -> list[Teacher]:
    """The student's teachers as artifacts, each checked against this run's data."""
    assert cand.distill is not None
    where, teachers = _where(cfg, cand), []
    for ref in cand.distill.teachers:
        if is_registered(ref):
            try:
                v = Registry(cfg.registry).resolve(ref)
            except ArtifactError as e:
                raise ConfigError(f"{where}={ref!r}: {e}") from None
            teacher = Teacher(ref, v.name, v.version, str(v.path.resolve()))
        else:
            path = run.candidate(ref).artifact
            if not (path / SPEC).is_file():
                raise DistmlError(f"{where}={ref!r}: the teacher candidate has no artifact at "
                                  f"{path}; it trains before its student (train it first)")
            teacher = Teacher(ref, ref, None, str(path.resolve()))
        check_fits(read_spec(Path(teacher.artifact)), manifest, f"{where}={ref!r}")
        teachers.append(teacher)
    return teachers


def check_fits(spec: dict[str, Any], manifest: Manifest, where: str) -> None:
    """A teacher must answer this run's question about this run's inputs."""
    if spec["task"] != manifest.task:
        raise ConfigError(f"{where} is a {spec['task']} model, but this run's data is a "
                          f"{manifest.task} task; distill from a {manifest.task} model")
    if manifest.task == "language_modeling":
        context = spec["model"]["kwargs"].get("context_length")
        if context is not None and context < manifest.sequence_length:
            raise ConfigError(f"{where} reads at most {context} tokens, but the data's "
                              f"sequences have {manifest.sequence_length}; use a teacher with "
                              "a longer context_length or shorten data.source.sequence_length")
        return
    if spec.get("labels") != manifest.classes:
        raise ConfigError(f"{where} predicts the classes {spec.get('labels')}, but this run's "
                          f"data has {manifest.classes}; use a teacher trained on these classes")
    if (spec.get("feature_names") != manifest.feature_names
            or spec.get("preprocessing") != manifest.preprocessing):
        raise ConfigError(f"{where} was trained on differently prepared inputs (its features "
                          "or fitted preprocessing differ from this run's); use a teacher "
                          "trained with the same data config and seed")


def check_registered_teachers(cfg: Config, candidates: list[Candidate], manifest: Manifest
                              ) -> None:
    """Before anything trains: every registered teacher exists and fits the data."""
    for cand in candidates:
        if cand.distill is None:
            continue
        for ref in cand.distill.registered_teachers():
            where = f"{_where(cfg, cand)}={ref!r}"
            try:
                version = Registry(cfg.registry).resolve(ref)
            except ArtifactError as e:
                raise ConfigError(f"{where}: {e}") from None
            check_fits(read_spec(version.path), manifest, where)


def prepare_teachers(cfg: Config, cand: Candidate, run: RunDir, manifest: Manifest, *,
                     progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Resolve the student's teachers and (classification) compute their outputs; writes
    the student's ``teacher.json`` and returns it.

    Stored outputs are the teachers' answers to the stored rows. A loader ``map_fn`` (an
    augmentation, say) changes the rows the student sees, so then the teachers answer
    online, on the very inputs the student gets, as they do for language models."""
    spec = cand.distill
    assert spec is not None
    teachers = resolve_teachers(cfg, cand, run, manifest)
    splits = student_splits(cfg, cand, manifest)
    scale = calibrate(teachers, manifest) if spec.calibrate else 1.0
    logits_dir = None
    if (manifest.task == "classification" and cfg.data.loader.map_fn is None
            and not (spec.transfer and spec.transfer.copies)):
        logits_dir = str(teacher_logits(manifest, teachers, cfg.execution, scale=scale,
                                        progress=progress))
    info = {"teachers": [asdict(t) for t in teachers], "logits_dir": logits_dir,
            "temperature": spec.temperature, "alpha": spec.alpha, "splits": splits,
            "calibration": scale}
    run.candidate(cand.name).write_teacher(info)
    return info


def student_splits(cfg: Config, cand: Candidate, manifest: Manifest) -> list[str]:
    """The splits a student reads: the training rows, and with a transfer set the data's
    unlabelled rows too (or those alone, with transfer.labelled: false)."""
    transfer = cand.distill.transfer if cand.distill else None
    if transfer is None:
        return ["train"]
    splits = (["train"] if transfer.labelled else []) + (
        ["unlabelled"] if manifest.rows("unlabelled") else [])
    if not splits:
        where = f"train.candidates[{cfg.train.candidates.index(cand)}].distill.transfer"
        raise ConfigError(f"{where}.labelled=false, and the data has no unlabelled rows "
                          f"(data.split.unlabelled={cfg.data.split.unlabelled}): the student "
                          "would read nothing; set data.split.unlabelled (e.g. 0.5) or "
                          "transfer.labelled: true")
    return splits


def calibrate(teachers: list[Teacher], manifest: Manifest) -> float:
    """The teachers' (mean) logits' temperature scale, fitted on the validation split."""
    val = SplitTensors.load(manifest, "val")
    logits = predict(load_ensemble([t.artifact for t in teachers]), val.x)
    scale = calibration_scale(logits, val.y)
    logger.info("teachers %s calibrated on %d validation rows: logits / %.3f",
                [t.ref for t in teachers], len(val.y), scale)
    return scale


# -- the teachers' outputs, over the training partitions ------------------------------------


@dataclass(frozen=True)
class LogitsJob:
    artifacts: tuple[str, ...]
    data_root: str
    out_root: str
    scale: float = 1.0


def _store_key(teachers: list[Teacher], scale: float = 1.0) -> str:
    """Hash of the teachers' weights and specs, in order (the mean is taken in that order),
    and of their calibration."""
    digest = hashlib.sha256(b"" if scale == 1.0 else repr(scale).encode())
    for t in teachers:
        for name in (WEIGHTS, SPEC):
            with open(Path(t.artifact) / name, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def teacher_logits(manifest: Manifest, teachers: list[Teacher], execution: ExecutionConfig,
                   *, scale: float = 1.0,
                   progress: ProgressFactory | None = None) -> Path:
    """The store of the teachers' (mean, divided by ``scale``) logits for every row of the
    training and unlabelled splits; computed once per set of teachers and data version
    (the store lives in the data's folder), one work item per partition."""
    root = store_root(manifest, _store_key(teachers, scale))
    if is_complete(root):
        logger.info("teacher outputs already computed at %s", root)
        return root
    parts = [p["path"] for s in ("train", "unlabelled") for p in manifest.partitions(s)]
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    job = LogitsJob(tuple(t.artifact for t in teachers), str(manifest.root), str(tmp), scale)
    workers = min(execution.num_workers or os.cpu_count() or 1, len(parts))
    try:
        with make_executor(execution.executor, num_workers=workers, retries=execution.retries,
                           progress=progress) as ex:
            rows = sum(ex.map(functools.partial(logits_part, job), parts,
                              desc="teacher logits"))
        write_store_manifest(tmp, {"teachers": [t.ref for t in teachers], "rows": rows,
                                   "artifacts": list(job.artifacts)})
        try:
            os.replace(tmp, root)
        except OSError:  # another run finished the same store first
            if not is_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


_ENSEMBLES: dict[tuple[str, ...], torch.nn.Module] = {}  # per worker: loaded once


def logits_part(job: LogitsJob, rel_path: str) -> int:
    """One work item: the teachers' mean logits for one partition, keyed by row id."""
    key = (*job.artifacts, str(job.scale))
    if key not in _ENSEMBLES:
        _ENSEMBLES[key] = load_ensemble(list(job.artifacts), scale=job.scale)
    manifest = Manifest.read(Path(job.data_root))
    x, _ = read_partition(manifest, rel_path)
    logits = predict(_ENSEMBLES[key], torch.from_numpy(x))
    write_logits(Path(job.out_root), rel_path, read_row_ids(manifest, rel_path), logits.numpy())
    return len(x)


# -- the report's table ----------------------------------------------------------------------


def latency_ms(model: torch.nn.Module, x: torch.Tensor, *, repeats: int = 30) -> float:
    """Median milliseconds of one forward pass on ``x`` (one row: a served request)."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            start = time.perf_counter()
            model(x)
            if i >= 5:  # the first calls warm caches and allocators
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _measure(model: torch.nn.Module, test: SplitTensors, task: str, metric: str) -> dict[str, Any]:
    metrics, _ = evaluate(task, model, test.x, test.y)
    return {"test": metrics[metric], "params": count_parameters(model),
            "latency_ms": latency_ms(model, test.x[:1])}


def twin_of(cfg: Config, student: Candidate) -> Candidate | None:
    """A candidate that is the student trained alone: the same model and settings, no
    teacher (the seed is the run's, so the same initial weights and batches)."""
    settings = cfg.train.settings_for(student)
    for c in cfg.train.candidates:
        if (c.distill is None and c.model == student.model
                and cfg.train.settings_for(c) == settings):
            return c
    return None


def distillation_rows(cfg: Config, run: RunDir, manifest: Manifest
                      ) -> list[dict[str, Any]]:
    """Per distilled student: teacher, twin trained alone, student; test metric, parameters
    and latency of each, and the fraction of the teacher-twin gap the student recovered."""
    metric, rows, test = cfg.metric, [], None
    for cand in cfg.train.candidates:
        folder = run.candidate(cand.name)
        if cand.distill is None or not (folder.artifact / SPEC).is_file():
            continue
        if test is None:
            test = SplitTensors.load(manifest, "test")
        teachers = folder.read_teacher()["teachers"]
        row: dict[str, Any] = {
            "student": cand.name, "teachers": [t["ref"] for t in teachers], "metric": metric,
            "temperature": cand.distill.temperature, "alpha": cand.distill.alpha,
            "teacher": _measure(load_ensemble([t["artifact"] for t in teachers]), test,
                                manifest.task, metric),
            "distilled": _measure(load_artifact(folder.artifact, trust=OWN).model, test,
                                  manifest.task, metric),
            "alone": None, "twin": None, "gap_recovered": None,
        }
        twin = twin_of(cfg, cand)
        twin_dir = run.candidate(twin.name).artifact if twin else None
        if twin_dir is not None and (twin_dir / SPEC).is_file():
            row["twin"] = twin.name
            row["alone"] = _measure(load_artifact(twin_dir, trust=OWN).model, test,
                                    manifest.task, metric)
            gap = row["teacher"]["test"] - row["alone"]["test"]
            if gap != 0:
                row["gap_recovered"] = (row["distilled"]["test"] - row["alone"]["test"]) / gap
        rows.append(row)
    return rows
