"""Train one candidate end to end: build from spec, fit, evaluate, save its artifact."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distml.artifact import git_revision, io_schema, save_artifact
from distml.config import Candidate, Config, TrainSettings
from distml.data.dataset import Manifest
from distml.data.elastic import ElasticDeal
from distml.data.loader import PartitionLoader
from distml.data.tensors import SplitTensors
from distml.data.versions import lineage
from distml.distributed.runtime import DistEnv, init_distributed
from distml.distributed.strategy import make_strategy
from distml.imports import load_object
from distml.models import VOCAB_SIZE, build_model, check_fits, count_parameters, resolve_spec
from distml.models.click import tables_elsewhere
from distml.rundir import CandidateDir, RunDir
from distml.tasks import evaluate, output_shape
from distml.training.distill import Distiller
from distml.training.telemetry.mlflow_tracking import MlflowCallback, flatten
from distml.training.telemetry.system import SystemSampler
from distml.training.telemetry.tensorboard import TensorBoardCallback
from distml.training.trainer import TrainState

logger = logging.getLogger(__name__)


def num_outputs(manifest: Manifest) -> int:
    if manifest.task == "language_modeling":
        return VOCAB_SIZE
    return 1 if manifest.task == "regression" else len(manifest.classes)


def input_width(manifest: Manifest) -> int:
    """Features per row, or tokens per sequence for language modeling."""
    return manifest.sequence_length or manifest.num_features


def build_candidate_model(
    cfg: Config, candidate: Candidate, manifest: Manifest, sample: torch.Tensor
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Seeded initial weights, checked against real input rows before any training."""
    where = f"train.candidates[{cfg.train.candidates.index(candidate)}].model"
    spec = resolve_spec(
        candidate.model, task=manifest.task, num_features=input_width(manifest),
        num_outputs=num_outputs(manifest), where=where,
    )
    torch.manual_seed(cfg.seed)
    # Under parameter servers a click model's tables live on the row servers: no rank
    # builds them whole.
    servers = cfg.train.settings_for(candidate).parallel.record.servers
    with tables_elsewhere() if servers else contextlib.nullcontext():
        model = build_model(spec)
    expected = output_shape(manifest.task, num_outputs=num_outputs(manifest),
                            sequence_length=manifest.sequence_length)
    check_fits(model, sample, expected, where)
    return model, spec


def train_loader(cfg: Config, manifest: Manifest, settings: TrainSettings, *, rank: int,
                 replicas: int, drop_last: bool, distiller: Distiller | None = None
                 ) -> PartitionLoader:
    """The training batches of data-parallel replica ``rank`` of ``replicas`` (every rank of
    one replica reads the same ones): each optimizer step's global batch is split among the
    replicas, then among the accumulated micro-batches. A distilled student's targets carry
    its teacher's stored logits, and with a transfer set it reads the unlabelled split too."""
    return PartitionLoader(
        manifest, distiller.splits if distiller is not None else "train", seed=cfg.seed,
        rank=rank, world_size=replicas,
        batch_size=settings.batch_size // (replicas * settings.grad_accum_steps),
        config=cfg.data.loader, drop_last=drop_last,
        teacher_logits=distiller.logits_dir if distiller is not None else None,
        elastic=elastic_deal(settings))


def at_world_size(settings: TrainSettings, world: int) -> TrainSettings:
    """An elastic job's settings at the size its nodes made (the config's, otherwise)."""
    p = settings.parallel
    if not p.elastic or world == p.world_size:
        return settings
    parallel = p.model_copy(update={"world_size": world, "num_nodes": world // p.procs_per_node})
    return settings.model_copy(update={"parallel": parallel})


def elastic_deal(settings: TrainSettings) -> ElasticDeal | None:
    """An elastic job's deal (the global batch kept at every size), else None."""
    p = settings.parallel
    if not p.elastic:
        return None
    return ElasticDeal(settings.batch_size, settings.grad_accum_steps, max(p.world_sizes))


def distiller_for(candidate: Candidate, folder: CandidateDir, device: torch.device, *,
                  seed: int = 0) -> Distiller | None:
    """The candidate's distillation (its teachers prepared in ``folder``), if it has one."""
    if candidate.distill is None:
        return None
    return Distiller.for_candidate(candidate.distill, folder, device=device, seed=seed)


def train_candidate(
    cfg: Config,
    candidate: Candidate,
    manifest: Manifest,
    *,
    val: SplitTensors,
    run: RunDir,
    env: DistEnv | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any] | None:
    """Train on this rank, evaluate, and (rank 0) save the candidate's artifact and result
    in ``run``.

    Every rank builds the same initial weights (seeded); the strategy shards or replicates
    them. Returns the result on rank 0, None on the others.
    """
    env = env or init_distributed()
    settings = at_world_size(cfg.train.settings_for(candidate), env.world_size)
    folder = run.candidate(candidate.name)
    model, spec = build_candidate_model(cfg, candidate, manifest, val.x[:2])
    strategy = make_strategy(settings.parallel.strategy, model, settings, env,
                             sample=val.x[:16])
    distiller = distiller_for(candidate, folder, env.device, seed=cfg.seed)
    loader = train_loader(cfg, manifest, settings, rank=strategy.data_rank,
                          replicas=strategy.data_size, drop_last=strategy.needs_full_batches,
                          distiller=distiller)
    callbacks, mlflow = _telemetry(cfg, candidate, run, settings, spec, env, callbacks)
    interval = cfg.monitor.system_metrics_interval_s
    system = SystemSampler(interval).start() if interval else None
    trainer_class = load_object(settings.parallel.record.trainer, what="trainer")
    # A student's loss (and online teacher) go to the loop; the config refuses a student
    # whose strategy's loop takes none.
    student = {} if distiller is None else {
        "loss": distiller.loss, "prepare_batch": distiller.attach if distiller.teacher else None}
    trainer = trainer_class(
        strategy, settings, task=manifest.task, train_loader=loader, val_data=(val.x, val.y),
        metric=cfg.metric, checkpoint_dir=folder.checkpoints, callbacks=callbacks,
        system=system, **student,
    )
    start = time.perf_counter()
    try:
        state = trainer.fit(resume=resume)
    finally:
        if system is not None:
            system.stop()
    full = strategy.full_state_dict()  # collectives: every rank takes part
    peaks = trainer.peak_memory_per_rank()
    if not env.is_main:
        return None
    model = build_model(spec)
    model.load_state_dict(full)
    val_metrics, _ = evaluate(manifest.task, model, val.x, val.y)
    artifact = _save_artifact(cfg, candidate, manifest, model, spec, val_metrics, folder)
    result = {
        "name": candidate.name, "strategy": settings.parallel.strategy,
        "world_size": env.world_size, "params": count_parameters(model), "val": val_metrics,
        **_progress(state, peaks), "wall_seconds": time.perf_counter() - start,
        "artifact": str(artifact),
        "distill": None if candidate.distill is None else candidate.distill.model_dump(),
        **trainer.result_extras(),
    }
    folder.write_result(result)
    if mlflow is not None:
        mlflow.finish(artifact, val_metrics)
    return result


def _progress(state: TrainState, peaks: list[int]) -> dict[str, Any]:
    """result.json's account of the training itself: steps, time, throughput, memory."""
    return {
        "steps": state.step,
        "best_step": state.best_step,
        "train_seconds": state.seconds,
        "step_seconds": state.seconds / max(state.step, 1),
        "samples_per_s": _mean([e["samples_per_s"] for e in state.epochs]),
        "data_stall": _mean([e["data_stall"] for e in state.epochs]),
        "peak_mem_bytes_per_rank": peaks,
        "epochs": state.epochs,
        "history": {"train_loss": state.train_loss, "evals": state.evals},
        **({"elastic": {"membership_changes": state.membership_changes,
                        "epoch_samples": state.epoch_samples}}
           if state.epoch_samples or state.membership_changes else {}),
    }


def _telemetry(cfg: Config, candidate: Candidate, run: RunDir, settings: TrainSettings,
               spec: dict[str, Any], env: DistEnv, callbacks: Sequence[Any]
               ) -> tuple[list[Any], MlflowCallback | None]:
    """The caller's callbacks, then TensorBoard's (``<run>/tensorboard/<candidate>``) and, on
    rank 0, the MLflow child run's (also returned, to be finished with the artifact)."""
    callbacks = list(callbacks)
    if cfg.monitor.tensorboard:
        callbacks.append(TensorBoardCallback(run.tensorboard(candidate.name),
                                             histogram_every=cfg.monitor.histogram_every_steps))
    mlflow = MlflowCallback.for_run(
        run, run.candidate(candidate.name), candidate.name,
        {**settings.model_dump(mode="json"), **flatten({"model": spec})},
    ) if env.is_main else None
    if mlflow is not None:
        callbacks.append(mlflow)
    return callbacks, mlflow


def _save_artifact(cfg: Config, candidate: Candidate, manifest: Manifest, model: nn.Module,
                   spec: dict[str, Any], val_metrics: dict[str, float], folder: CandidateDir
                   ) -> Path:
    """The trained model as an artifact in the candidate's folder, with its spec."""
    raw_width = len(manifest.input_columns) or input_width(manifest)
    inputs, outputs = io_schema(manifest.task, num_features=raw_width,
                                num_outputs=num_outputs(manifest))
    return save_artifact(model, {
        "name": cfg.model_name, "candidate": candidate.name, "task": manifest.task,
        "model": spec, "inputs": inputs, "outputs": outputs,
        "input_columns": manifest.input_columns, "feature_names": manifest.feature_names,
        "labels": manifest.classes,
        "preprocessing": manifest.preprocessing, "metrics": {"val": val_metrics},
        "data_dir": str(manifest.root.resolve()),  # its validation split checks int8 serving
        "select_metric": cfg.metric, "config_hash": cfg.hash(), "git_revision": git_revision(),
        "data_version": manifest.version, "data_lineage": lineage(manifest),
        **({} if candidate.distill is None else {"distilled_from": _teachers(folder)}),
    }, folder.artifact)


def _teachers(folder: CandidateDir) -> dict[str, Any]:
    """What a distilled student's spec records of its teachers."""
    info = folder.read_teacher()
    return {"teachers": [{k: t[k] for k in ("ref", "name", "version")} for t in info["teachers"]],
            "temperature": info["temperature"], "alpha": info["alpha"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
