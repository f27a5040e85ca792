"""Scalability laws over measured timings.

For N workers with times T_N (T_1 on one worker):
- speedup S = T_1 / T_N, efficiency E = S / N;
- Karp-Flatt experimentally determined serial fraction e = (1/S - 1/N) / (1 - 1/N);
- Amdahl: S = 1 / ((1 - P) + P / N); P (the parallel fraction) is fitted to every point by
  least squares on 1/S - 1 = P (1/N - 1), and S_max = 1 / (1 - P);
- Gustafson (weak scaling, the work grows with N): scaled speedup S = N T_1 / T_N, and the
  serial fraction a in S = N - a (N - 1).

Each T_N is the median of repeated measurements, with their spread. A law fitted to a bad
measurement is worse than none: a point with efficiency above 1.05 (super-linear speedup on
a few cores is a warm-up or caching artifact until shown otherwise) or a one-worker time
under a second (too short to measure) is flagged, and Amdahl's law is then not fitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_EFFICIENCY = 1.05  # above: a measurement artifact until shown otherwise
MIN_SECONDS = 1.0  # a one-worker time below this is too short to measure


@dataclass(frozen=True)
class Point:
    workers: int
    seconds: float  # the median of the repeats
    seconds_min: float
    seconds_max: float
    repeats: int
    speedup: float
    efficiency: float
    karp_flatt: float | None  # undefined at N = 1


def analyze(samples: dict[int, list[float]], *, mode: str = "strong") -> dict[str, Any]:
    """Speedup, efficiency, Karp-Flatt per point; Amdahl's fit; Gustafson for weak scaling.

    ``samples`` maps worker counts (including 1) to repeated timings in seconds. In weak mode
    the work grew with N, so the speedup is the scaled speedup N T_1 / T_N.
    """
    if 1 not in samples:
        raise ValueError("the timings need a 1-worker point (the baseline T_1)")
    times = {n: float(np.median(v)) for n, v in samples.items()}
    t1 = times[1]
    points = []
    for n in sorted(times):
        s = t1 / times[n] * (n if mode == "weak" else 1)
        kf = None if n == 1 else (1 / s - 1 / n) / (1 - 1 / n)
        points.append(Point(n, times[n], min(samples[n]), max(samples[n]), len(samples[n]),
                            s, s / n, kf))
    warnings = _flags(points)
    p = None if warnings else fit_amdahl([(pt.workers, pt.speedup) for pt in points])
    out: dict[str, Any] = {
        "mode": mode,
        "points": [asdict(pt) for pt in points],
        "warnings": warnings,
        "amdahl_parallel_fraction": p,
        "amdahl_max_speedup": None if p is None else amdahl_max_speedup(p),
    }
    if mode == "weak":
        many = [pt for pt in points if pt.workers > 1]
        out["gustafson_serial_fraction"] = (
            float(np.mean([(pt.workers - pt.speedup) / (pt.workers - 1) for pt in many]))
            if many else None)
    return out


def _flags(points: list[Point]) -> list[str]:
    """What makes these timings unfit for a law, in words."""
    out = []
    if points[0].seconds < MIN_SECONDS:
        out.append(f"the stage took {points[0].seconds:.2f} s on one worker, too short to "
                   f"measure (under {MIN_SECONDS:g} s): give it more work")
    for pt in points:
        if pt.efficiency > MAX_EFFICIENCY:
            out.append(f"efficiency {pt.efficiency:.2f} at {pt.workers} workers is above "
                       f"{MAX_EFFICIENCY}: super-linear speedup is a measurement artifact "
                       "(warm-up, caching, a busy machine) until shown otherwise")
    return out


def fit_amdahl(points: list[tuple[int, float]]) -> float:
    """The parallel fraction P in [0, 1] that best fits (N, S) points to Amdahl's law."""
    x = np.array([1 / n - 1 for n, _ in points])
    y = np.array([1 / s - 1 for _, s in points])
    if not np.any(x):
        return 0.0
    return float(np.clip((x @ y) / (x @ x), 0.0, 1.0))


def amdahl_speedup(p: float, n: float) -> float:
    return 1.0 / ((1.0 - p) + p / n)


def amdahl_max_speedup(p: float) -> float | None:
    """1 / (1 - P); None when P = 1 (no bound)."""
    return None if p >= 1.0 else 1.0 / (1.0 - p)


def plot(analysis: dict[str, Any], path: Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = analysis["points"]
    n = np.array([p["workers"] for p in pts])
    grid = np.linspace(1, n.max(), 100)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(grid, grid, "--", color="grey", label="ideal (S = N)")
    # The speedup's spread: T_1's median over each repeat's extremes of T_N.
    t1 = pts[0]["seconds"] / pts[0]["speedup"]
    scale = n if analysis["mode"] == "weak" else np.ones_like(n)
    lo = [t1 * k / p["seconds_max"] for p, k in zip(pts, scale, strict=True)]
    hi = [t1 * k / p["seconds_min"] for p, k in zip(pts, scale, strict=True)]
    speedup = np.array([p["speedup"] for p in pts])
    ax.errorbar(n, speedup, yerr=[speedup - lo, np.array(hi) - speedup], fmt="o-",
                capsize=3, label=f"measured (median of {pts[0]['repeats']}, min-max)")
    frac = analysis["amdahl_parallel_fraction"]
    if frac is not None:
        ax.plot(grid, [amdahl_speedup(frac, g) for g in grid], ":",
                label=f"Amdahl fit, P = {frac:.3f}")
    ax.set(xlabel="workers N", ylabel="scaled speedup" if analysis["mode"] == "weak"
           else "speedup S = T1 / TN", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
