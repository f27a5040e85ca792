"""A real ``distml serve`` on a free loopback port (started, waited for and stopped), and
the requests and metrics the serving tests read from it."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np


@contextlib.contextmanager
def running_server(*args: str, cwd: Path, env: dict[str, str] | None = None,
                   timeout: float = 90, verify: Any = True
                   ) -> Iterator[tuple[str, subprocess.Popen, list[str]]]:
    """Yields (base url, process, output lines so far); the port is picked by the server.
    ``verify``: httpx's, for the readiness check of a server with TLS (a CA file)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distml", "serve", "--port", "0", *args], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})})
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving \S+ at (https?://[\d.]+:\d+)", line)
            if m and not url:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the server did not start:\n" + "".join(lines))
        assert httpx.get(f"{url[0]}/v2/health/ready", verify=verify).status_code == 200
        yield url[0], proc, lines
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def infer_body(rows: np.ndarray, **extra: Any) -> dict:
    """An Open Inference Protocol request for ``rows`` (the input tensor as JSON), with
    ``extra`` request fields (id, outputs, parameters)."""
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.tolist()}], **extra}


def batches_run(url: str) -> float:
    """How many forward passes the server at ``url`` has run (its batch-size histogram's
    count)."""
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^distml_batch_rows_count (\S+)$", text, re.M).group(1))
