"""Launchers: start ``world_size`` training processes running ``python -m distml.train``.

The local launcher is torchrun's own elastic agent used as a library: it rendezvouses on a
free local port, prefixes each process's output with its rank, restarts every process up to
``train.max_restarts`` times when one dies (they resume from the last checkpoint), and on an
error or Ctrl-C tears every process down. Nothing here is a cluster engine of our own.

On one machine, the same as ``distml train`` with the local launcher::

    torchrun --standalone --nproc-per-node 2 -m distml.train examples/digits.yaml \\
        --set train.parallel.strategy=ddp --set train.parallel.world_size=2

On several machines, run on every node (10.0.0.1 is node 0, which serves the rendezvous;
the config and the output folder are on a file system every node shares)::

    distml train examples/digits.yaml --rdzv-endpoint 10.0.0.1:29500 --nnodes 2 \
        --rdzv-id my-job --set train.parallel.strategy=fsdp --set train.parallel.world_size=8

which checks the node (``preflight``) and then runs torch's agent as ``launch_node`` does:
the same as

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500 \
        --rdzv-id my-job --max-restarts 3 -m distml.train examples/digits.yaml \
        --set train.parallel.strategy=fsdp --set train.parallel.world_size=8
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from distml.config import Config
from distml.distributed import preflight
from distml.distributed.spark_launch import launch_on_spark
from distml.errors import DistmlError
from distml.rundir import RunDir

logger = logging.getLogger(__name__)


def launch_local(
    module: str, args: list[str], *, world_size: int, max_restarts: int, log_dir: Path,
    what: str,
) -> None:
    """Run ``python -m module *args`` on ``world_size`` local processes; ``what`` names the
    job in errors."""
    preflight.check_loopback()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
        monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), tee=Std.ALL),
        log_line_prefix_template="[rank ${local_rank}] ",
    )
    _launch(config, module, args, what=what)


def launch_node(
    module: str, args: list[str], *, node: preflight.Prepared, num_nodes: int,
    nproc_per_node: int, job_id: str, max_restarts: int, what: str, rdzv_conf: str = "",
    max_nodes: int | None = None,
) -> None:
    """This node's part of a job on ``num_nodes`` machines, each running this with the
    same node 0 (``node.route.master``, which serves the rendezvous on ``node.port``) and
    ``job_id``. ``node`` comes from ``preflight.prepare_node``, which checked this node.
    With ``max_nodes`` the job is elastic: ``num_nodes`` to ``max_nodes`` machines, the
    ranks re-formed whenever one leaves or joins (torchrun ``--nnodes MIN:MAX``); a round
    waits ``last_call_timeout`` (default 2 s) for more nodes once it has ``num_nodes``."""
    route, port = node.route, node.port
    # torch's agents share the rendezvous store with the ranks by default; then a new agent
    # (a node restarted after its agent died) waits forever for the store address, which
    # the surviving rank-0 agent publishes only once (torch 2.13). Unshared, every round
    # publishes it, and rank 0's process serves the ranks' store at this node's address.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    elastic = {"last_call_timeout": "2"} if max_nodes else {}
    config = LaunchConfig(
        min_nodes=num_nodes, max_nodes=max_nodes or num_nodes, nproc_per_node=nproc_per_node,
        run_id=job_id, rdzv_backend="c10d", rdzv_endpoint=f"{route.master}:{port}",
        # Whether this node serves the rendezvous, from its addresses rather than torch's
        # guess from the hostname; and the address it shows the others.
        # (--rdzv-conf is_host=0 overrides it: agents sharing one host, as in a benchmark)
        rdzv_configs={**elastic, "is_host": route.master_is_here,
                      **parse_rdzv_conf(rdzv_conf)},
        local_addr=route.own_addr,
        max_restarts=max_restarts, monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(tee=Std.ALL),
        log_line_prefix_template=f"[{socket.gethostname()} rank ${{rank}}] ",
    )
    node.release()  # the agent serves the rendezvous on it from now on
    _launch(config, module, args, what=what)


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """torchrun's --rdzv-conf: KEY=VALUE pairs separated by commas."""
    conf = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DistmlError(f"--rdzv-conf={text!r}: {item!r} is not KEY=VALUE; give e.g. "
                              "keep_alive_interval=2,keep_alive_max_attempt=3")
        conf[key.strip()] = value.strip()
    return conf


def _launch(config: LaunchConfig, module: str, args: list[str], *, what: str) -> None:
    try:
        elastic_launch(config, sys.executable)("-m", module, *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message
        if isinstance(message, dict):  # an error file written by the failed process
            message = message.get("message", "")
        if not failure.error_file_data:
            message = "see its log above"
        restarts = config.max_restarts
        raise DistmlError(
            f"{what} failed on rank {rank} (exit code {failure.exitcode}"
            f"{f', after {restarts} restarts' if restarts else ''}): "
            f"{str(message).strip()}"
        ) from None
    except SignalException as e:
        raise KeyboardInterrupt from e


def launch_training(run: RunDir, candidate: str, *, world_size: int, max_restarts: int,
                    resume: bool) -> None:
    """Train one candidate of ``run`` with ``python -m distml.train``, on the candidate's
    launcher (``train.parallel.launcher``)."""
    args = ["--run-dir", str(run.path), "--candidate", candidate, *(["--resume"] * resume)]
    cfg = run.load_config()
    launcher = cfg.train.settings_for(cfg.train.candidate(candidate)).parallel.launcher
    if launcher != "torchrun":
        executor = cfg.execution.executor
        master = executor.partition("://")[2] if executor.startswith("spark://") else \
            f"local[{world_size}]"
        if master and not master.startswith("local"):
            master = f"spark://{master}"
        said = launch_on_spark(args, world_size=world_size, master=master,
                               local_mode=launcher == "spark-local",
                               what=f"training {candidate!r}")
        logger.info("%s: %s (%s)", candidate, said, master)
        return
    launch_local("distml.train", args, world_size=world_size, max_restarts=max_restarts,
                 log_dir=run.logs(candidate), what=f"training {candidate!r}")


def node_shape(cfg: Config, candidates: list[str] | None, *, num_nodes: int | None
               ) -> tuple[int, int, int]:
    """(nodes, processes per node, max restarts) of a multi-node job training
    ``candidates`` (None: all); nodes default to the config's."""
    # The one place that reads the parallel settings for a multi-node launch.
    chosen = [cfg.train.candidate(n) for n in candidates] if candidates else cfg.train.candidates
    settings = [cfg.train.settings_for(c) for c in chosen]
    worlds = {s.parallel.world_size for s in settings}
    if len(worlds) > 1:
        raise DistmlError(f"the candidates have different train.parallel.world_size values "
                          f"{sorted(worlds)}; one job trains them all on one set of processes: "
                          "give --candidate to train them one at a time")
    (world,) = worlds
    nodes = num_nodes or settings[0].parallel.num_nodes
    if nodes < 1 or world % nodes:
        raise DistmlError(f"train.parallel.world_size={world} does not divide over {nodes} "
                          "nodes; use "
                          f"a number of nodes that divides {world} (e.g. --nnodes "
                          f"{max(1, min(world, 2))})")
    return nodes, world // nodes, max(s.max_restarts for s in settings)


def launch_training_nodes(
    cfg: Config, config: Path, overrides: list[str], *, candidate: str | None, resume: bool,
    num_nodes: int | None, node: preflight.Prepared, job_id: str, rdzv_conf: str = "",
) -> None:
    """``distml train --rdzv-endpoint``: this node's agent of a job training the config's
    candidates on several machines (``python -m distml.train CONFIG`` in every rank)."""
    chosen = [candidate] if candidate else None
    elastic = elastic_range(cfg, chosen)
    nodes, per_node, restarts = node_shape(cfg, chosen, num_nodes=num_nodes)
    if elastic is not None:
        nodes = elastic[0]
    args = [str(config.absolute()), *(a for o in overrides for a in ("--set", o)),
            *(["--candidate", candidate] if candidate else []), *(["--resume"] * resume)]
    launch_node("distml.train", args, node=node, num_nodes=nodes, nproc_per_node=per_node,
                job_id=job_id, max_restarts=restarts, what=f"training job {job_id!r}",
                rdzv_conf=rdzv_conf, max_nodes=elastic[1] if elastic else None)


def elastic_range(cfg: Config, candidates: list[str] | None) -> tuple[int, int] | None:
    """(min, max) nodes of an elastic job (``train.parallel.min_nodes``/``max_nodes``);
    None when it is not elastic."""
    chosen = [cfg.train.candidate(n) for n in candidates] if candidates else cfg.train.candidates
    ranges = {cfg.train.settings_for(c).parallel.node_range
              for c in chosen if cfg.train.settings_for(c).parallel.elastic}
    if not ranges:
        return None
    if len(ranges) > 1 or len(ranges) < len(chosen):
        raise DistmlError("the candidates have different train.parallel.min_nodes/max_nodes; "
                          "one elastic job trains them all on one set of nodes: give "
                          "--candidate to train them one at a time")
    return ranges.pop()
