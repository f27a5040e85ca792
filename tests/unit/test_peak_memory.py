"""peak_memory on CPU is the process's own peak RSS, not its parent's: getrusage's
ru_maxrss survives exec, so every worker that verify or the launcher starts would report
the driver's peak (and all strategies would read the same)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from distml.training.trainer import peak_memory

BIG = 768 * 2**20


def test_a_child_process_reports_its_own_peak_not_its_parents():
    buffer = np.ones(BIG, dtype=np.uint8)  # touched: resident in this (the parent) process
    parent_peak = peak_memory()
    child = subprocess.run(
        [sys.executable, "-c", "from distml.training.trainer import peak_memory\n"
                               "print(peak_memory())"],
        capture_output=True, text=True, check=True)
    del buffer
    assert parent_peak >= BIG
    # The child imports torch like this process did, but never held the buffer.
    assert int(child.stdout) < parent_peak - BIG // 2
