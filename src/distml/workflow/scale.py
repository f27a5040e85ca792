"""``distml scale``: run a stage at several worker counts and analyse the scaling.

- ``ingest``: the executor's workers (``execution.num_workers = N``), a fresh output each time.
- ``train``: the candidate on N processes (its strategy, or ddp if it is single), one CPU
  thread per process, so N workers use N cores; the time is the training loop's wall time.

Strong scaling keeps the work fixed; weak scaling grows it with N (the rows of a synthetic
source for ingestion, the global batch for training).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distml.config import Config, deep_merge
from distml.errors import ConfigError
from distml.fsutil import write_json_atomic
from distml.rundir import Project
from distml.workflow.scaling import analyze, plot

logger = logging.getLogger(__name__)


def _with(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of the config with sections updated (validated again)."""
    data = cfg.to_dict()
    for name, update in sections.items():
        data[name] = {**data[name], **update}
    return Config.model_validate(data)


def _time_ingest(cfg: Config, n: int, mode: str, out: Path) -> float:
    from distml.data.ingest import ingest
    from distml.execution import make_executor

    data = cfg.data
    if mode == "weak":
        grown = data.source.grown(n)
        if grown is None:
            raise ConfigError("weak scaling of ingestion grows a synthetic source with N; "
                              f"data.source is {data.source.type!r}")
        data = data.model_copy(update={"source": grown})
    root = out / f"ingest-{n}"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    ex = cfg.execution
    with make_executor(ex.executor, num_workers=n, retries=ex.retries) as executor:
        ingest(data, root, seed=cfg.seed, executor=executor)
    seconds = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return seconds


def _time_train(cfg: Config, candidate: str, n: int, mode: str, out: Path) -> float:
    from distml.distributed.launch import launch_training
    from distml.workflow.pipeline import Chain, run_chain, start_run

    cand = cfg.train.candidate(candidate)
    s = cfg.train.settings_for(cand)
    strategy = s.parallel.strategy if s.parallel.record.distributed else "ddp"
    batch = s.batch_size * (n if mode == "weak" else 1)
    # The candidate keeps its own overrides; the scaling settings go on top of them.
    scaled = deep_merge(cand.model_dump(mode="json", exclude_unset=True), {
        "parallel": {"strategy": strategy, "world_size": n}, "batch_size": batch,
        "checkpoints": False, "max_restarts": 0})
    # A distilled student keeps the candidates it learns from; they train first, untimed.
    teachers = [c.model_dump(mode="json", exclude_unset=True)
                for c in cfg.train.training_order(candidate)[:-1]]
    cfg_n = _with(cfg, train={"candidates": [*teachers, scaled]})
    cfg_n = cfg_n.model_copy(update={"output_dir": out / f"train-{n}"})
    run = start_run(cfg_n)
    run_chain(run, Chain(until="train", only=cand.name, student=False, track=False))
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # one core per worker process
    try:
        launch_training(run.folder, cand.name, world_size=n, max_restarts=0, resume=False)
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return run.folder.candidate(cand.name).read_result()["wall_seconds"]


def measure(time_once: Callable[[int], float], workers: list[int], *, repeats: int
            ) -> dict[int, list[float]]:
    """Timings of ``time_once(n)`` for every worker count: one untimed warm-up first (imports,
    the page cache, worker pools: otherwise the first point pays for them), then ``repeats``
    rounds, interleaved so that drift over time hits every count alike."""
    time_once(workers[0])
    samples: dict[int, list[float]] = {n: [] for n in workers}
    for _ in range(repeats):
        for n in workers:
            samples[n].append(time_once(n))
    return samples


def scale(cfg: Config, *, workers: list[int], mode: str, stage: str,
          candidate: str | None = None, repeats: int = 3) -> dict[str, Any]:
    """Time ``stage`` at each worker count; returns the analysis (also JSON and PNG)."""
    if 1 not in workers:
        workers = [1, *workers]
    workers = sorted(set(workers))
    cores = os.cpu_count() or 1
    if max(workers) > cores:
        logger.warning("%d workers on %d cores: past %d the workers share cores, so the "
                       "speedup measures contention, not the algorithm", max(workers), cores,
                       cores)
    out = Project.of(cfg).new_scaling_study(stage)
    name = candidate or cfg.train.candidates[0].name

    def time_once(n: int) -> float:
        seconds = (_time_ingest(cfg, n, mode, out) if stage == "ingest"
                   else _time_train(cfg, name, n, mode, out))
        logger.info("%s with %d workers: %.2fs", stage, n, seconds)
        return seconds

    result = analyze(measure(time_once, workers, repeats=repeats), mode=mode)
    for warning in result["warnings"]:
        logger.warning("%s; Amdahl's law is not fitted", warning)
    result.update(stage=stage, cores=cores,
                  candidate=name if stage == "train" else None, folder=str(out))
    result["plot"] = str(plot(result, out / "scaling.png",
                              title=f"{cfg.name}: {stage}, {mode} scaling"))
    write_json_atomic(out / "scaling.json", result)
    return result
