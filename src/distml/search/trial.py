"""One trial, in an executor's worker: a distml candidate run with the sampled values.

The trial is ``candidates/<name>-trial-<n>/`` of the run (its checkpoints, artifact and
result), ``tensorboard/<name>-trial-<n>`` and an MLflow child run of the pipeline's run.
At every evaluation it reports the validation metric to the study's storage, and stops
when the pruner (reading the other trials' reports from the same storage) says so. Any
failure of the trial (a value the model cannot take, a NaN loss) comes back as a failed
outcome with its reason; only the worker's death escapes, and the driver records that.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from distml.config import Config
from distml.data.dataset import Manifest
from distml.data.tensors import SplitTensors
from distml.rundir import RunDir
from distml.search.space import make_pruner, open_storage
from distml.training.callbacks import Callback
from distml.training.candidate import train_candidate
from distml.training.telemetry.mlflow_tracking import end_candidate_run

logger = logging.getLogger(__name__)


class TrialFailedError(Exception):
    """The trial cannot go on (a NaN loss); its message is the failed trial's reason."""


@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run trial ``number``: plain data, it travels to the worker."""

    run_dir: str
    candidate: str
    number: int
    trial_id: int
    study: str
    storage: str
    values: dict[str, Any]
    threads: int = 1

    @property
    def name(self) -> str:
        return trial_name(self.candidate, self.number)


def trial_name(candidate: str, number: int) -> str:
    """The trial's candidate name (its folder, TensorBoard folder and MLflow run)."""
    return f"{candidate}-trial-{number}"


class ReportToStudy(Callback):
    """Feeds each evaluation's metric to the trial and stops training when it is pruned;
    fails the trial on a loss that is not finite."""

    def __init__(self, trial: optuna.trial.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned = False
        self.curve: list[tuple[float, float]] = []  # (wall clock, value) per evaluation

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        if not math.isfinite(record["loss"]):
            raise TrialFailedError(f"the training loss is {record['loss']} at step "
                              f"{int(record['step'])}")

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics[self.metric]
        if not math.isfinite(value):
            raise TrialFailedError(f"validation {self.metric} is {value} at step "
                              f"{trainer.state.step}")
        self.curve.append((time.time(), value))
        self.trial.report(value, step=len(trainer.state.evals))  # the resource: evaluations
        # The last evaluation ends training anyway: a trial trained to the end completes
        # (and may be the best) rather than being pruned with nothing saved.
        if trainer.state.step < trainer.total_steps and self.trial.should_prune():
            self.pruned = True
            trainer.stop_requested = True


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Run the trial; returns its outcome: state (complete, pruned or failed), value,
    reason, evaluations, start and end (wall clock, seconds since the epoch), the curve
    (wall clock and metric at each evaluation) and the host it ran on."""
    start = time.time()
    os.environ["OMP_NUM_THREADS"] = str(job.threads)  # what init_distributed gives torch
    run = RunDir(Path(job.run_dir))
    cfg = run.load_config()
    searched = cfg.train.candidate(job.candidate)
    assert searched.search is not None
    study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage,
                                                                         checked=True),
                              pruner=make_pruner(searched.search))
    report = ReportToStudy(optuna.trial.Trial(study, job.trial_id), cfg.metric)
    outcome: dict[str, Any] = {"number": job.number, "name": job.name, "start": start,
                               "values": job.values, "host": socket.gethostname()}
    try:
        result = _train(cfg, run, job, report)
    except Exception as e:  # noqa: BLE001 - a failed trial is an outcome, not a crash
        logger.info("trial %s failed: %s", job.name, traceback.format_exc())
        end_candidate_run(run, run.candidate(job.name), "FAILED",
                          {"distml.trial_state": "failed"})
        return {**outcome, "state": "failed", "value": None, "evals": None,
                "reason": f"{type(e).__name__}: {e}", "end": time.time(),
                "curve": report.curve}
    state = "pruned" if report.pruned else "complete"
    end_candidate_run(run, run.candidate(job.name), None, {"distml.trial_state": state})
    return {**outcome, "state": state, "value": result["val"][cfg.metric], "reason": None,
            "evals": len(result["history"]["evals"]), "end": time.time(),
            "curve": report.curve}


def _train(cfg: Config, run: RunDir, job: TrialJob, report: ReportToStudy
           ) -> dict[str, Any]:
    """The searched candidate with the trial's values, trained as one candidate of the run."""
    searched = cfg.train.candidate(job.candidate)
    trial = searched.with_values(job.values, name=job.name)
    candidates = [trial if c.name == job.candidate else c for c in cfg.train.candidates]
    trial_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"candidates": candidates})})
    trial_cfg.train.settings_for(trial).check_model(trial.model)
    manifest = Manifest.read(run.data)
    val = SplitTensors.load(manifest, "val")
    result = train_candidate(trial_cfg, trial, manifest, val=val, run=run, callbacks=[report])
    assert result is not None  # one process: rank 0
    return result
