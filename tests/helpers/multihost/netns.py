"""Machines for tests: Linux network namespaces as "nodes" with their own address and hostname.

A ``Cluster`` makes one namespace per node plus a "switch" namespace holding a bridge; each
node's ``eth0`` is one end of a veth pair whose other end is on that bridge, so every node
reaches every other one at its address in a private test subnet, and nothing outside the
cluster (the host's own namespace included) is reachable or touched. Each node gets a hosts
file (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` bind-mounts over ``/etc/hosts``)
and every command runs under ``unshare --uts`` with the node's hostname set. The file system
is the host's: shared, as a multi-node run's output folder must be.

Namespace names carry the owning process's pid (``dml<pid>-<node>``), so tests running at
the same time never touch each other's nodes, and ``remove_stale()`` deletes only the
namespaces of processes that are gone (a test run killed before its teardown).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "dml"
SUBNET = "10.231.0"  # a private /24 that exists only inside the test namespaces
NETNS_ETC = Path("/etc/netns")
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")
_COUNT = itertools.count()


def unavailable_reason() -> str | None:
    """Why this environment says namespaces cannot be made here (not root, a tool missing),
    or None when it should be able to: then a failure to make one is a broken set-up, which
    ``probe()`` reports, not a reason to skip."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    missing = [tool for tool in ("ip", "ss", "unshare", "mount", "hostname")
               if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not found (ip and ss: apt-get install iproute2; "
                "unshare and mount: util-linux, mount; hostname: hostname)")
    return None


def probe() -> str | None:
    """Make and delete one namespace; the error if that fails, else None."""
    name = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", name, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def delete_namespace(ns: str) -> None:
    """Kill what runs in ``ns``, then delete it and its /etc/netns folder."""
    for _ in range(50):
        pids = ns_pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    _ip("netns", "delete", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def remove_stale() -> list[str]:
    """Delete the namespaces of test runs whose process is gone; returns their names."""
    stale = [ns for ns in namespaces()
             if (m := _NAME.match(ns)) and not _alive(int(m.group(1)))]
    for ns in stale:
        delete_namespace(ns)
    for folder in NETNS_ETC.glob(f"{PREFIX}*-*") if NETNS_ETC.is_dir() else []:
        m = _NAME.match(folder.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
    return stale


@dataclass
class Node:
    """One machine: a namespace, an address and a hostname."""

    ns: str
    hostname: str
    addr: str
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def hosts_file(self) -> Path:
        return NETNS_ETC / self.ns / "hosts"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in this node: its network, hosts file and hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *argv]

    def popen(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              **kw) -> subprocess.Popen:
        """Start ``argv`` here in its own process group (``kill_group`` ends all of it)."""
        proc = subprocess.Popen(self.command(argv), env=env, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        return subprocess.run(self.command(argv), env=env, timeout=timeout, text=True,
                              start_new_session=True, **kw)

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        """Until something in this node listens on TCP ``port``."""
        deadline = time.monotonic() + timeout
        while f":{port} " not in self.run(["ss", "-ltnH"]).stdout + " ":
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {self.hostname}:{port}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return ns_pids(self.ns)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Every process of this node, as when the machine (or its pod) dies."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class Cluster:
    """Nodes ``name -> hostname`` on one bridge; a context manager that removes them all."""

    def __init__(self, hostnames: Sequence[str]) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-c{next(_COUNT)}"
        self.switch = f"{self.tag}sw"
        self.nodes = [Node(f"{self.tag}n{i}", h, f"{SUBNET}.{i + 1}")
                      for i, h in enumerate(hostnames)]

    def __getitem__(self, hostname: str) -> Node:
        return next(n for n in self.nodes if n.hostname == hostname)

    def __enter__(self) -> Cluster:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            _ip("netns", "add", node.ns)
            # Both ends are made in the switch namespace (names there are private), then
            # one end moves into the node and becomes its eth0.
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth",
                "peer", "name", f"e{i}")
            _ip("-n", self.switch, "link", "set", f"e{i}", "netns", node.ns)
            _ip("-n", node.ns, "link", "set", f"e{i}", "name", "eth0")
            _ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _ip("-n", node.ns, "link", "set", "eth0", "up")
            _ip("-n", node.ns, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
        self.write_hosts()

    def write_hosts(self, overrides: dict[str, str] | None = None) -> None:
        """Every node's hosts file: localhost, then each node's hostname at its address.

        ``overrides`` maps a hostname to another address (e.g. 127.0.1.1, the Debian
        installer's default, to reproduce the classic "hostname resolves to loopback").
        """
        overrides = overrides or {}
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{overrides.get(n.hostname, n.addr)} {n.hostname}" for n in self.nodes]
        for node in self.nodes:
            node.hosts_file.parent.mkdir(parents=True, exist_ok=True)
            node.hosts_file.write_text("\n".join(lines) + "\n")
            # No name server: a name not in the hosts file fails at once, on loopback.
            node.hosts_file.with_name("resolv.conf").write_text("nameserver 127.0.0.1\n")

    def close(self) -> None:
        for node in self.nodes:
            for proc in node.procs:
                kill_group(proc)
            delete_namespace(node.ns)
            for proc in node.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        delete_namespace(self.switch)


@contextlib.contextmanager
def cluster(*hostnames: str) -> Iterator[Cluster]:
    with Cluster(hostnames) as c:
        yield c
