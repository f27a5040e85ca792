"""Finding a job's processes for fault-injection tests: the tests tag the job's environment
with DISTML_TEST_PARENT=<marker>, which every process of its tree inherits."""

from __future__ import annotations

from pathlib import Path


def training_ranks(rank: int, marker: object) -> dict[int, list[bytes]]:
    """pid -> environment of each ``distml.train`` process with RANK=rank in the tree
    tagged with ``marker``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"distml.train" in cmd and f"RANK={rank}".encode() in env and \
                f"DISTML_TEST_PARENT={marker}".encode() in env:
            found[int(proc.name)] = env
    return found


def worker_pid(rank: int, marker: object) -> int | None:
    """The pid of the parameter-server worker process (the keeper's child) with RANK=rank,
    or of the rank's process when it has no keeper (a server), in the tree tagged with
    ``marker``."""
    found = {any(e.startswith(b"DISTML_PS_KEEPER_STATUS=") for e in env): pid
             for pid, env in training_ranks(rank, marker).items()}
    return found.get(True, found.get(False))
