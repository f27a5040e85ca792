"""``python -m distml.train``: one training process; torchrun and the local launcher run it.

    torchrun --standalone --nproc-per-node 2 -m distml.train CONFIG \\
        --set train.parallel.strategy=ddp --set train.parallel.world_size=2

Given a CONFIG, rank 0 creates the run folder and ingests the data (the other ranks wait and
read it: on several nodes the output folder must be shared); given ``--run-dir`` (the local
launcher), the run's saved config and data are used. A restarted process (torchrun's
``--max-restarts``) resumes from the last checkpoint, in the run folder that its job
(torchrun's ``--rdzv-id``) started. On several machines the preflight checks run first and
gloo is pointed at the interface that routes to the master (``distml.distributed.preflight``).
See ``distml.distributed.launch`` for the multi-node commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Only what the preflight needs is imported here: a misconfigured node fails in a second,
# before torch loads (the rest is imported once the checks pass).
from distml import processes
from distml.config import Candidate, Config, load_config
from distml.distributed import preflight
from distml.distributed.param_server import keeper
from distml.errors import DistmlError
from distml.rundir import Project, RunDir

if TYPE_CHECKING:
    from distml.data.dataset import Manifest
    from distml.distributed.runtime import DistEnv
    from distml.workflow.pipeline import Run



def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distml.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="Pipeline config (YAML); or give --run-dir.")
    p.add_argument("--run-dir", type=Path, help="An existing run folder (its config.yaml).")
    p.add_argument("--candidate", help="Train only this candidate.")
    p.add_argument("--resume", action="store_true", help="Resume from the last checkpoints.")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="Override a config value, e.g. --set train.epochs=3.")
    p.add_argument("--metric-lines", action="store_true",
                   help="Print val-<metric>=<value> lines at every evaluation (rank 0), for "
                   "Katib's StdOut metrics collector.")
    args = p.parse_args(argv)
    if (args.config is None) == (args.run_dir is None):
        p.error("give a CONFIG or --run-dir (one of them)")
    return args


def _train(args: argparse.Namespace, cfg: Config, run: RunDir, env: DistEnv, *,
           resume: bool, prepare: Callable[[Candidate, Manifest], None] | None = None
           ) -> list[dict[str, Any] | None]:
    """Train the candidates: the one the launcher names, or (given a CONFIG) all of them or
    ``--candidate`` with its teachers, teachers first; ``prepare`` (rank 0) readies each
    student's teachers before it trains."""
    from distml.data.dataset import Manifest
    from distml.data.tensors import SplitTensors
    from distml.distributed.runtime import barrier
    from distml.training.callbacks import MetricLines
    from distml.training.candidate import train_candidate
    from distml.workflow.pipeline import train_in_order

    manifest = Manifest.read(run.data)
    if prepare is None and args.candidate:  # launched by the driver, which did the rest
        candidates = [cfg.train.candidate(args.candidate)]
    else:
        candidates = cfg.train.training_order(args.candidate)
    val = SplitTensors.load(manifest, "val")

    def ready(cand: Candidate) -> None:
        if prepare is not None:
            if env.is_main:
                prepare(cand, manifest)
            barrier(env)  # the others wait for the teachers' outputs

    def train(cand: Candidate) -> dict[str, Any] | None:
        parallel = cfg.train.settings_for(cand).parallel
        world = parallel.world_size
        if parallel.elastic and env.world_size in parallel.world_sizes:
            pass  # an elastic job runs at whatever size its nodes make
        elif world != env.world_size:
            raise DistmlError(
                f"candidate {cand.name!r} has train.parallel.world_size={world}, but "
                f"{env.world_size} processes were started; start {world} or set "
                f"train.parallel.world_size={env.world_size}")
        return train_candidate(cfg, cand, manifest, val=val, env=env, run=run, resume=resume,
                               callbacks=[MetricLines()] if args.metric_lines else ())

    return train_in_order(candidates, prepare=ready, train=train)


def _main(args: argparse.Namespace, env: DistEnv, *, across_nodes: bool) -> None:
    from distml.distributed.runtime import broadcast_object, gather_objects

    # A restarted agent (torchrun's --max-restarts) resumes; on several nodes, an agent
    # started afresh beside restarted ones (a node's pod replaced) must resume as well.
    restarted = max(gather_objects(
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), env)) > 0
    resume = args.resume or restarted
    check_shared = across_nodes and preflight.enabled()
    if args.run_dir is not None:  # started by distml's launcher: the driver owns the run
        if check_shared:
            preflight.check_output_shared(args.run_dir, env)
        folder = RunDir(args.run_dir)
        _train(args, folder.load_config(), folder, env, resume=resume)
        return
    # Given a config, this job is the pipeline: rank 0 makes the run, ingests and holds its
    # MLflow parent run (which ends FAILED if this rank fails); every rank trains.
    from distml.workflow.distill import prepare_teachers
    from distml.workflow.pipeline import Chain, run_chain

    cfg = load_config(args.config, args.overrides)
    if check_shared:
        preflight.check_output_shared(cfg.output_dir, env)
    if not restarted and _elastic(cfg):  # re-formed after a join: not a failure, no count
        restarted = bool(broadcast_object(env.is_main and _rejoining(cfg), env))
        resume = args.resume or restarted

    def train(run: Run | None, manifest: Manifest | None = None) -> list[dict[str, Any] | None]:
        folder = RunDir(Path(broadcast_object(str(run.folder.path) if run else None, env)))
        return _train(args, cfg, folder, env, resume=resume,
                      prepare=lambda cand, m: prepare_teachers(cfg, cand, folder, m))

    if env.is_main:
        run_chain(_job_run(cfg, resume=args.resume, restarted=restarted),
                  Chain(until="train", train=train))
    else:
        train(None)


def _elastic(cfg: Config) -> bool:
    return any(cfg.train.settings_for(c).parallel.elastic for c in cfg.train.candidates)


def _rejoining(cfg: Config) -> bool:
    """Whether this elastic job (torchrun's ``--rdzv-id``) already has a run in progress:
    the ranks re-formed after a node joined, which torchrun does not count as a restart."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    run = Project.of(cfg).job_run(job) if job != "none" else None
    return run is not None and any(not run.candidate(c.name).result.is_file()
                                   for c in cfg.train.candidates)


def _job_run(cfg: Config, *, resume: bool, restarted: bool) -> Run:
    """The run folder: after a restart, the one this job started (tagged with torchrun's
    ``--rdzv-id``), so that restarted ranks continue it rather than begin another; with
    --resume, the newest; else a new one, tagged."""
    from distml.workflow.pipeline import Run, start_run

    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id is "none"
    if restarted and job != "none":
        folder = Project.of(cfg).job_run(job)
        if folder is not None:
            return Run(cfg, folder)
    if resume or (restarted and job == "none"):
        return start_run(cfg, resume=True)
    run = start_run(cfg)
    if job != "none":
        run.folder.tag_job(job)
    return run


def main(argv: list[str] | None = None) -> None:
    """One training process, from start to shutdown (callable in-process: it returns)."""
    processes.setup_logging()
    args = _parse(argv)
    try:
        # On several machines: the preflight checks, and gloo's interface, before the
        # process group exists (and before torch loads).
        prepared = preflight.prepare_rank()
    except DistmlError as e:
        processes.exit_on_user_error(e)
    from distml.distributed.runtime import worker_main

    if prepared is not None:
        prepared.release()  # rank 0's store takes its port over now
    worker_main(lambda env: _main(args, env, across_nodes=prepared is not None))


def _entry() -> NoReturn:
    """``python -m distml.train``: main, then exit without the interpreter's finalizers. A
    parameter-server worker rank runs as a keeper of its real process instead, so that the
    worker's death does not take the job down (distml.distributed.param_server.keeper)."""
    args = _parse(None)
    code = keeper.keep_if_worker(args.config, args.run_dir, args.candidate, args.overrides)
    if code is not None:
        sys.exit(code)
    from distml.distributed.runtime import run_worker

    run_worker(main)


if __name__ == "__main__":
    _entry()
