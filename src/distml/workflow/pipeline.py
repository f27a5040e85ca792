"""The pipeline: ingest -> train candidates -> select + register -> report, each stage timed.

Ingested data is cached by the hash of its inputs under ``<output_dir>/<name>/data-<hash>``
and linked from each run directory, so runs that share a data config ingest once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from distml import storage
from distml.artifact import load_artifact, read_spec, save_artifact
from distml.config import Candidate, Config
from distml.data.dataset import Manifest
from distml.data.ingest import ingest
from distml.data.sources import open_source
from distml.data.tensors import SplitTensors
from distml.data.versions import data_version, lineage
from distml.distributed.launch import launch_training
from distml.drift.reference import build_reference, write_reference
from distml.execution import make_executor
from distml.execution.base import ProgressHandle, no_progress
from distml.registry import Registry
from distml.rundir import Project, RunDir
from distml.search.driver import run_search
from distml.selection import rank
from distml.tasks import evaluate
from distml.training.callbacks import Callback
from distml.training.candidate import train_candidate
from distml.training.telemetry.mlflow_tracking import pipeline_tracking
from distml.trust import TrustPolicy
from distml.workflow.distill import (
    check_registered_teachers,
    distillation_rows,
    prepare_teachers,
)
from distml.workflow.promotion import Promotion, promote, weigh
from distml.workflow.report import latest_scaling_studies, write_report

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
    folder: RunDir
    reporter: Reporter = field(default_factory=NullReporter)
    stages: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.reporter.stage(name):
            yield
        self.stages.append({"name": name, "seconds": round(time.perf_counter() - start, 3)})


def start_run(cfg: Config, *, resume: bool = False, reporter: Reporter | None = None) -> Run:
    """A new run folder (or, with ``resume``, the newest one) holding the resolved config."""
    project = Project.of(cfg)
    folder = project.newest_run(cfg) if resume else project.new_run(cfg)
    return Run(cfg, folder, reporter or NullReporter())


def stage_ingest(run: Run) -> Manifest:
    """Ingest into the project's cache folder named by the data's content version (fetched
    from the remote output_dir if published there, and published to it when new)."""
    ex, data = run.cfg.execution, run.cfg.data
    with run.stage("ingest"):
        fingerprint = open_source(data.source).fingerprint()
        version = data_version(data, run.cfg.seed, fingerprint)
        root = Project.of(run.cfg).data_cache(version)
        if (remote := storage.remote_of(root)) is not None and not root.is_dir():
            storage.fetch_dir(remote, root)
        with make_executor(ex.executor, num_workers=ex.num_workers, retries=ex.retries,
                           progress=run.reporter.progress) as executor:
            manifest = ingest(data, root, seed=run.cfg.seed, executor=executor,
                              fingerprint=fingerprint)
        if remote is not None and storage.read_marker(remote) is None:
            storage.publish_dir(root, remote)
        run.folder.link_data(root)
    return manifest


def train_in_order(candidates: list[Candidate], *, prepare: Callable[[Candidate], None],
                   train: Callable[[Candidate], T]) -> list[T]:
    """Train ``candidates`` in turn, in the order ``TrainConfig.training_order`` gives
    (every teacher before its students); a distilled student's teachers are readied by
    ``prepare`` just before it, since they are trained by then. Every chain that trains
    (the driver, the torchrun entry) goes through here."""
    results = []
    for cand in candidates:
        if cand.distill is not None:
            prepare(cand)
        results.append(train(cand))
    return results


def stage_train(
    run: Run, manifest: Manifest, *, only: str | None = None, resume: bool = False,
    student: bool = True,
) -> list[dict[str, Any]]:
    """Train the candidates (default: all; with ``only``, that one and its teachers), every
    teacher before its students, whose teachers' outputs are prepared just before them.
    Without ``student``, ``only`` itself is not trained, only readied (``distml verify``)."""
    candidates = run.cfg.train.training_order(only)
    last = candidates[-1]
    if not student and last.distill is None:
        return []  # nothing to ready
    check_registered_teachers(run.cfg, candidates, manifest)  # fail before any training

    def prepare(cand: Candidate) -> None:
        prepare_teachers(run.cfg, cand, run.folder, manifest, progress=run.reporter.progress)

    def train(cand: Candidate) -> dict[str, Any] | None:
        if cand is last and not student:
            return None
        return _train_one(run, manifest, cand, val=val, resume=resume)

    with run.stage("train"):
        val = SplitTensors.load(manifest, "val")
        results = train_in_order(candidates, prepare=prepare, train=train)
    return [r for r in results if r is not None]


def _train_one(run: Run, manifest: Manifest, cand: Candidate, *, val: SplitTensors,
               resume: bool) -> dict[str, Any]:
    """One candidate, here (single) or on its processes; a finished one is reused when
    resuming."""
    out = run.folder.candidate(cand.name)
    if resume and out.has_result():
        logger.info("candidate %s already trained; reusing its result", cand.name)
        return out.read_result()
    if cand.search is not None:  # trials on the executor; the best stands for the candidate
        return run_search(run.cfg, cand, run.folder)
    settings = run.cfg.train.settings_for(cand)
    if not settings.parallel.record.distributed:
        return train_candidate(run.cfg, cand, manifest, val=val, run=run.folder, resume=resume,
                               callbacks=run.reporter.training_callbacks(cand.name))
    launch_training(run.folder, cand.name, world_size=settings.parallel.world_size,
                    max_restarts=settings.max_restarts, resume=resume)
    return out.read_result()


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
        selected = save_artifact(artifact.model, artifact.spec, run.folder.selected)
        # What drift monitoring compares against: the test split's rows (no selection step
        # ranked on them), with the probabilities calibrated on the validation split.
        val = SplitTensors.load(manifest, "val")
        write_reference(selected, build_reference(manifest, artifact.model, (val.x, val.y),
                                                  (test.x, test.y)))

        registry = Registry(cfg.registry)
        version = registry.register(selected, cfg.model_name, source=str(run.folder.path))
        weighed = weigh(registry, cfg.model_name, version.version, metric=metric,
                        new=test_metrics[metric],
                        score=lambda path: read_spec(path)["metrics"].get("test", {}).get(metric))
        promoted = cfg.select.promote and promote(registry, weighed, reason=_why(run, weighed))
    return {
        "ranked": ranked, "best": best, "test": test_metrics, "predictions": predictions,
        "targets": test.y.numpy(), "artifact": str(selected),
        "registry": {"name": cfg.model_name, "version": version.version, "promoted": promoted,
                     "previous_production": weighed.current},
    }


def _why(run: Run, p: Promotion) -> str:
    """The audit log's reason for an automatic promotion."""
    than = ("no production version before" if p.current is None else
            f"production v{p.current} has no test {p.metric}" if p.old is None else
            f"better than production v{p.current}'s {p.old:.6g}")
    return f"distml run {run.folder.name}: test {p.metric} {p.new:.6g}, {than}"


@dataclass(frozen=True)
class Chain:
    """Which stages a command runs over its run folder, and the hooks where it differs
    from ``distml run``: the one way stages are chained."""

    until: Literal["ingest", "train", "select"] = "select"  # the last stage (select: + report)
    only: str | None = None  # train this candidate and its teachers
    student: bool = True  # False: ``only``'s teachers, not ``only`` itself (distml verify)
    resume: bool = False
    track: bool = True  # the MLflow parent run around the stages
    # The torchrun entry trains on the job's ranks; default: stage_train.
    train: Callable[[Run, Manifest], list[dict[str, Any]]] | None = None
    # distml watch: the candidates' results changed before selection (the newest rows).
    rescore: Callable[[list[dict[str, Any]], Manifest], None] | None = None


@dataclass
class Outcome:
    """What the stages of a chain produced, as far as it went."""

    manifest: Manifest
    results: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None


def run_chain(run: Run, chain: Chain) -> Outcome:
    """Ingest, train, then select, register and report, stopping after ``chain.until``;
    a run folder under a storage URL is published when the chain ends, failed or not (its
    logs say why; ``--resume`` elsewhere finds it)."""
    try:
        out = _run_stages(run, chain)
    except Exception:
        try:
            storage.publish(run.folder.path)
        except Exception:  # noqa: BLE001 - the run's own error is the one to see
            logger.exception("publishing the failed run folder %s failed", run.folder.path)
        raise
    storage.publish(run.folder.path)  # the marker goes last
    return out


def _run_stages(run: Run, chain: Chain) -> Outcome:
    tracking = (pipeline_tracking(run.cfg, run.folder) if chain.track
                else contextlib.nullcontext())
    with tracking as mlflow:
        out = Outcome(stage_ingest(run))
        if chain.until == "ingest":
            return out
        if chain.train is not None:
            out.results = chain.train(run, out.manifest)
        else:
            out.results = stage_train(run, out.manifest, only=chain.only, resume=chain.resume,
                                      student=chain.student)
        if chain.until == "train":
            return out
        if chain.rescore is not None:
            chain.rescore(out.results, out.manifest)
        out.selection = stage_select(run, out.manifest, out.results)
        out.summary = stage_report(run, out.manifest, out.selection)
        if mlflow is not None:
            mlflow.finish(run.cfg, out.summary, Path(out.selection["artifact"]))
    return out


def run_pipeline(
    cfg: Config, *, reporter: Reporter | None = None, resume: bool = False
) -> tuple[Run, dict[str, Any]]:
    """The whole pipeline; returns the run and its summary (also written to summary.json)."""
    run = start_run(cfg, resume=resume, reporter=reporter)
    summary = run_chain(run, Chain(resume=resume)).summary
    assert summary is not None
    return run, summary


def train_only(
    cfg: Config, *, candidate: str | None = None, reporter: Reporter | None = None,
    resume: bool = False,
) -> tuple[Run, list[dict[str, Any]]]:
    """Ingest (cached) and train, without selection (``distml train``)."""
    if candidate is not None:
        cfg.train.candidate(candidate)  # an unknown name fails before any work
    run = start_run(cfg, resume=resume, reporter=reporter)
    return run, run_chain(run, Chain(until="train", only=candidate, resume=resume)).results


def stage_report(run: Run, manifest: Manifest, selection: dict[str, Any]) -> dict[str, Any]:
    """The report (with plots) and summary.json; returns the summary."""
    with run.stage("report"):
        summary = build_summary(run, manifest, selection)
        summary["distillation"] = distillation_rows(run.cfg, run.folder, manifest)
        write_report(run.folder, summary, manifest=manifest, selection=selection,
                     scaling=latest_scaling_studies(Project.of(run.cfg)))
    summary["stages"] = run.stages  # the report stage's own time included
    run.folder.write_summary(summary)
    return summary


def build_summary(run: Run, manifest: Manifest, selection: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": run.cfg.name,
        "run_dir": str(run.folder.path),
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
        "search": {r["name"]: r["search"] for r in selection["ranked"] if r.get("search")},
        "elastic": {r["name"]: r["elastic"] for r in selection["ranked"] if r.get("elastic")},
        # parameter-server candidates' workers: who joined, left or died mid-run
        "parameter_server": {r["name"]: {k: r["parameter_server"].get(k) for k in (
            "workers", "joined_workers", "dead_workers", "membership")}
            for r in selection["ranked"] if r.get("parameter_server")},
        "test": selection["test"],
        "data": {"rows": {s: manifest.rows(s) for s in manifest.splits},
                 "dropped_invalid_rows": manifest.dropped_invalid_rows,
                 "version": manifest.version, "lineage": lineage(manifest)},
        "stages": run.stages,
        "artifact": selection["artifact"],
        "registry": selection["registry"],
    }
