"""The keeper: why a parameter-server worker's death does not stop the job.

torchrun's agent (and so distml's local launcher, which is that agent) ends every process,
or restarts them all, as soon as one exits with an error. A worker rank of a
parameter-server job therefore runs as two processes: the process the agent started is a
keeper, which imports no torch, starts the real worker as its child (the same command and
environment, so the same rank) and waits for it. The child tells the keeper, through a
status file, when it is inside the worker loop. If the child is killed there by a signal
(SIGKILL, the OOM killer, a segfault), the keeper logs it and exits 0: the agent sees a rank
that finished, the servers have seen the connection drop and re-queued its work item, and
the job goes on with the other workers. A child that exits with an error, there or
anywhere (an exception in the worker: a bug or bad data, which another worker would hit
too), or dies anywhere else (start-up, a lost server), has its exit code passed on as the
keeper's own, so torchrun fails the job with its error as for any strategy.

A hung child (stopped, deadlocked) renews no lease: while in the loop its heartbeat thread
touches the status file every second. The servers declare it dead when its lease (in the
store) lapses for ``lease_s`` and re-queue its item; a status file untouched for twice that
(so the servers have acted first) makes the keeper SIGKILL the child, and then absorb that
death as above (otherwise the agent would wait for the rank for ever).

The child gets SIGKILL if the keeper dies (PR_SET_PDEATHSIG), and the agent's SIGTERM
reaches both (same process group): a child ended by it is not absorbed (the agent is
stopping the job, e.g. because another rank failed).

A dead worker rank does not come back as itself; new workers may join the running job
instead (``distml ps-worker``, which needs no keeper: no agent watches it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distml import processes

logger = logging.getLogger(__name__)

STATUS_ENV = "DISTML_PS_KEEPER_STATUS"


def mark(status: str) -> None:
    """In the child: record where it is ("worker": in the worker loop; "": elsewhere)."""
    path = os.environ.get(STATUS_ENV)
    if path:
        Path(path).write_text(status)


def beat() -> None:
    """In the child's heartbeat thread: renew the lease the keeper watches."""
    path = os.environ.get(STATUS_ENV)
    if path:
        with contextlib.suppress(OSError):
            os.utime(path)


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
    ps = [s.parallel.parameter_server for s in settings if s.parallel.record.servers
          and rank >= s.parallel.parameter_server.num_servers]
    if not ps:
        return None
    return keep(rank, sys.argv[1:], lease_s=max(p.lease_s for p in ps))


def keep(rank: int, args: list[str], *, lease_s: float) -> int:
    fd, status = tempfile.mkstemp(prefix=f"distml-keeper-{rank}-")
    os.close(fd)
    child = processes.start_child([sys.executable, "-m", "distml.train", *args],
                                  env={**os.environ, STATUS_ENV: status},
                                  signum=signal.SIGKILL)  # the keeper has one thread
    stopping: list[int] = []  # the agent ends the job: the child's death is no worker's loss

    def forward(sig: int, _: object) -> None:
        stopping.append(sig)
        child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code, hung = _wait(child, Path(status), lease_s)
    where = Path(status).read_text()
    with contextlib.suppress(OSError):
        os.unlink(status)
    if code >= 0 or where != "worker" or stopping:  # the job's, as for any rank
        return code if code >= 0 else 128 - code
    how = f"signal {signal.Signals(-code).name}"
    if hung:
        how = f"hung: no heartbeat for {2 * lease_s:g} s, killed with {how}"
    print(f"distml: parameter-server worker rank {rank} died ({how}); the job goes on "
          "without it", file=sys.stderr, flush=True)
    return 0


def _wait(child: subprocess.Popen, status: Path, lease_s: float) -> tuple[int, bool]:
    """The child's exit code, and whether the keeper killed it for a lapsed lease."""
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return child.wait(timeout=1.0), False
        with contextlib.suppress(OSError):
            if (status.read_text() == "worker"
                    and time.time() - status.stat().st_mtime > 2 * lease_s):
                child.kill()
                return child.wait(), True

