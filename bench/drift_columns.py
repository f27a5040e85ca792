"""Column drift at any size and label-free accuracy, distml against its peers on the same
data in the same run (bench/drift.py runs it; ``DISTML_BENCH_QUICK=1`` a short one).

Data: 8 columns, c0-c3 continuous (standard normal), c4-c7 discrete (5 values with unequal
shares); the reference is 20,000 rows. Each seed's rows come from a generator seeded apart
from the reference's.

- **False alarms at defaults**: per seed, a stationary stream of ``STATIONARY_ROWS`` rows
  cut into tests of 10^3, 10^4, 10^5 and 10^6 rows; a test that names any column is a false
  alarm; the figure is alarms per 10^6 stationary rows, the worst batch size. Peers run the
  first ``PEER_TESTS`` tests of the same streams (they are slower), scaled the same way.
- **Detection delay**: per seed and shift (0.1, 0.25, 0.5 standard deviations of c1), the
  smallest prefix of the shifted stream, among ``WINDOWS``, whose test names c1 (what else
  it names is kept); not detected within 10^5 rows counts as 2 x 10^5 in the medians.
- **Estimated accuracy** (CBPE): a random forest (probabilities uncalibrated) trained on
  3,000 rows of a noisy linear concept, its calibration fitted on 2,000 validation rows and
  checked on 2,000 held-out rows (distml), or fitted on those held-out rows (NannyML, its
  reference); then 50,000 stationary rows and 50,000 rows drifting toward the boundary,
  in chunks of 5,000: the mean absolute gap to the realised accuracy, in points.
Peers: Evidently's DataDriftPreset and alibi-detect's TabularDrift (KS / chi-squared) for
columns, NannyML's CBPE for accuracy, each in its own virtual environment (bench/peers).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SHARES = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
CONTINUOUS, DISCRETE = [0, 1, 2, 3], [4, 5, 6, 7]
REF_ROWS = 20_000
BATCHES = (1_000, 10_000, 100_000, 1_000_000)
PEER_TESTS = {1_000: 20, 10_000: 10, 100_000: 2, 1_000_000: 1}
SHIFTS = (0.1, 0.25, 0.5)
# from the smallest test size whose false alarms are measured: a tool that names columns
# by noise in smaller tests would look fast there
WINDOWS = (1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000)
TARGET = 1  # the shifted column
MISSED = 2 * WINDOWS[-1]
COLUMN_PEERS = ("evidently", "alibi_detect")
CHUNK, CBPE_ROWS = 5000, 50_000


def rows(n: int, rng: np.random.Generator) -> np.ndarray:
    cont = rng.normal(size=(n, len(CONTINUOUS)))
    disc = rng.choice(len(SHARES), size=(n, len(DISCRETE)), p=SHARES)
    return np.concatenate([cont, disc], axis=1).astype(np.float32)


def distml_detector(ref: np.ndarray):
    from distml.drift.columns import feature_drift
    from distml.drift.reference import sketch_columns

    names = [f"c{j}" for j in range(ref.shape[1])]
    cols = [{"name": n, "kind": "numeric", "features": [n]} for n in names]
    reference = {"columns": sketch_columns(cols, names, ref)}
    return lambda x: [j for j, r in enumerate(feature_drift(reference, x, names)) if r.drifted]


def _stationary(seed: int, batch: int, total: int, limit: int | None = None):
    rng = np.random.default_rng([seed, batch])
    for _ in range(total // batch if limit is None else min(limit, total // batch)):
        yield rows(batch, rng)


def _shifted(seed: int, shift: float) -> np.ndarray:
    x = rows(WINDOWS[-1], np.random.default_rng([seed, 7, int(shift * 100)]))
    x[:, TARGET] += shift
    return x


def _delay(drifted, stream: np.ndarray) -> dict[str, Any] | None:
    for w in WINDOWS:
        named = drifted(stream[:w])
        if TARGET in named:
            return {"delay": w, "named": named}
    return None


def run_distml(seeds: list[int], total: int, batches: tuple[int, ...]) -> dict[str, Any]:
    alarms: dict[int, int] = {}
    delays: dict[float, list] = {s: [] for s in SHIFTS}
    for seed in seeds:
        drifted = distml_detector(rows(REF_ROWS, np.random.default_rng([seed, 0])))
        for b in batches:
            alarms[b] = alarms.get(b, 0) + sum(bool(drifted(x)) for x in
                                               _stationary(seed, b, total))
        for shift in SHIFTS:
            delays[shift].append(_delay(drifted, _shifted(seed, shift)))
    tests = {b: len(seeds) * (total // b) for b in batches}
    return _summary(alarms, tests, batches, delays)


def _summary(alarms: dict[int, int], tests: dict[int, int], batches: tuple[int, ...],
             delays: dict[float, list]) -> dict[str, Any]:
    per_1m = {str(b): alarms[b] / (tests[b] * b / 1e6) for b in batches}
    return {"false_alarms": {str(b): alarms[b] for b in batches},
            "tests": {str(b): tests[b] for b in batches},
            "false_alarms_per_1m": per_1m, "worst_per_1m": max(per_1m.values()),
            "delays": {str(s): d for s, d in delays.items()},
            "median_delay": _median_delay(delays),
            "detected": {str(s): sum(d is not None for d in v) for s, v in delays.items()}}


def _median_delay(delays: dict[float, list]) -> dict[str, float]:
    med = {str(s): statistics.median(MISSED if d is None else d["delay"] for d in v)
           for s, v in delays.items()}
    med["all"] = statistics.median(MISSED if d is None else d["delay"]
                                   for v in delays.values() for d in v)
    return med


def run_peer(peer: str, seeds: list[int], total: int, batches: tuple[int, ...]
             ) -> dict[str, Any]:
    """One peer over the same streams (the first PEER_TESTS tests of each batch size)."""
    from bench.peers import python

    arrays: dict[str, np.ndarray] = {"windows": np.array(WINDOWS)}
    alarms, tests, delays = {b: 0 for b in batches}, {b: 0 for b in batches}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            batch_list = [(b, x) for b in batches
                          for x in _stationary(seed, b, total, PEER_TESTS[b])]
            arrays = {"windows": np.array(WINDOWS), "discrete": np.array(DISCRETE),
                      "ref": rows(REF_ROWS, np.random.default_rng([seed, 0]))}
            arrays.update({f"batch_{i}": x for i, (_, x) in enumerate(batch_list)})
            for i, shift in enumerate(SHIFTS):
                arrays[f"stream_{i}"], arrays[f"target_{i}"] = _shifted(seed, shift), \
                    np.array(TARGET)
            path = Path(tmp) / "in.npz"
            np.savez(path, **arrays)
            subprocess.run([str(python(peer)), str(Path(__file__).parent / "peers" /
                                                     "drift_peer.py"), peer, str(path),
                            str(Path(tmp) / "out.json")], check=True)
            out = json.loads((Path(tmp) / "out.json").read_text())
            for (b, _), named in zip(batch_list, out["batches"], strict=True):
                alarms[b] += bool(named)
                tests[b] += 1
            for shift, found in zip(SHIFTS, out["streams"], strict=True):
                delays.setdefault(shift, []).append(found)
    return _summary(alarms, tests, batches, delays)


def cbpe_streams(seed: int) -> dict[str, Any]:
    """The forest, its validation and held-out rows, and the analysis streams' probabilities
    and correctness."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng([seed, 99])
    w = rng.normal(size=4)

    def sample(n: int, squeeze: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 4)) * np.reshape(squeeze, (-1, 1))
        return x, (x @ w + rng.normal(0, 0.5, n) > 0).astype(int)

    model = RandomForestClassifier(100, min_samples_leaf=3, random_state=seed, n_jobs=1)
    model.fit(*sample(3000))
    (vx, vy), (hx, hy) = sample(2000), sample(2000)
    streams = [sample(CBPE_ROWS), sample(CBPE_ROWS, np.linspace(1.0, 0.3, CBPE_ROWS))]
    return {"val": (model.predict_proba(vx), vy), "held": (model.predict_proba(hx), hy),
            "streams": [(model.predict_proba(x), y) for x, y in streams]}


def run_cbpe(seeds: list[int], *, peers: bool) -> dict[str, Any]:
    from distml.drift.performance import calibrate, expected_accuracy, fit_calibration

    gaps: dict[str, list[float]] = {"distml": [], "nannyml": []}
    for seed in seeds:
        data = cbpe_streams(seed)
        cal = fit_calibration(*data["val"], *data["held"])
        realised = []
        for probs, y in data["streams"]:
            conf = calibrate(probs, cal["temperature"])
            for s in range(0, len(y), CHUNK):
                est, _, _ = expected_accuracy(conf[s:s + CHUNK].max(axis=1), cal)
                ok = float((probs[s:s + CHUNK].argmax(1) == y[s:s + CHUNK]).mean())
                realised.append(ok)
                gaps["distml"].append(abs(est - ok) * 100)
        if peers:
            estimates = _nannyml(data)
            gaps["nannyml"] += [abs(e - r) * 100 for e, r in zip(estimates, realised,
                                                                 strict=True)]
    return {k: {"mae_points": statistics.mean(v), "max_points": max(v), "chunks": len(v)}
            for k, v in gaps.items() if v}


def _nannyml(data: dict[str, Any]) -> list[float]:
    from bench.peers import python

    held_probs, held_y = data["held"]
    arrays = {"ref_proba": held_probs[:, 1], "ref_y": held_y, "chunk_size": np.array(CHUNK)}
    arrays.update({f"proba_{i}": p[:, 1] for i, (p, _) in enumerate(data["streams"])})
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "in.npz", **arrays)
        subprocess.run([str(python("nannyml")), str(Path(__file__).parent / "peers" /
                                                     "drift_peer.py"), "nannyml",
                        str(Path(tmp) / "in.npz"), str(Path(tmp) / "out.json")], check=True)
        out = json.loads((Path(tmp) / "out.json").read_text())
    return [v for stream in out["estimates"] for v in stream]
