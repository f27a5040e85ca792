"""``python -m distml.train``: one training process; torchrun and the local launcher run it.

    torchrun --standalone --nproc-per-node 2 -m distml.train CONFIG \\
        --set train.parallel.strategy=ddp --set train.parallel.world_size=2

Given a CONFIG, rank 0 creates the run folder and ingests the data (the other ranks wait and
read it: on several nodes the output folder must be shared); given ``--run-dir`` (the local
launcher), the run's saved config and data are used. A restarted process (torchrun's
``--max-restarts``) resumes from the last checkpoint. See ``distml.distributed.launch`` for
the multi-node command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from distml.config import Candidate, Config, load_config
from distml.data.dataset import Manifest
from distml.distributed.runtime import DistEnv, run_worker, worker_main
from distml.errors import DistmlError
from distml.monitoring.mlflow_tracking import pipeline_tracking


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distml.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="Pipeline config (YAML); or give --run-dir.")
    p.add_argument("--run-dir", type=Path, help="An existing run folder (its config.yaml).")
    p.add_argument("--candidate", help="Train only this candidate.")
    p.add_argument("--resume", action="store_true", help="Resume from the last checkpoints.")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="Override a config value, e.g. --set train.epochs=3.")
    args = p.parse_args(argv)
    if (args.config is None) == (args.run_dir is None):
        p.error("give a CONFIG or --run-dir (one of them)")
    return args


def _broadcast(value: object, env: DistEnv) -> object:
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train(args: argparse.Namespace, cfg: Config, run_dir: Path, env: DistEnv,
           prepare: Callable[[Candidate, Manifest], None] | None = None) -> None:
    """Train the candidates: the one the launcher names, or (given a CONFIG) all of them or
    ``--candidate`` with its teachers, teachers first; ``prepare`` (rank 0) readies each
    student's teachers before it trains."""
    from distml.training.candidate import SplitTensors, train_candidate

    manifest = Manifest.read(run_dir / "data")
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if prepare is None and args.candidate:  # launched by the driver, which did the rest
        candidates = [cfg.train.candidate(args.candidate)]
    else:
        candidates = cfg.train.training_order(args.candidate)
    val = SplitTensors.load(manifest, "val")
    for cand in candidates:
        name = cand.name
        world = cfg.train.settings_for(cand).parallel.world_size
        if world != env.world_size:
            raise DistmlError(
                f"candidate {name!r} has train.parallel.world_size={world}, but "
                f"{env.world_size} processes were started; start {world} or set "
                f"train.parallel.world_size={env.world_size}")
        if cand.distill is not None and prepare is not None:
            if env.is_main:
                prepare(cand, manifest)
            if env.distributed:
                dist.barrier()  # the others wait for the teachers' outputs
        train_candidate(cfg, cand, manifest, val=val, env=env,
                        out_dir=run_dir / "candidates" / name,
                        resume=args.resume or restarted)


def _main(args: argparse.Namespace, env: DistEnv) -> None:
    from distml.workflow.distill import prepare_teachers
    from distml.workflow.pipeline import stage_ingest, start_run

    if args.run_dir is not None:  # started by distml's launcher: the driver owns the run
        _train(args, load_config(args.run_dir / "config.yaml"), args.run_dir, env)
        return
    # Given a config, this job is the pipeline: rank 0 makes the run and holds its MLflow
    # parent run, which ends FAILED if this rank fails.
    cfg = load_config(args.config, args.overrides)
    run = start_run(cfg, resume=args.resume) if env.is_main else None
    owner = pipeline_tracking(cfg, run.dir) if run else contextlib.nullcontext()
    with owner:
        if run is not None:
            stage_ingest(run)
        run_dir = Path(_broadcast(str(run.dir) if run else None, env))
        _train(args, cfg, run_dir, env, prepare=lambda cand, manifest: prepare_teachers(
            cfg, cand, run_dir, manifest))


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    worker_main(lambda env: _main(args, env))


if __name__ == "__main__":
    run_worker(main)
