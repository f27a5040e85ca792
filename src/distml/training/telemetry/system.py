"""System metrics sampled in the background: CPU % and RSS of this process, and GPU memory
and utilisation when CUDA is present. One daemon thread per process; ``summary()`` gives the
mean and peak since the last call."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import psutil
import torch


class SystemSampler:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._samples: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, float]:
        s = {"cpu_percent": self._process.cpu_percent(interval=None),
             "rss_bytes": float(self._process.memory_info().rss)}
        if torch.cuda.is_available():
            s["gpu_memory_bytes"] = float(torch.cuda.memory_allocated())
            with contextlib.suppress(Exception):  # needs pynvml; memory alone is still useful
                s["gpu_utilization"] = float(torch.cuda.utilization())
        return s

    def start(self) -> SystemSampler:
        self._process.cpu_percent(interval=None)  # the first reading only sets the baseline
        self._thread = threading.Thread(target=self._run, name="distml-system", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self.sample()
            with self._lock:
                self._samples.append(sample)

    def summary(self) -> dict[str, Any]:
        """Mean and peak of each measure since the last summary (a fresh sample if none)."""
        with self._lock:
            samples, self._samples = self._samples or [self.sample()], []
        out: dict[str, Any] = {"samples": len(samples)}
        for key in samples[0]:
            values = [s[key] for s in samples if key in s]
            out[f"{key}_mean"] = sum(values) / len(values)
            out[f"{key}_max"] = max(values)
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
