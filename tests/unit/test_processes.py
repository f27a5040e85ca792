"""Process lifetimes: a child started through distml.processes ends with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distml.errors import DistmlError
from distml.processes import USER_ERROR, exit_on_user_error

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal is Linux's")

# A middle process starts a sleeping child, prints its pid and waits for ever.
_MIDDLE = """
import os, sys, time
from distml.processes import start_child
child = start_child([sys.executable, "-c", "import time; time.sleep(60)"],
                    env=dict(os.environ))
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):  # a zombie: dead, not reaped
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def test_a_child_dies_with_its_killed_parent():
    middle = subprocess.Popen([sys.executable, "-c", _MIDDLE], stdout=subprocess.PIPE,
                              text=True)
    child = int(middle.stdout.readline())
    middle.kill()  # SIGKILL: the middle process runs no cleanup
    middle.wait()
    assert _gone(child, within=10)


def test_a_child_whose_parent_is_already_gone_ends_itself():
    # The race prctl(2) warns about: the parent ended before the signal was set.
    code = ("import os, signal; from distml.processes import die_with_parent; "
            "die_with_parent(os.getppid() + 1_000_000, signum=signal.SIGTERM); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -signal.SIGTERM
    assert "alive" not in done.stdout


def test_a_user_error_ends_the_process_with_exit_code_2(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(DistmlError("train.epochs=0: give 1 or more"))
    assert e.value.code == USER_ERROR == 2
