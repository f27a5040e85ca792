"""Dask and Ray clusters whose processes run in the test nodes, as an operator starts them.

Each daemon's output goes to a log file under the test's folder (shown when a wait fails);
the cluster's processes are killed on exit, on failure too (and with the nodes, whatever is
left in them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from distml.distributed.network import SOCKET_IFNAME_VARS
from tests.helpers.multihost.netns import Node, kill_group

BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[3]


INHERITED_NOT = {*SOCKET_IFNAME_VARS, "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"}


def node_env(**extra: str) -> dict[str, str]:
    """The environment of processes in the nodes: this one, with the project importable
    (workers load tests.helpers), nothing that would send traffic through a proxy, and no
    collective or rendezvous settings this test process may have been given (an interface
    named for loopback here would keep gloo off the nodes' network)."""
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower() and k not in INHERITED_NOT}
    path = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    # Ray turns token authentication on when it finds a token in ~/.ray (which other runs
    # on this machine may leave); these clusters live on a private test network: off.
    env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", **extra)
    return env


@dataclass
class Daemon:
    node: Node
    proc: subprocess.Popen
    log: Path

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.log.name}: no {text!r} "
                                     f"(exit code {self.proc.poll()}):\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL its whole process group: the daemon and the processes it started."""
        kill_group(self.proc)
        self.proc.wait(10)


def start(node: Node, argv: list[str], log: Path, **env: str) -> Daemon:
    with log.open("w") as out:
        proc = node.popen(argv, env=node_env(**env), stdout=out, stderr=subprocess.STDOUT)
    return Daemon(node, proc, log)


@dataclass
class DaskCluster:
    scheduler: Daemon
    workers: dict[str, Daemon] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.scheduler.node.addr}:8786"

    def add_worker(self, node: Node, logs: Path) -> Daemon:
        worker = start(node, [
            str(BIN / "dask"), "worker", f"tcp://{self.address}",
            "--host", node.addr, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
            "--name", node.hostname, "--local-directory", str(logs / f"dask-{node.hostname}"),
        ], logs / f"dask-worker-{node.hostname}.log")
        worker.wait_for("Registered to:")
        self.workers[node.hostname] = worker
        return worker


@contextlib.contextmanager
def dask_cluster(scheduler: Node, workers: list[Node], logs: Path) -> Iterator[DaskCluster]:
    """A scheduler on ``scheduler`` (port 8786), one single-threaded worker per node."""
    logs.mkdir(parents=True, exist_ok=True)
    daemons: list[Daemon] = []
    try:
        sched = start(scheduler, [
            str(BIN / "dask"), "scheduler", "--host",
            scheduler.addr, "--port", "8786", "--no-dashboard"], logs / "dask-scheduler.log")
        daemons.append(sched)
        sched.wait_for("Scheduler at:")
        cluster = DaskCluster(sched)
        for node in workers:
            daemons.append(cluster.add_worker(node, logs))
        yield cluster
    finally:
        for d in daemons:
            kill_group(d.proc)


@dataclass
class RayCluster:
    head: Daemon
    workers: dict[str, Daemon] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The Ray Client address (``ray://`` + this is what distml takes)."""
        return f"{self.head.node.addr}:10001"


def _ray_start(node: Node, logs: Path, *args: str) -> Daemon:
    # Each node its own temp folder, as on separate machines (its sockets live there; a
    # short path, since a Unix socket's path is limited to 107 bytes).
    temp = Path(f"/tmp/dmray-{node.ns}")
    shutil.rmtree(temp, ignore_errors=True)
    return start(node, [
        str(BIN / "ray"), "start", "--block", "--node-ip-address", node.addr,
        "--num-cpus", "1", "--object-store-memory", str(80 * 2**20), "--disable-usage-stats",
        "--include-log-monitor", "false", "--temp-dir", str(temp), *args],
        logs / f"ray-{node.hostname}.log",
        # A dead node is declared dead after 2 missed health checks 1 s apart (Ray's
        # default: 5 checks 3 s apart), so that the test of a node dying is quick.
        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="2")


@contextlib.contextmanager
def ray_cluster(head: Node, workers: list[Node], logs: Path) -> Iterator[RayCluster]:
    """A head on ``head`` (GCS on 6379, Ray Client on 10001), one worker node per node;
    each node advertises its own address (``--node-ip-address``), never 127.0.0.1."""
    logs.mkdir(parents=True, exist_ok=True)
    daemons: list[Daemon] = []
    try:
        daemons.append(_ray_start(head, logs, "--head", "--port", "6379",
                                  "--ray-client-server-port", "10001",
                                  "--include-dashboard", "false"))
        cluster = RayCluster(daemons[0])
        for node in workers:  # started together: a worker retries the head until it is up
            daemons.append(_ray_start(node, logs, "--address", f"{head.addr}:6379"))
            cluster.workers[node.hostname] = daemons[-1]
        for daemon in daemons:
            daemon.wait_for("Ray runtime started", timeout=90)
        yield cluster
    finally:
        # Ray's daemons (raylet, GCS, workers) leave the group of `ray start`: everything
        # in the nodes goes.
        for node in {id(d.node): d.node for d in daemons}.values():
            node.kill_all()
        for d in daemons:  # its logs are kept with the test's, its sockets are not
            temp = Path(f"/tmp/dmray-{d.node.ns}")
            for f in temp.glob("session_latest/logs/*.err"):
                shutil.copy(f, logs / f"{d.node.hostname}-{f.name}")
            shutil.rmtree(temp, ignore_errors=True)
