"""Shared benchmark helpers: timing, machine facts, results as JSON, the README table."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
# DISTML_BENCH_QUICK=1: every benchmark runs a short version, to check that it runs; its
# figures are not results and nothing is saved.
QUICK = os.environ.get("DISTML_BENCH_QUICK") == "1"
README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


class LoadSampler:
    """The machine's 1-minute load average, sampled every few seconds from the first
    benchmark import on, so each result file says how busy the machine was while it ran."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._mark = 0
        thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        thread.start()

    def _run(self, interval_s: float) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            time.sleep(interval_s)

    def window(self) -> dict[str, Any]:
        """Load averages since the last call (one benchmark's run), and the 15-minute one."""
        got, self._mark = self.samples[self._mark:], len(self.samples)
        got = got or [os.getloadavg()[0]]
        return {"load_1min_median": statistics.median(got), "load_1min_max": max(got),
                "load_15min_at_end": os.getloadavg()[2], "cores": os.cpu_count()}


LOAD = LoadSampler()


def git_revision() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    root = Path(__file__).parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=False).stdout.strip()

    # The results this run has written already are not a change to the code measured.
    changed = git("status", "--porcelain", "--", "src", "bench", ":!bench/results")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed)}


def pin_ranks(proc: subprocess.Popen, cores: list[int]) -> threading.Thread:
    """Pin each training rank under ``proc`` (a process with LOCAL_RANK in its environment)
    to its own core, ``cores[LOCAL_RANK]``, from outside, as soon as it appears: the same
    for distml's launcher and for torchrun."""
    import psutil

    def run() -> None:
        pinned: set[int] = set()
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                children = parent.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                if child.pid in pinned:
                    continue
                try:
                    rank = child.environ().get("LOCAL_RANK")
                    if rank is not None:
                        child.cpu_affinity([cores[int(rank) % len(cores)]])
                        pinned.add(child.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def machine() -> dict[str, Any]:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def timed(fn: Callable[[], Any], *, repeats: int, setup: Callable[[], Any] | None = None
          ) -> list[float]:
    """Wall seconds of ``fn`` per repeat; dirty pages are flushed before each, so one run's
    writes do not slow the next."""
    out = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        os.sync()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def interleaved(contenders: dict[str, Callable[[], float]], *, repeats: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Each contender's figure per repeat. Every round runs all contenders, in an order
    rotated by one each round, so a drift in the machine (or a neighbour's burst) hits all
    alike; ``warmup`` rounds first, discarded."""
    names = list(contenders)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            value = contenders[name]()
            if r >= warmup:
                out[name].append(value)
    return out


def ratios(a: list[float], b: list[float]) -> list[float]:
    """a / b per repeat (the pairs ran in the same round)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def stats(xs: list[float]) -> dict[str, Any]:
    """Median and spread of one figure's repeats (min, max and the interquartile range),
    with the samples themselves."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (
        xs[0], xs[0], xs[0])
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q1,
            "q3": q3, "n": len(xs), "samples": xs}


def show(s: dict[str, Any] | list[float], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """'median (min-max)' of a figure's stats (or of its samples), for the README."""
    if isinstance(s, list):
        s = stats(s)
    f = lambda v: fmt.format(v * scale)  # noqa: E731
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": machine(), "revision": git_revision(), "load": LOAD.window(),
              **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# A figure quoted in README's prose: <!--fig:BENCH/KEY/...|SPEC-->text<!--/fig-->, where the
# path walks bench/results/BENCH.json (list indexes as numbers) and SPEC is a format spec
# with an optional scale ("*1000"): ".2f" by default. `make bench` rewrites the text; a test
# checks that every quoted figure is the one in the JSON.
FIGURE = re.compile(r"<!--fig:(?P<path>[^|>]+)(?:\|(?P<spec>[^>]*))?-->(?P<text>.*?)<!--/fig-->")


def figure(results: dict[str, Any], path: str, spec: str | None) -> str:
    """The text of one quoted figure (KeyError/IndexError: the path is not in the results)."""
    value: Any = results
    for part in path.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    spec, _, scale = (spec or ".2f").partition("*")
    return format(value * float(scale) if scale else value, spec)


def render_readme(text: str, rows: list[tuple[str, str, str, str]],
                  results: dict[str, Any]) -> str:
    """README with its benchmark table made of ``rows`` and every quoted figure refilled
    from ``results`` (benchmark name -> its JSON)."""
    if START in text and END in text:
        lines = ["| benchmark | measure | result | target |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + START + "\n" + "\n".join(lines) + "\n" + END + tail

    def fill(m: re.Match[str]) -> str:
        spec = "" if m["spec"] is None else f"|{m['spec']}"
        return f"<!--fig:{m['path']}{spec}-->{figure(results, m['path'], m['spec'])}<!--/fig-->"

    return FIGURE.sub(fill, text)


def load_results() -> dict[str, Any]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def update_readme(rows: list[tuple[str, str, str, str]]) -> None:
    README.write_text(render_readme(README.read_text(), rows, load_results()))


def processes() -> dict[int, list[str]]:
    """Every live process's /proc/<pid>/stat fields after its command: [0] state, [1] parent,
    [3] process group, [11] and [12] user and system CPU ticks (proc(5) numbers them 3 on)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            out[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
    return out
