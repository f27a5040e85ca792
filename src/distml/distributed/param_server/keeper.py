"""The keeper: why a parameter-server worker's death does not stop the job.

torchrun's agent (and so distml's local launcher, which is that agent) ends every process,
or restarts them all, as soon as one exits with an error. A worker rank of a
parameter-server job therefore runs as two processes: the process the agent started is a
keeper, which imports no torch, starts the real worker as its child (the same command and
environment, so the same rank) and waits for it. The child tells the keeper, through a
status file, when it is inside the worker loop. If the child dies there (SIGKILL, OOM, a
crash), the keeper logs it and exits 0: the agent sees a rank that finished, the servers
have seen the connection drop and re-queued its work item, and the job goes on with the
other workers. A death anywhere else (start-up, a lost server) is passed on as the
keeper's own exit code, so torchrun handles it as for any strategy. The child gets SIGKILL
if the keeper dies (PR_SET_PDEATHSIG), and the agent's SIGTERM reaches both (same process
group).

A dead worker does not rejoin: a gloo process group takes no new member.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from distml import processes

logger = logging.getLogger(__name__)

STATUS_ENV = "DISTML_PS_KEEPER_STATUS"


def mark(status: str) -> None:
    """In the child: record where it is ("worker": in the worker loop; "": elsewhere)."""
    path = os.environ.get(STATUS_ENV)
    if path:
        Path(path).write_text(status)


def keep_if_worker(config: str | None, run_dir: Path | None, candidate: str | None,
                   overrides: list[str]) -> int | None:
    """Run this rank under a keeper if it is a parameter-server worker in any candidate it
    trains; the keeper's exit code, or None to run as usual (here, no keeper needed)."""
    if os.environ.get(STATUS_ENV) is not None or "RANK" not in os.environ:
        return None  # the child itself, or not launched
    from distml.config import load_config
    from distml.rundir import RunDir

    try:
        cfg = (RunDir(run_dir).load_config() if run_dir is not None
               else load_config(config, overrides))
        names = [candidate] if candidate else [c.name for c in cfg.train.candidates]
        settings = [cfg.train.settings_for(cfg.train.candidate(n)) for n in names]
    except Exception:  # noqa: BLE001 - the process itself reports a bad config
        return None
    rank = int(os.environ["RANK"])
    if not any(s.parallel.record.servers
               and rank >= s.parallel.parameter_server.num_servers for s in settings):
        return None
    return keep(rank, sys.argv[1:])


def keep(rank: int, args: list[str]) -> int:
    fd, status = tempfile.mkstemp(prefix=f"distml-keeper-{rank}-")
    os.close(fd)
    child = processes.start_child([sys.executable, "-m", "distml.train", *args],
                                  env={**os.environ, STATUS_ENV: status},
                                  signum=signal.SIGKILL)  # the keeper has one thread
    signal.signal(signal.SIGTERM, lambda sig, _: child.send_signal(sig))
    signal.signal(signal.SIGINT, lambda sig, _: child.send_signal(sig))
    code = child.wait()
    where = Path(status).read_text()
    with contextlib.suppress(OSError):
        os.unlink(status)
    if code == 0 or where != "worker":
        return code if code >= 0 else 128 - code
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    print(f"distml: parameter-server worker rank {rank} died ({how}); the job goes on "
          "without it", file=sys.stderr, flush=True)
    return 0

