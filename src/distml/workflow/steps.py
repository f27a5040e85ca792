"""The pipeline's stages one at a time over one run folder, for orchestrators that run each
stage in its own container (the Argo Workflow of ``distml export kubernetes``):

    distml stage ingest CONFIG --run-dir RUN     the run folder, its config.yaml and data
    python -m distml.train --run-dir RUN --candidate NAME     (under torchrun, per candidate)
    distml stage select RUN                      select, register, report, summary.json

The same functions ``distml run`` chains in one process (``pipeline.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from distml.config import Config, load_config
from distml.data.dataset import Manifest
from distml.errors import DistmlError
from distml.fsutil import write_text_atomic
from distml.training.candidate import RESULT
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
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        theirs = load_config(run_dir / "config.yaml")
        if theirs.hash() != cfg.hash():
            raise DistmlError(f"{run_dir} is a run of another config (hash {theirs.hash()}, "
                              f"this one {cfg.hash()}); give a new --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run = Run(cfg, run_dir, reporter or NullReporter())
    return stage_ingest(run)


def _results(run_dir: Path, cfg: Config) -> list[dict[str, Any]]:
    names = [c.name for c in cfg.train.candidates]
    missing = [n for n in names if not (run_dir / "candidates" / n / RESULT).is_file()]
    if missing:
        raise DistmlError(
            f"{run_dir}: candidate(s) {', '.join(missing)} have no {RESULT} yet; train them "
            f"first (python -m distml.train --run-dir {run_dir} --candidate NAME)")
    return [json.loads((run_dir / "candidates" / n / RESULT).read_text()) for n in names]


def select_run(run_dir: Path, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Select the best trained candidate of the run, register it, write the report and
    summary.json; returns the summary."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DistmlError(f"{run_dir} is not a run folder (no config.yaml); "
                          "`distml stage ingest CONFIG --run-dir DIR` makes one")
    cfg = load_config(run_dir / "config.yaml")
    run = Run(cfg, run_dir, reporter or NullReporter())
    manifest = Manifest.read(run_dir / "data")
    # The summary's stages are this process's; ingestion and training ran elsewhere.
    return stage_report(run, manifest, stage_select(run, manifest, _results(run_dir, cfg)))
