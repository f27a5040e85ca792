"""``python -m distml.train``: one training process; torchrun and the local launcher run it.

    torchrun --standalone --nproc-per-node 2 -m distml.train CONFIG --set train.strategy=ddp \\
        --set train.world_size=2

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
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

# Only what the preflight needs is imported here: a misconfigured node fails in a second,
# before torch loads (the rest is imported once the checks pass).
from distml.config import Config, load_config
from distml.distributed import preflight
from distml.errors import DistmlError

if TYPE_CHECKING:
    from distml.distributed.runtime import DistEnv

logger = logging.getLogger("distml")

JOB_FILE = "job-id"  # in a run folder started by torchrun: its --rdzv-id


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


def _prepare(args: argparse.Namespace, env: DistEnv, *, across_nodes: bool):
    """The config, the run folder and the ingested data (made by rank 0, seen by every
    rank), the tracking parent run (rank 0's), and whether to resume."""
    from distml.data.dataset import Manifest
    from distml.distributed.runtime import broadcast_object, gather_objects
    from distml.monitoring.mlflow_tracking import PipelineTracking
    from distml.workflow.pipeline import stage_ingest

    # A restarted agent (torchrun's --max-restarts) resumes; on several nodes, an agent
    # started afresh beside restarted ones (a node's pod replaced) must resume as well.
    restarted = max(gather_objects(
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), env)) > 0
    resume = args.resume or restarted
    if args.run_dir is not None:
        cfg = load_config(args.run_dir / "config.yaml")
        if across_nodes and preflight.enabled():
            preflight.check_output_shared(args.run_dir, env)
        return cfg, args.run_dir, Manifest.read(args.run_dir / "data"), None, resume
    cfg = load_config(args.config, args.overrides)
    if across_nodes and preflight.enabled():
        preflight.check_output_shared(cfg.output_dir, env)
    run_dir = tracking = None
    if env.is_main:
        run = _job_run(cfg, resume=args.resume, restarted=restarted)
        tracking = PipelineTracking.start(cfg, run.dir)
        stage_ingest(run)
        run_dir = run.dir
    run_dir = Path(broadcast_object(str(run_dir), env))
    return cfg, run_dir, Manifest.read(run_dir / "data"), tracking, resume


def _job_run(cfg: Config, *, resume: bool, restarted: bool):
    """The run folder: after a restart, the one this job started (tagged with torchrun's
    ``--rdzv-id``), so that restarted ranks continue it rather than begin another; with
    --resume, the newest; else a new one, tagged."""
    from distml.fsutil import write_text_atomic
    from distml.workflow.pipeline import Run, start_run

    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id is "none"
    project = cfg.output_dir / cfg.name
    if restarted and job != "none":
        for folder in sorted(project.glob("2*"), reverse=True):
            tag = folder / JOB_FILE
            if tag.is_file() and tag.read_text() == job:
                return Run(cfg, folder)
    if resume or (restarted and job == "none"):
        return start_run(cfg, resume=True)
    run = start_run(cfg)
    if job != "none":
        write_text_atomic(run.dir / JOB_FILE, job)
    return run


def main(argv: list[str] | None = None) -> NoReturn:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    try:
        # On several machines: the preflight checks, and gloo's interface, before the
        # process group exists.
        prepared = preflight.prepare_rank()
    except DistmlError as e:
        _fail(e)
    from torch.distributed.elastic.multiprocessing.errors import record

    from distml.distributed.runtime import run_worker

    run_worker(lambda: record(_train)(args, prepared=prepared))


def _train(args: argparse.Namespace, *, prepared: preflight.Prepared | None) -> None:
    from distml.distributed.runtime import init_distributed, shutdown

    across_nodes = prepared is not None
    try:
        if prepared is not None:
            prepared.release()  # rank 0's store takes its port over now
        env = init_distributed()
        from distml.training.candidate import SplitTensors, train_candidate

        # Given a config, this process is the pipeline: rank 0 holds its MLflow parent run.
        cfg, run_dir, manifest, tracking, resume = _prepare(args, env, across_nodes=across_nodes)
        names = [args.candidate] if args.candidate else [c.name for c in cfg.train.candidates]
        val = SplitTensors.load(manifest, "val")
        for name in names:
            cand = cfg.train.candidate(name)
            world = cfg.train.settings_for(cand).world_size
            if world != env.world_size:
                raise DistmlError(
                    f"candidate {name!r} has train.world_size={world}, but {env.world_size} "
                    f"processes were started; start {world} or set train.world_size="
                    f"{env.world_size}")
            train_candidate(cfg, cand, manifest, val=val, env=env,
                            out_dir=run_dir / "candidates" / name, resume=resume)
        if tracking is not None:
            tracking.close("FINISHED")
    except DistmlError as e:
        _fail(e)
    finally:
        shutdown()


def _fail(e: DistmlError) -> NoReturn:
    logger.error("%s", e)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under an agent: it reports the message
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    sys.stdout.flush()
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
