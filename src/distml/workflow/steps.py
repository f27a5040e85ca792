"""The pipeline's stages one at a time over one run folder, for orchestrators that run each
stage in its own container (the Argo Workflow of ``distml export kubernetes``):

    distml stage ingest CONFIG --run-dir RUN     the run folder, its config.yaml and data
    python -m distml.train --run-dir RUN --candidate NAME     (under torchrun, per candidate)
    distml stage select RUN                      select, register, report, summary.json

The same functions ``distml run`` chains in one process (``pipeline.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distml.config import Config
from distml.data.dataset import Manifest
from distml.errors import DistmlError
from distml.rundir import RunDir
from distml.workflow.pipeline import (
    NullReporter,
    Reporter,
    Run,
    stage_ingest,
    stage_report,
    stage_select,
)

logger = logging.getLogger(__name__)


def ingest_into(cfg: Config, run_dir: Path, *, reporter: Reporter | None = None) -> Manifest:
    """Make ``run_dir`` a run of ``cfg`` (its config.yaml) and ingest its data (cached by
    the data's hash beside it, as ``distml run`` does)."""
    folder = RunDir(Path(run_dir))
    if folder.config_file.is_file():
        theirs = folder.load_config()
        if theirs.hash() != cfg.hash():
            raise DistmlError(f"{run_dir} is a run of another config (hash {theirs.hash()}, "
                              f"this one {cfg.hash()}); give a new --run-dir")
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_config(cfg)
    return stage_ingest(Run(cfg, folder, reporter or NullReporter()))


def _results(run: RunDir, cfg: Config) -> list[dict[str, Any]]:
    folders = [run.candidate(c.name) for c in cfg.train.candidates]
    missing = [c.name for c, f in zip(cfg.train.candidates, folders, strict=True)
               if not f.has_result()]
    if missing:
        raise DistmlError(
            f"{run.path}: candidate(s) {', '.join(missing)} have no {folders[0].result.name} "
            f"yet; train them first (python -m distml.train --run-dir {run.path} "
            "--candidate NAME)")
    return [f.read_result() for f in folders]


def select_run(run_dir: Path, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Select the best trained candidate of the run, register it, write the report and
    summary.json; returns the summary."""
    folder = RunDir.open(run_dir)
    cfg = folder.load_config()
    run = Run(cfg, folder, reporter or NullReporter())
    manifest = Manifest.read(folder.data)
    # The summary's stages are this process's; ingestion and training ran elsewhere.
    return stage_report(run, manifest, stage_select(run, manifest, _results(folder, cfg)))
