"""MLflow tracking: one parent run per pipeline run, one child run per candidate.

The driver opens the parent run (the resolved config as params) and writes its ids to
``<run>/mlflow.json``; rank 0 of each candidate's training opens a child run from it (its
settings as params, metrics per step, every rank's system metrics per epoch, the model
artifact), keeping the child's id in its candidate folder so a restarted rank goes on
with the same run: a distributed run makes exactly one MLflow run per candidate. At the end the
driver logs the report and the selected model to the parent and registers that model.

Tracking never breaks training: the first failure (an unreachable server, a full disk) is
reported once, and MLflow tracking is off for the rest of the run; TensorBoard goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distml.config import Config
from distml.errors import ConfigError
from distml.fsutil import write_json_atomic, write_text_atomic
from distml.rundir import CandidateDir, RunDir
from distml.training.callbacks import Callback

logger = logging.getLogger(__name__)

_BATCH = 100  # MLflow's limit of params per log_batch call


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("monitor.mlflow is set, but MLflow is not installed: "
                          "pip install 'distml[mlflow]', or remove monitor.mlflow") from None
    # Fail fast on an unreachable server instead of MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(uri)


class _Tracker:
    """An MlflowClient whose first failure is reported once and turns it off."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.on = True

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.on:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            logger.warning("MLflow at %s: cannot %s (%s: %s); MLflow tracking is off for the "
                           "rest of this run, TensorBoard goes on", self.uri, what,
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.on = False
            return None

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.call("log params", self.client.log_batch, run_id, params=items[i:i + _BATCH])


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys: ``train.candidates.0.lr``."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and data:
        items = enumerate(data)
    else:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def tracking_uri(cfg: Config) -> str:
    ml = cfg.monitor.mlflow
    return ml.tracking_uri or f"sqlite:///{(cfg.output_dir / 'mlflow.db').resolve()}"


class PipelineTracking:
    """The parent run of one pipeline run (the driver's side)."""

    def __init__(self, tracker: _Tracker, run: RunDir, ids: dict[str, str]) -> None:
        self.tracker = tracker
        self.run = run
        self.ids = ids
        self.closed = False

    @property
    def run_id(self) -> str:
        return self.ids["parent_run_id"]

    @classmethod
    def start(cls, cfg: Config, run: RunDir) -> PipelineTracking | None:
        """Open (or, resuming, reopen) the parent run; None when MLflow is off or unreachable."""
        if cfg.monitor.mlflow is None:
            return None
        tracker = _Tracker(tracking_uri(cfg))
        if run.mlflow.is_file():  # a resumed run goes on in its parent run
            return cls(tracker, run, json.loads(run.mlflow.read_text()))
        client, name = tracker.client, cfg.monitor.mlflow.experiment or cfg.name
        exp = tracker.call("reach the tracking store", client.get_experiment_by_name, name)
        if not tracker.on:
            return None
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            artifacts = None if cfg.monitor.mlflow.tracking_uri else \
                (cfg.output_dir / "mlartifacts").resolve().as_uri()
            exp_id = tracker.call("create the experiment", client.create_experiment, name,
                                  artifact_location=artifacts)
        parent = tracker.call("create the pipeline run", client.create_run, exp_id,
                           run_name=run.name,
                           tags={"distml.run_dir": str(run.path),
                                 "distml.config_hash": cfg.hash()})
        if parent is None:
            return None
        ids = {"tracking_uri": tracker.uri, "experiment_id": exp_id,
               "parent_run_id": parent.info.run_id}
        tracker.log_params(parent.info.run_id, flatten(cfg.to_dict()))
        write_json_atomic(run.mlflow, ids)
        return cls(tracker, run, ids)

    def finish(self, cfg: Config, summary: dict[str, Any], selected_dir: Path) -> None:
        """Log the outcome, the report and the selected model; register the model."""
        from mlflow.entities import Metric

        t, client, run_id = self.tracker, self.tracker.client, self.run_id
        now = int(time.time() * 1000)
        metrics = {f"test/{k}": v for k, v in summary["test"].items()}
        metrics.update({f"stage_seconds/{s['name']}": s["seconds"] for s in summary["stages"]})
        t.call("log metrics", client.log_batch, run_id,
               metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        t.call("set tags", client.set_tag, run_id, "distml.selected", summary["selected"])
        if summary["data"].get("version"):
            t.call("set tags", client.set_tag, run_id, "distml.data_version",
                   summary["data"]["version"])
        for path in (self.run.report, self.run.summary, *self.run.plots()):
            if path.is_file():
                t.call("log the report", client.log_artifact, run_id, str(path), "report")
        t.call("log the model", client.log_artifacts, run_id, str(selected_dir), "model")
        if cfg.monitor.mlflow.register_model:
            self._register(cfg.model_name, summary)
        self.close("FINISHED")

    def _register(self, name: str, summary: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        t, client = self.tracker, self.tracker.client
        try:
            client.get_registered_model(name)
        except MlflowException:
            t.call("register the model", client.create_registered_model, name)
        run = t.call("read the pipeline run", client.get_run, self.run_id)
        if run is None:
            return
        reg = summary["registry"]
        t.call("register the model", client.create_model_version, name,
               source=f"{run.info.artifact_uri}/model", run_id=self.run_id,
               tags={"distml.registry_version": str(reg["version"]),
                     "distml.candidate": summary["selected"]})

    def close(self, status: str) -> None:
        """End the parent run with ``status`` (FINISHED, FAILED or KILLED), once."""
        if self.closed:
            return
        self.closed = True
        self.tracker.call("close the pipeline run", self.tracker.client.set_terminated,
                          self.run_id, status)


@contextlib.contextmanager
def pipeline_tracking(cfg: Config, run: RunDir) -> Iterator[PipelineTracking | None]:
    """The parent run for the duration of a block: FINISHED when it completes, FAILED when it
    raises, KILLED when interrupted. Every entry point that starts a run uses this, so no
    parent run stays RUNNING after its process gave up. None when MLflow is off."""
    tracking = PipelineTracking.start(cfg, run)
    try:
        yield tracking
    except BaseException as e:
        if tracking is not None:
            tracking.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if tracking is not None:
        tracking.close("FINISHED")


class MlflowCallback(Callback):
    """A candidate's child run, logged by rank 0 (a trainer callback)."""

    def __init__(self, run: RunDir, folder: CandidateDir, candidate: str,
                 params: dict[str, Any]) -> None:
        self.ids = json.loads(run.mlflow.read_text())
        self.folder = folder
        self.candidate = candidate
        self.params = params
        self.tracker = _Tracker(self.ids["tracking_uri"])
        self.run_id: str | None = None
        self.pending: list[Any] = []

    @classmethod
    def for_run(cls, run: RunDir, folder: CandidateDir, candidate: str,
                params: dict[str, Any]) -> MlflowCallback | None:
        """The callback if the pipeline opened a parent run (``mlflow.json``), else None."""
        return cls(run, folder, candidate, params) if run.mlflow.is_file() \
            else None

    def on_train_start(self, trainer: Any) -> None:
        saved = self.folder.mlflow_run_id
        if saved.is_file():  # a restarted rank: the same run goes on
            self.run_id = saved.read_text().strip()
            return
        t = self.tracker
        run = t.call("create the candidate's run", t.client.create_run,
                     self.ids["experiment_id"], run_name=self.candidate,
                     tags={"mlflow.parentRunId": self.ids["parent_run_id"],
                           "distml.candidate": self.candidate})
        if run is None:
            return
        self.run_id = run.info.run_id
        self.folder.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, self.run_id)
        t.log_params(self.run_id, self.params)

    def _add(self, prefix: str, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(f"{prefix}{k}", float(v), now, step)
                         for k, v in values.items() if isinstance(v, int | float)]

    def _flush(self) -> None:
        if self.run_id is None or not self.pending:
            return
        batch, self.pending = self.pending, []
        for i in range(0, len(batch), 1000):  # MLflow's limit of metrics per call
            self.tracker.call("log metrics", self.tracker.client.log_batch, self.run_id,
                              metrics=batch[i:i + 1000])

    def on_checkpoint(self, trainer: Any, step: int) -> None:
        self._flush()  # a restart resumes after this step: what came before must be logged

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        self._add("train/", {k: record[k] for k in ("loss", "lr", "samples_per_s")},
                  int(record["step"]))

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._add("val/", metrics, trainer.state.step)

    def on_epoch_end(self, trainer: Any, stats: dict[str, Any]) -> None:
        epoch = int(stats["epoch"])
        self._add("epoch/", {k: stats[k] for k in ("samples_per_s", "data_stall",
                                                    "peak_mem_bytes")}, epoch)
        for rank, system in enumerate(stats.get("system", [])):
            self._add(f"system/rank{rank}/", {k: v for k, v in system.items()
                                              if k != "samples"}, epoch)
        for rank, worker in stats.get("workers", {}).items():  # parameter servers
            self._add(f"workers/rank{rank}/", worker, epoch)
        self._add("staleness/", stats.get("staleness", {}), epoch)
        self._flush()

    def on_train_end(self, trainer: Any) -> None:
        self._flush()

    def finish(self, artifact_dir: Path, val_metrics: dict[str, float]) -> None:
        """After the artifact is saved: log it and the final metrics, close the run."""
        if self.run_id is None:
            return
        self._add("final_val/", val_metrics, 0)
        self._flush()
        t = self.tracker
        t.call("log the model", t.client.log_artifacts, self.run_id, str(artifact_dir), "model")
        t.call("close the candidate's run", t.client.set_terminated, self.run_id, "FINISHED")


def end_candidate_run(run: RunDir, folder: CandidateDir, status: str | None,
                      tags: dict[str, str]) -> None:
    """Tag a candidate's child run (a search trial: pruned or not) and, with ``status``,
    end it (FAILED: the trial raised before ``MlflowCallback.finish``). Nothing when the
    run tracks nothing in MLflow or the candidate never opened its child run."""
    if not run.mlflow.is_file() or not folder.mlflow_run_id.is_file():
        return
    tracker = _Tracker(json.loads(run.mlflow.read_text())["tracking_uri"])
    run_id = folder.mlflow_run_id.read_text().strip()
    for key, value in tags.items():
        tracker.call("tag the candidate's run", tracker.client.set_tag, run_id, key, value)
    if status is not None:
        tracker.call("close the candidate's run", tracker.client.set_terminated, run_id,
                     status)
