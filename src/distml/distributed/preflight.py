"""Preflight: the classic multi-node misconfigurations, caught in seconds with their fix.

Without these checks each of them shows up as a hang until some timeout (torch's rendezvous
retries for minutes, its store waits 10 minutes) or as an error from deep inside torch:

- this node's hostname resolves to a loopback address: torch's agent then does not see that
  it is the rendezvous host, and gloo binds to loopback;
- the master address does not resolve, has no route, or resolves to loopback here;
- nothing listens on the rendezvous port (checked from the nodes that do not serve it);
- the output folder is not shared: the nodes do not see each other's files (checked once
  the ranks are connected: rank 0 writes a marker, every rank must read it back).

They run in distml's launcher before torch's agent starts (``distml train --nnodes``) and in
every rank of a multi-node job before its process group (``python -m distml.train`` under
torchrun or started by a PyTorchJob). ``DISTML_PREFLIGHT=0`` skips them;
``DISTML_PREFLIGHT_WAIT`` (seconds, default 5) is how long a node waits for the master's port
to open, since the master node may start a little later.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distml.distributed.network import (
    NetworkError,
    Route,
    hostname_addresses,
    is_loopback,
    local_addresses,
    resolve,
    route_to,
    set_collective_interface,
)

if TYPE_CHECKING:  # torch is imported only after the checks (they fail fast without it)
    from distml.distributed.runtime import DistEnv

logger = logging.getLogger(__name__)

SKIP = "set DISTML_PREFLIGHT=0 to skip these checks"
MASTER = "the master (MASTER_ADDR:MASTER_PORT)"


class PreflightError(NetworkError):
    """A multi-node misconfiguration, found before any rank started."""


def enabled() -> bool:
    return os.environ.get("DISTML_PREFLIGHT", "1").lower() not in ("0", "false", "no")


def wait_seconds() -> float:
    return float(os.environ.get("DISTML_PREFLIGHT_WAIT", "5"))


def check_loopback() -> None:
    """One machine: ranks meet on 127.0.0.1, so loopback must work (a container or network
    namespace can start with ``lo`` down)."""
    try:
        with socket.create_server(("127.0.0.1", 0)) as server, \
                socket.create_connection(server.getsockname(), timeout=2):
            pass
    except OSError as e:
        raise PreflightError(f"the loopback interface does not work ({e.strerror}); ranks on "
                             "one machine meet on 127.0.0.1: bring it up (ip link set lo up)"
                             ) from None


@dataclass
class Prepared:
    """A node that passed preflight: its route to the master and, on the node that serves
    the master's port, that port held open until torch takes it over, so that the other
    nodes' checks find it open while this one still loads torch."""

    route: Route
    port: int
    held: socket.socket | None = None

    def release(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None


def check_node(master: str, port: int, *, what: str) -> Prepared:
    """The checks one node can make alone, before starting ranks: the route to ``master``,
    the hostname, and the port (free here if ``master`` is this node, else open there)."""
    route = check_route(master, port, what=what)
    hostname_error = hostname_problem(route)
    if hostname_error is not None:
        raise hostname_error
    return Prepared(route, port, check_port(route, port, serves=route.master_is_here,
                                            what=what))


def check_route(master: str, port: int, *, what: str) -> Route:
    route = route_to(master, port)
    if is_loopback(route.master_ip):
        raise PreflightError(
            f"{what} {master}:{port} resolves to the loopback address {route.master_ip} on "
            f"this node, where the other nodes cannot reach it; give node 0's address on the "
            f"network the nodes share ({SKIP})")
    return route


def hostname_problem(route: Route) -> PreflightError | None:
    name, addrs = hostname_addresses()
    if not addrs or not all(is_loopback(a) for a in addrs):
        return None
    return PreflightError(
        f"this node's hostname {name!r} resolves to {', '.join(addrs)} (loopback), so torch's "
        f"rendezvous and gloo would offer the other nodes an address they cannot reach and "
        f"the job would hang; map the name to this node's address: in /etc/hosts, replace "
        f"'{addrs[0]} {name}' with '{route.own_addr} {name}' (or fix DNS) ({SKIP})")


def check_port(route: Route, port: int, *, serves: bool, what: str) -> socket.socket | None:
    """The node that serves the port must be free to listen on it (when the address is
    its own: behind a Kubernetes service it is not), and gets it, listening; the others
    wait for it to open."""
    if not serves:
        wait_for_port(route, port, what=what, seconds=wait_seconds())
    elif route.master_ip in local_addresses():
        return _listen(route, port, what=what)
    return None


def _listen(route: Route, port: int, *, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in route.master_ip else socket.AF_INET
    try:  # (with SO_REUSEADDR: torch binds the port again the moment this one closes)
        return socket.create_server((route.master_ip, port), family=family)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        raise PreflightError(
            f"port {port} of {what} {route.master}:{port} is already in use on this node "
            f"(another job?); stop it or choose another port ({SKIP})") from None


def wait_for_port(route: Route, port: int, *, what: str, seconds: float) -> None:
    """Connect to the master's port; refused connections are retried for ``seconds``."""
    deadline = time.monotonic() + seconds
    where = f"{route.master}:{port}"
    if route.master_ip != route.master:
        where += f" ({route.master_ip})"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((route.master_ip, port), timeout=max(left, 0.5)):
                return
        except ConnectionRefusedError:
            if left > 0:
                time.sleep(min(0.25, left))
                continue
            raise PreflightError(
                f"nothing listens on {what} {where}, as seen from this node "
                f"({route.own_addr}) for {seconds:g} s: start node 0 (at {route.master_ip}) "
                f"first, and check that the port is the one it uses and that no firewall "
                f"rejects it (DISTML_PREFLIGHT_WAIT={seconds:g} is how long a node waits; "
                f"{SKIP})") from None
        except TimeoutError:
            raise PreflightError(
                f"{what} {where} does not answer this node ({route.own_addr}) within "
                f"{seconds:g} s: a firewall dropping the port, or the wrong address; check "
                f"that node 0 is at {route.master_ip} and its port is open ({SKIP})") from None
        except OSError as e:
            raise PreflightError(f"{what} {where} cannot be reached from this node: "
                                 f"{e.strerror} ({SKIP})") from None


def prepare_node(endpoint: str) -> Prepared:
    """In distml's launcher, before torch's agent starts: the checks for this node of a
    multi-node job at ``endpoint`` (HOST:PORT of node 0), then gloo's and nccl's interface,
    which the ranks inherit. The caller releases the port before the agent starts."""
    host, port = parse_endpoint(endpoint)
    what = "the rendezvous endpoint (--rdzv-endpoint)"
    prepared = (check_node(host, port, what=what) if enabled()
                else Prepared(route_to(host, port), port))
    set_collective_interface(prepared.route)
    return prepared


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PreflightError(f"--rdzv-endpoint={endpoint!r} is not HOST:PORT; give node 0's "
                             "address and a free port, e.g. 10.0.0.1:29500")
    return host.strip("[]"), int(port)


def launched_across_nodes() -> bool:
    """Whether this process is a rank of a job that spans several machines."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        return False
    if env.get("GROUP_WORLD_SIZE"):  # under torchrun's agent: the number of agents
        return int(env["GROUP_WORLD_SIZE"]) > 1
    if env.get("WORLD_SIZE") and env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"]) < int(env["WORLD_SIZE"])
    # Started by hand or by a PyTorchJob (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT only):
    # a master elsewhere than on loopback means other machines.
    return not is_loopback(resolve(env["MASTER_ADDR"]))


def prepare_rank() -> Prepared | None:
    """In a rank of a multi-node job, before its process group: the checks, then gloo's and
    nccl's interface (the one on the route to the master). None on one machine; else the
    caller releases the port before creating the process group."""
    if not launched_across_nodes():
        return None
    master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    prepared = Prepared(route_to(master, port), port)
    if enabled():
        prepared.route = check_route(master, port, what=MASTER)
        problem = hostname_problem(prepared.route)
        if problem is not None:
            # The ranks are past the agents' rendezvous, and the interface set below keeps
            # gloo off loopback: worth fixing, not worth failing a job that will run.
            logger.warning("%s", problem)
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            # Started without torch's agent (by hand, by a PyTorchJob): rank 0 serves the
            # store, the others wait for it. (Under an agent, the agents have met already.)
            prepared.held = check_port(prepared.route, port, what=MASTER,
                                       serves=os.environ.get("RANK", "0") == "0")
    set_collective_interface(prepared.route)
    return prepared


def check_output_shared(folder: Path, env: DistEnv) -> None:
    """Every rank must see what rank 0 writes to ``folder`` (collective: all ranks call it).

    Rank 0 writes a marker named by a fresh nonce, which the ranks learn over the process
    group; the others look for it for up to ``wait_seconds()`` (a network file system may
    show a new file with a delay)."""
    from distml.distributed.runtime import broadcast_object, gather_objects

    seconds = wait_seconds()

    nonce = broadcast_object(uuid.uuid4().hex if env.is_main else None, env)
    marker = folder / f".distml-preflight-{nonce}"
    seen = env.is_main
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(nonce))
    deadline = time.monotonic() + seconds
    while not seen and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            seen = marker.read_text() == nonce
        if not seen:
            time.sleep(0.1)
    answers = gather_objects((seen, socket.gethostname()), env)
    if env.is_main:
        marker.unlink(missing_ok=True)
    missing = ", ".join(f"rank {r} on {host}" for r, (ok, host) in enumerate(answers) if not ok)
    if missing:
        raise PreflightError(
            f"the output folder {folder} is not shared: {missing} cannot see the file that "
            f"rank 0 wrote there; a multi-node run needs output_dir on a file system that "
            f"every node mounts at the same path (NFS, a shared volume), since rank 0 writes "
            f"the data and every rank its checkpoint shards ({SKIP})")
