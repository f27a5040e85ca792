"""Process lifetimes: how every process distml starts dies with its parent, logs, and ends.

distml starts processes in four places: the launcher (torch's agent starts ``python -m
distml.train``), the parameter-server keeper (the real worker as its child), the serving
replica set (one process per replica) and the local executor (a pool of workers). A child
must not outlive its parent: a SIGKILLed front or keeper runs no cleanup, and an orphaned
replica would keep its model and its socket for ever. Linux's parent-death signal ends the
child instead; ``die_with_parent`` sets it as prctl(2) advises: first the signal, then a
check that the parent is still the one expected, because a parent that died before the
signal was set sends none (the child was already re-parented).

Every such process logs plain lines in the same format, and a user error (DistmlError)
ends it with exit code 2, recorded for torch's agent when one started it (the agent then
names the rank and the message in its report).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import IO, NoReturn

from distml.errors import DistmlError

logger = logging.getLogger("distml")  # a user error reads "ERROR distml: <message>"

USER_ERROR = 2  # the exit code of a user mistake, the CLI's and every started process's
LOG_FORMAT = "%(asctime)s %(levelname)s {who}: %(message)s"
_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[[int, int], int] | None:
    """libc's prctl, looked up before any fork (not in a forked child of threads)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int, *, signum: int = signal.SIGTERM,
                    prctl: Callable[[int, int], int] | None = None) -> None:
    """In a child, first thing: receive ``signum`` when the process ``parent`` ends, even
    killed. If it already ended (the signal was set too late to come), act as if it came.
    Elsewhere than Linux only the check is made."""
    prctl = prctl or _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def start_child(args: list[str], *, env: dict[str, str],
                signum: int = signal.SIGKILL) -> subprocess.Popen:
    """Start ``args`` as a child that gets ``signum`` when this process ends. Only for a
    process with one thread: the set-up runs between fork and exec."""
    parent, prctl = os.getpid(), _prctl()
    return subprocess.Popen(args, env=env,
                            preexec_fn=lambda: die_with_parent(parent, signum=signum,
                                                               prctl=prctl))


def setup_logging(*, who: str = "%(name)s", stream: IO[str] | None = None) -> None:
    """Plain log lines (a started process has no terminal of its own to draw on); ``who``
    names the process or, by default, the logger."""
    logging.basicConfig(level=logging.INFO, stream=stream or sys.stdout,
                        format=LOG_FORMAT.format(who=who))


def exit_on_user_error(e: DistmlError) -> NoReturn:
    """A user error ends this process: logged, recorded for the agent that started it (if
    one did), and exit code 2."""
    logger.error("%s", e)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under an agent: it reports the message
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    sys.stdout.flush()
    raise SystemExit(USER_ERROR) from None

