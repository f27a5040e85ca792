"""Running the ``distml`` command as a user does: a real subprocess in a given folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

# Ray 2.60's core aborts now and then with this message on a loaded machine (seen about once
# in a few dozen local runs, in tasks distml never touches); such a run is tried once more.
# Anything else, or the same failure twice, fails the test.
RAY_CORE_BUG = "You have likely discovered a bug in Ray"


def distml(*args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-m", "distml", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"distml {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def distml_on_ray(*args: str, cwd: Path, env: dict[str, str] | None = None):
    """``distml(...)`` for a command that runs on a Ray executor (see RAY_CORE_BUG)."""
    proc = distml(*args, cwd=cwd, env=env, check=False)
    if proc.returncode != 0 and RAY_CORE_BUG in proc.stdout + proc.stderr:
        proc = distml(*args, cwd=cwd, env=env, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"distml {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
