"""A loader map function that makes each batch take a while (for fault-injection tests)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def sleepy(x, y):
    time.sleep(0.01)
    return x, y


def sleepier(x, y):
    time.sleep(0.05)
    return x, y


def paced(x, y):
    """Sleep the seconds written in the file $DISTML_TEST_PACE names (none if it is absent):
    a test slows a job down while it waits for a node to join, without timing guesses."""
    path = os.environ.get("DISTML_TEST_PACE")
    with contextlib.suppress(OSError, ValueError):
        time.sleep(float(Path(path).read_text()) if path else 0.0)
    return x, y
