"""``python -m distml.train``: one training process; torchrun and the local launcher run it.

    torchrun --standalone --nproc-per-node 2 -m distml.train CONFIG --set train.strategy=ddp \\
        --set train.world_size=2

Given a CONFIG, rank 0 creates the run folder and ingests the data (the other ranks wait and
read it: on several nodes the output folder must be shared); given ``--run-dir`` (the local
launcher), the run's saved config and data are used. A restarted process (torchrun's
``--max-restarts``) resumes from the last checkpoint. See ``distml.distributed.launch`` for
the multi-node command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from distml.config import load_config
from distml.data.dataset import Manifest
from distml.distributed.runtime import DistEnv, init_distributed, run_worker, shutdown
from distml.errors import DistmlError
from distml.monitoring.mlflow_tracking import PipelineTracking

logger = logging.getLogger("distml")


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


def _prepare(args: argparse.Namespace, env: DistEnv):
    """The run folder and the ingested data, made by rank 0, seen by every rank."""
    from distml.workflow.pipeline import stage_ingest, start_run

    if args.run_dir is not None:
        cfg = load_config(args.run_dir / "config.yaml")
        return cfg, args.run_dir, Manifest.read(args.run_dir / "data"), None
    cfg = load_config(args.config, args.overrides)
    run_dir = tracking = None
    if env.is_main:
        run = start_run(cfg, resume=args.resume)
        tracking = PipelineTracking.start(cfg, run.dir)
        stage_ingest(run)
        run_dir = run.dir
    run_dir = Path(_broadcast(str(run_dir), env))
    return cfg, run_dir, Manifest.read(run_dir / "data"), tracking


@record
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    env = init_distributed()
    try:
        from distml.training.candidate import SplitTensors, train_candidate

        # Given a config, this process is the pipeline: rank 0 holds its MLflow parent run.
        cfg, run_dir, manifest, tracking = _prepare(args, env)
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
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
                            out_dir=run_dir / "candidates" / name,
                            resume=args.resume or restarted)
        if tracking is not None:
            tracking.close("FINISHED")
    except DistmlError as e:
        logger.error("%s", e)
        ErrorHandler().record_exception(e)  # the launcher reports it, naming this rank
        raise SystemExit(2) from None
    finally:
        shutdown()


if __name__ == "__main__":
    run_worker(main)
