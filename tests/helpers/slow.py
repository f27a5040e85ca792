"""A loader map function that makes each batch take a while (for fault-injection tests)."""

from __future__ import annotations

import time


def sleepy(x, y):
    time.sleep(0.01)
    return x, y


def sleepier(x, y):
    time.sleep(0.05)
    return x, y
