"""The layout of a project's outputs on disk (README, "What a run writes"), in one place.

``Project`` is ``<output_dir>/<name>/``: its timestamped runs, the ingested data cache
shared by them (``data-<hash>``), ``distml scale`` studies and ``distml watch``'s state.
``RunDir`` is one run; ``CandidateDir`` one candidate's folder in it. Nothing else builds
these paths or reads and writes the files they name, so that the layout changes here alone
(a later store of runs off the local disk plugs in here too). Training processes find
their candidate's folder through it, so it sits low: it imports only core and config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from distml.config import Config, load_config
from distml.errors import DistmlError
from distml.fsutil import write_json_atomic, write_text_atomic

_RUN_NAME = "%Y%m%d-%H%M%S"  # run folders sort by time; "2*" finds them


@dataclass(frozen=True)
class CandidateDir:
    """``candidates/<name>/``: a candidate's checkpoints, artifact and result."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def artifact(self) -> Path:
        return self.path / "artifact"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def teacher(self) -> Path:
        """A distilled student's teachers (artifacts, stored logits), written before it
        trains and read by its training processes."""
        return self.path / "teacher.json"

    @property
    def ps_join(self) -> Path:
        """While a parameter-server candidate trains: its servers' addresses, for workers
        that join the running job (``distml ps-worker``)."""
        return self.path / "ps-join.json"

    @property
    def mlflow_run_id(self) -> Path:
        """Its MLflow child run, kept so that a restarted rank goes on with the same one."""
        return self.path / "mlflow_run_id"

    def has_result(self) -> bool:
        return self.result.is_file()

    def read_result(self) -> dict[str, Any]:
        return json.loads(self.result.read_text())

    def write_result(self, result: dict[str, Any]) -> None:
        write_json_atomic(self.result, result)

    def read_teacher(self) -> dict[str, Any]:
        if not self.teacher.is_file():
            raise DistmlError(
                f"{self.teacher} is missing: a distilled candidate's teachers are prepared by "
                "the pipeline (distml run, distml train, python -m distml.train CONFIG) "
                "before it trains")
        return json.loads(self.teacher.read_text())

    def write_teacher(self, info: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.teacher, info)


@dataclass(frozen=True)
class RunDir:
    """One run folder: ``<output_dir>/<name>/<timestamp>/``."""

    path: Path

    @classmethod
    def open(cls, path: Path | str, *, finished: bool = False) -> RunDir:
        """An existing run (``finished``: one with its summary), or an error saying so."""
        run = cls(Path(path))
        if finished and not run.summary.is_file():
            raise DistmlError(f"{run.path} is not a finished run (no summary.json); "
                              "`distml runs list` shows the runs")
        if not run.config_file.is_file():
            raise DistmlError(f"{run.path} is not a run folder (no config.yaml); "
                              "`distml stage ingest CONFIG --run-dir DIR` makes one")
        return run

    @property
    def name(self) -> str:
        return self.path.name

    # -- files and folders ---------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def data(self) -> Path:
        """The link to the ingested data (in the project's cache)."""
        return self.path / "data"

    def candidate(self, name: str) -> CandidateDir:
        return CandidateDir(self.path / "candidates" / name)

    def logs(self, candidate: str) -> Path:
        """Per-rank output of a distributed candidate."""
        return self.path / "logs" / candidate

    def tensorboard(self, candidate: str) -> Path:
        return self.path / "tensorboard" / candidate

    @property
    def selected(self) -> Path:
        """The selected model's artifact, tested, with its drift reference."""
        return self.path / "selected"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def mlflow(self) -> Path:
        """The MLflow parent run's ids, where candidates log their child runs."""
        return self.path / "mlflow.json"

    @property
    def verify(self) -> Path:
        """``distml verify``'s workers' results and logs."""
        return self.path / "verify"

    def plot(self, name: str) -> Path:
        return self.path / name

    def plots(self) -> list[Path]:
        return sorted(self.path.glob("*.png"))

    @property
    def job_file(self) -> Path:
        """In a run started by torchrun: its job's --rdzv-id."""
        return self.path / "job-id"

    # -- reading and writing -------------------------------------------------------------

    def write_config(self, cfg: Config) -> None:
        """The resolved config (after --set overrides)."""
        write_text_atomic(self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def load_config(self) -> Config:
        return load_config(self.config_file)

    def raw_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_file.read_text())

    def link_data(self, root: Path) -> None:
        """Link the run to its ingested data (relative: the project folder can move)."""
        if not self.data.exists():
            os.symlink(os.path.relpath(root, self.path), self.data)

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary, summary)

    def job_id(self) -> str | None:
        return self.job_file.read_text() if self.job_file.is_file() else None

    def tag_job(self, job: str) -> None:
        write_text_atomic(self.job_file, job)


@dataclass(frozen=True)
class Project:
    """``<output_dir>/<name>/``: a config's runs and what they share."""

    path: Path

    @classmethod
    def of(cls, cfg: Config) -> Project:
        return cls(cfg.output_dir / cfg.name)

    def runs(self) -> list[RunDir]:
        """Its run folders, oldest first."""
        if not self.path.is_dir():
            return []
        return [RunDir(p) for p in sorted(self.path.glob("2*")) if p.is_dir()]

    def new_run(self, cfg: Config) -> RunDir:
        """A new run folder, named by the time (suffixed when another took the name),
        holding the resolved config."""
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime(_RUN_NAME)
        for i in range(1000):
            path = self.path / (stamp if i == 0 else f"{stamp}-{i}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        run = RunDir(path)
        run.write_config(cfg)
        return run

    def newest_run(self, cfg: Config) -> RunDir:
        """The newest run (to resume), its config replaced by ``cfg``."""
        runs = self.runs()
        if not runs:
            raise DistmlError(f"nothing to resume: no run of {cfg.name!r} under {self.path}")
        runs[-1].write_config(cfg)
        return runs[-1]

    def job_run(self, job: str) -> RunDir | None:
        """The newest run that job ``job`` (torchrun's --rdzv-id) started, if any."""
        return next((r for r in reversed(self.runs()) if r.job_id() == job), None)

    def data_cache(self, key: str) -> Path:
        """Ingested data, by the hash of its inputs: shared by the runs."""
        return self.path / f"data-{key}"

    @property
    def watch(self) -> Path:
        """``distml watch``'s state and cycles."""
        return self.path / "watch"

    def new_scaling_study(self, stage: str) -> Path:
        out = self.path / f"scale-{stage}-{datetime.now():%Y%m%d-%H%M%S}"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def scaling_studies(self) -> Iterator[Path]:
        """The ``distml scale`` results (scaling.json), oldest first."""
        return iter(sorted(self.path.glob("scale-*/scaling.json")))


def finished_runs(output_dir: Path) -> list[RunDir]:
    """Every project's finished runs (those with a summary.json), oldest first."""
    return [RunDir(s.parent) for s in sorted(Path(output_dir).glob("*/2*/summary.json"))]
