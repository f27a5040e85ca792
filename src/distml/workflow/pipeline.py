"""The pipeline: ingest -> train candidates -> select + register -> report, each stage timed.

Ingested data is cached by the hash of its inputs under ``<output_dir>/<name>/data-<hash>``
and linked from each run directory, so runs that share a data config ingest once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from distml.artifact import load_artifact, read_spec, save_artifact
from distml.config import Candidate, Config
from distml.data.dataset import Manifest
from distml.data.ingest import ingest
from distml.data.sources import open_source
from distml.data.tensors import SplitTensors
from distml.distributed.launch import launch_training
from distml.drift.reference import build_reference, write_reference
from distml.errors import DistmlError
from distml.execution import make_executor
from distml.execution.base import ProgressHandle, no_progress
from distml.fsutil import write_json_atomic, write_text_atomic
from distml.registry import PRODUCTION, Registry
from distml.selection import is_better, rank
from distml.tasks import evaluate
from distml.training.callbacks import Callback
from distml.training.candidate import RESULT, train_candidate
from distml.training.telemetry.mlflow_tracking import pipeline_tracking
from distml.trust import TrustPolicy
from distml.workflow.distill import (
    check_registered_teachers,
    distillation_rows,
    prepare_teachers,
)
from distml.workflow.report import latest_scaling_studies, write_report

logger = logging.getLogger(__name__)

_RUN_NAME = "%Y%m%d-%H%M%S"


class Reporter(Protocol):
    """How the pipeline shows progress; the CLI supplies a rich or plain implementation."""

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]: ...
    def progress(self, desc: str, total: int) -> ProgressHandle: ...
    def training_callbacks(self, candidate: str) -> Sequence[Callback]: ...


class NullReporter:
    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def progress(self, desc: str, total: int) -> ProgressHandle:
        return no_progress(desc, total)

    def training_callbacks(self, candidate: str) -> Sequence[Callback]:
        return ()


@dataclass
class Run:
    """One pipeline run: its config, folder and stage timings."""

    cfg: Config
    dir: Path
    reporter: Reporter = field(default_factory=NullReporter)
    stages: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.reporter.stage(name):
            yield
        self.stages.append({"name": name, "seconds": round(time.perf_counter() - start, 3)})

    @property
    def project_dir(self) -> Path:
        return self.cfg.output_dir / self.cfg.name


def start_run(cfg: Config, *, resume: bool = False, reporter: Reporter | None = None) -> Run:
    """A new run folder (or, with ``resume``, the newest one) holding the resolved config."""
    project = cfg.output_dir / cfg.name
    if resume:
        runs = sorted(p for p in project.glob("2*") if p.is_dir()) if project.is_dir() else []
        if not runs:
            raise DistmlError(f"nothing to resume: no run of {cfg.name!r} under {project}")
        run_dir = runs[-1]
    else:
        project.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime(_RUN_NAME)
        for i in range(1000):
            run_dir = project / (stamp if i == 0 else f"{stamp}-{i}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return Run(cfg, run_dir, reporter or NullReporter())


def _data_key(cfg: Config) -> str:
    """Hash of everything ingestion depends on, including the source files' size and mtime."""
    stamps = [(str(f), f.stat().st_size, f.stat().st_mtime_ns)
              for f in open_source(cfg.data.source).files() if f.is_file()]
    data = cfg.data.model_dump(mode="json", exclude={"loader"})  # the loader reads, not writes
    blob = json.dumps([data, cfg.seed, stamps], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_ingest(run: Run) -> Manifest:
    ex = run.cfg.execution
    with run.stage("ingest"):
        root = run.project_dir / f"data-{_data_key(run.cfg)}"
        with make_executor(ex.executor, num_workers=ex.num_workers, retries=ex.retries,
                           progress=run.reporter.progress) as executor:
            manifest = ingest(run.cfg.data, root, seed=run.cfg.seed, executor=executor)
        link = run.dir / "data"
        if not link.exists():
            os.symlink(os.path.relpath(root, run.dir), link)
    return manifest


def stage_train(
    run: Run, manifest: Manifest, *, only: str | None = None, resume: bool = False,
    candidates: list[Candidate] | None = None,
) -> list[dict[str, Any]]:
    """Train the candidates (default: all; with ``only``, that one and its teachers), every
    teacher before its students, whose teachers' outputs are prepared just before them."""
    if candidates is None:
        candidates = run.cfg.train.training_order(only)
    check_registered_teachers(run.cfg, candidates, manifest)  # fail before any training
    with run.stage("train"):
        val = SplitTensors.load(manifest, "val")
        results = []
        for cand in candidates:
            out = run.dir / "candidates" / cand.name
            if resume and (out / RESULT).is_file():
                logger.info("candidate %s already trained; reusing its result", cand.name)
                results.append(json.loads((out / RESULT).read_text()))
                continue
            if cand.distill is not None:
                prepare_teachers(run.cfg, cand, run.dir, manifest,
                                 progress=run.reporter.progress)
            settings = run.cfg.train.settings_for(cand)
            if not settings.parallel.record.distributed:
                results.append(train_candidate(
                    run.cfg, cand, manifest, val=val, out_dir=out, resume=resume,
                    callbacks=run.reporter.training_callbacks(cand.name),
                ))
                continue
            launch_training(run.dir, cand.name, world_size=settings.parallel.world_size,
                            max_restarts=settings.max_restarts, resume=resume)
            results.append(json.loads((out / RESULT).read_text()))
    return results


def train_teachers(run: Run, manifest: Manifest, candidate: Candidate) -> None:
    """Ready a student to train on its own (``distml verify``): train the candidates it
    learns from and compute its teachers' outputs."""
    if candidate.distill is None:
        return
    stage_train(run, manifest, candidates=run.cfg.train.training_order(candidate.name)[:-1])
    prepare_teachers(run.cfg, candidate, run.dir, manifest, progress=run.reporter.progress)


def stage_select(run: Run, manifest: Manifest, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank, test the best, register it, and move 'production' if it beats the current one."""
    cfg, metric = run.cfg, run.cfg.metric
    with run.stage("select"):
        ranked = rank(results, metric)
        best = ranked[0]
        # This run wrote the artifact from the user's own config, whose code (if any) ran
        # in ingest and training already: trusted.
        artifact = load_artifact(best["artifact"], trust=TrustPolicy(trust_code=True))
        test = SplitTensors.load(manifest, "test")
        test_metrics, predictions = evaluate(manifest.task, artifact.model, test.x, test.y)
        artifact.spec["metrics"]["test"] = test_metrics
        selected = save_artifact(artifact.model, artifact.spec, run.dir / "selected")
        val = SplitTensors.load(manifest, "val")  # what drift monitoring compares against
        write_reference(selected, build_reference(manifest, artifact.model, val.x, val.y))

        registry = Registry(cfg.registry)
        version = registry.register(selected, cfg.model_name)
        current = registry.aliases(cfg.model_name).get(PRODUCTION)
        old = None
        if current is not None:
            old = read_spec(registry.get(cfg.model_name, current).path)["metrics"]
            old = old.get("test", {}).get(metric)
        promoted = cfg.select.promote and is_better(metric, test_metrics[metric], old)
        if promoted:
            registry.set_alias(cfg.model_name, PRODUCTION, version.version,
                               reason=_why(run, metric, test_metrics[metric], current, old))
    return {
        "ranked": ranked, "best": best, "test": test_metrics, "predictions": predictions,
        "targets": test.y.numpy(), "artifact": str(selected),
        "registry": {"name": cfg.model_name, "version": version.version, "promoted": promoted,
                     "previous_production": current},
    }


def _why(run: Run, metric: str, new: float, current: int | None, old: float | None) -> str:
    """The audit log's reason for an automatic promotion."""
    than = ("no production version before" if current is None else
            f"production v{current} has no test {metric}" if old is None else
            f"better than production v{current}'s {old:.6g}")
    return f"distml run {run.dir.name}: test {metric} {new:.6g}, {than}"


def run_pipeline(
    cfg: Config, *, reporter: Reporter | None = None, resume: bool = False
) -> tuple[Run, dict[str, Any]]:
    """The whole pipeline; returns the run and its summary (also written to summary.json)."""
    run = start_run(cfg, resume=resume, reporter=reporter)
    with pipeline_tracking(cfg, run.dir) as mlflow:
        manifest = stage_ingest(run)
        results = stage_train(run, manifest, resume=resume)
        selection = stage_select(run, manifest, results)
        summary = stage_report(run, manifest, selection)
        if mlflow is not None:
            mlflow.finish(cfg, summary, Path(selection["artifact"]))
    return run, summary


def train_only(
    cfg: Config, *, candidate: str | None = None, reporter: Reporter | None = None,
    resume: bool = False,
) -> tuple[Run, list[dict[str, Any]]]:
    """Ingest (cached) and train, without selection (``distml train``)."""
    if candidate is not None:
        cfg.train.candidate(candidate)  # an unknown name fails before any work
    run = start_run(cfg, resume=resume, reporter=reporter)
    with pipeline_tracking(cfg, run.dir):
        results = stage_train(run, stage_ingest(run), only=candidate, resume=resume)
    return run, results


def stage_report(run: Run, manifest: Manifest, selection: dict[str, Any]) -> dict[str, Any]:
    """The report (with plots) and summary.json; returns the summary."""
    with run.stage("report"):
        summary = build_summary(run, manifest, selection)
        summary["distillation"] = distillation_rows(run.cfg, run.dir, manifest)
        write_report(run.dir, summary, manifest=manifest, selection=selection,
                     scaling=latest_scaling_studies(run.project_dir))
    summary["stages"] = run.stages  # the report stage's own time included
    write_json_atomic(run.dir / "summary.json", summary)
    return summary


def build_summary(run: Run, manifest: Manifest, selection: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": run.cfg.name,
        "run_dir": str(run.dir),
        "config_hash": run.cfg.hash(),
        "task": manifest.task,
        "metric": run.cfg.metric,
        "selected": selection["best"]["name"],
        "candidates": [
            {k: r[k] for k in ("name", "strategy", "world_size", "params", "val", "train_seconds",
                               "steps", "step_seconds", "samples_per_s", "data_stall",
                               "peak_mem_bytes_per_rank", "epochs")}
            for r in selection["ranked"]
        ],
        "test": selection["test"],
        "data": {"rows": {s: manifest.rows(s) for s in manifest.splits},
                 "dropped_invalid_rows": manifest.dropped_invalid_rows},
        "stages": run.stages,
        "artifact": selection["artifact"],
        "registry": selection["registry"],
    }
