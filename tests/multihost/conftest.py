"""Two machines for the multi-host tests: node-a (10.231.0.1) and node-b (10.231.0.2).

They are network namespaces made once per test session and removed at its end, on failure
too; namespaces left by an earlier session that was killed are removed first. Each test
gets them clean: whatever it started in them is killed afterwards and the hosts files are
rewritten. The tests skip only where the environment says they cannot run (not root, a tool
missing); as root with the tools, as in CI, a namespace that cannot be made fails them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.helpers.multihost.netns import Cluster, probe, remove_stale, unavailable_reason


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason is not None:  # the environment says it cannot: skip, saying why
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    broken = probe()
    if broken is not None:  # root with the tools, yet no namespace: a broken set-up, seen
        pytest.fail(f"multi-host tests could not make a network namespace as root: {broken}")
    remove_stale()
    # A run stopped by SIGTERM (a timeout, a cancelled CI job) unwinds like Ctrl-C, so the
    # namespaces are still removed; SIGKILL cannot be caught: the next run's remove_stale().
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Cluster(("node-a", "node-b")) as made:
            yield made
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture
def nodes(cluster: Cluster) -> Iterator[Cluster]:
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            node.kill_all()
        cluster.write_hosts()
