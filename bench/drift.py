"""Drift detection, measured honestly: column tests at any size and label-free accuracy
against peers (bench/drift_columns.py), and the stream detectors on river's synthetic streams.

Streams (this file): per seed and stream, a RandomForest (100 trees, class probabilities) is
fitted on the first 1,500 samples, its reference (error count, margin histogram) taken on
the next 500, and frozen: it never sees another label. Then
- a drifting stream: 5,000 more samples of the first concept, then 5,000 of the second, from
  a generator with its own seed and parameters (SEA variant 0 -> 3, Agrawal function 0 -> 2,
  RandomRBF centroids of seed_model s -> s + 1000, Hyperplane of seed s -> s + 1000, which
  then rotates, mag_change 0.001 per sample): the rows after the change are new rows
  (tests/unit/test_bench_drift.py checks none repeats a row before it); the first alarm at
  or after the change is the detection and its distance the delay;
- a stationary stream: 20,000 samples of the first concept; every alarm is a false one.
Detectors: river's ADWIN on the error stream with its defaults (the baseline), DDM, HDDM_A,
HDDM_W and Page-Hinkley (river defaults; Page-Hinkley one-sided), distml's supervised
detector **on its own** (the error-rate window test, no river detector in it), distml's
label-free margin density detector, and an always-alarming dummy. False alarms: every alarm
on the stationary streams and before the change on the drifting ones, per 20,000 such
samples. Time: one detector's whole loop over a 20,000-sample stationary stream, CPU seconds.
distml's windows were chosen with this harness on seeds 1000-1009
(``python -m bench.drift --seeds 1000-1009``, never saved); the reported run uses seeds 0-9.
``DISTML_BENCH_QUICK=1`` (or ``--quick``): 2 seeds, short column streams, nothing saved.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bench.common import QUICK, README, save

TRAIN, VAL, PRE, POST, STATIONARY = 1500, 500, 5000, 5000, 20_000
ABRUPT = ("sea", "agrawal", "rbf")
STREAMS = (*ABRUPT, "hyperplane")
SEEDS = range(10)
DETAIL_START, DETAIL_END = "<!-- drift-table:start -->", "<!-- drift-table:end -->"
ADWIN, SUPERVISED, LABEL_FREE, DUMMY = ("river ADWIN (baseline)", "distml supervised (window)",
                                        "distml label-free (margin density)", "always alarm")


def _concepts(name: str, seed: int) -> tuple[Any, Any]:
    """(first concept, second concept) as river generators."""
    from river.datasets import synth

    if name == "sea":
        return synth.SEA(variant=0, seed=seed), synth.SEA(variant=3, seed=seed + 1000)
    if name == "agrawal":
        return (synth.Agrawal(classification_function=0, seed=seed),
                synth.Agrawal(classification_function=2, seed=seed + 1000))
    if name == "rbf":
        return (synth.RandomRBF(seed_model=seed, seed_sample=seed),
                synth.RandomRBF(seed_model=seed + 1000, seed_sample=seed + 1000))
    # a new hyperplane (river draws the same numbers for the same seed whatever the drift
    # settings: the same seed would replay the first concept's rows), which then rotates
    return (synth.Hyperplane(seed=seed),
            synth.Hyperplane(seed=seed + 1000, mag_change=0.001, sigma=0.0))


def stream(name: str, seed: int, *, drifting: bool) -> tuple[np.ndarray, np.ndarray]:
    first, second = _concepts(name, seed)
    head = TRAIN + VAL + (PRE if drifting else STATIONARY)
    samples: Iterator = iter(first)
    if drifting:
        samples = itertools.chain(itertools.islice(iter(first), head), iter(second))
    xs, ys = [], []
    for x, y in itertools.islice(samples, head + (POST if drifting else 0)):
        xs.append(list(x.values()))
        ys.append(int(y))
    return np.asarray(xs, dtype=np.float64), np.asarray(ys)


def frozen_model(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(100, min_samples_leaf=2, random_state=0, n_jobs=1).fit(x, y)


def detectors(val_probs: np.ndarray, val_y: np.ndarray
              ) -> dict[str, Callable[[np.ndarray, np.ndarray], list[int]]]:
    """Each detector, fresh, as a function (probs, labels) -> alarm positions."""
    from river import drift

    from distml.drift.detectors import (
        ErrorDetector,
        MarginDensityDetector,
        MarginReference,
        margins,
    )
    from distml.drift.monitor import DriftSettings

    s = DriftSettings()
    ref_errors = int((val_probs.argmax(1) != val_y).sum())

    def river_adwin(probs: np.ndarray, y: np.ndarray) -> list[int]:
        det, alarms = drift.ADWIN(), []
        for i, e in enumerate((probs.argmax(1) != y).tolist()):
            det.update(e)
            if det.drift_detected:
                alarms.append(i)
        return alarms

    def errors(method: str, with_reference: bool) -> Callable:
        det = ErrorDetector(method, ref_errors=ref_errors if with_reference else None,
                            ref_rows=len(val_y), window=s.error_window, step=s.step,
                            alpha=s.false_alarm_rate, horizon=s.horizon)
        return lambda probs, y: det.update(probs.argmax(1) != y)

    md = MarginDensityDetector(MarginReference.from_margins(margins(val_probs)),
                               density=s.margin_density, window=s.margin_window, step=s.step,
                               alpha=s.false_alarm_rate, horizon=s.horizon)
    return {
        ADWIN: river_adwin,
        "river DDM": errors("ddm", False),
        "river HDDM_A": errors("hddm_a", False),
        "river HDDM_W": errors("hddm_w", False),
        "river Page-Hinkley": errors("page_hinkley", False),
        SUPERVISED: errors("window", True),  # on its own: no river detector inside
        LABEL_FREE: lambda probs, y: md.update(probs),
        DUMMY: lambda probs, y: list(range(len(y))),
    }


def run_seed(name: str, seed: int) -> dict[str, dict[str, Any]]:
    """Alarms of every detector on this seed's drifting and stationary stream."""
    out: dict[str, dict[str, Any]] = {}
    for drifting in (True, False):
        x, y = stream(name, seed, drifting=drifting)
        model = frozen_model(x[:TRAIN], y[:TRAIN])
        probs = model.predict_proba(x[TRAIN:])
        val_probs, val_y = probs[:VAL], y[TRAIN:TRAIN + VAL]
        probs, y = probs[VAL:], y[TRAIN + VAL:]
        for det_name, det in detectors(val_probs, val_y).items():
            wall, cpu = time.perf_counter(), time.process_time()
            alarms = det(probs, y)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            r = out.setdefault(det_name, {})
            if drifting:
                after = [a - PRE for a in alarms if a >= PRE]
                r["delay"] = after[0] if after else None
                r["alarms_before_change"] = sum(a < PRE for a in alarms)
            else:
                r["false_alarms"] = len(alarms)
                r["cpu_seconds_per_20k"] = cpu * 20_000 / len(y)
                r["wall_seconds_per_20k"] = wall * 20_000 / len(y)
    return out


def summarize(runs: dict[str, list[dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Per detector and stream: detected, median delay, false alarms per 20k, time."""
    table: dict[str, dict[str, Any]] = {}
    for name, per_seed in runs.items():
        for det in per_seed[0]:
            rs = [r[det] for r in per_seed]
            delays = [r["delay"] for r in rs if r["delay"] is not None]
            cpu = [r["cpu_seconds_per_20k"] for r in rs]
            wall = [r["wall_seconds_per_20k"] for r in rs]
            # every stationary sample counts: the stationary streams and the drifting
            # streams' samples before the change
            false = sum(r["false_alarms"] + r["alarms_before_change"] for r in rs)
            table.setdefault(det, {})[name] = {
                "detected": len(delays), "runs": len(rs),
                "median_delay": statistics.median(delays) if delays else None,
                "delays": delays,
                "alarms_before_change": sum(r["alarms_before_change"] for r in rs),
                "false_alarms_per_20k": false * 20_000 / (len(rs) * (STATIONARY + PRE)),
                "seconds_per_20k_median": statistics.median(cpu),
                "seconds_per_20k_max": max(cpu),
                "wall_seconds_per_20k_median": statistics.median(wall),
            }
    return table


def _pooled(table: dict[str, Any], det: str, streams: tuple[str, ...], key: str) -> Any:
    rows = [table[det][s] for s in streams]
    if key == "detected":
        return sum(r["detected"] for r in rows)
    if key == "median_delay":
        delays = [d for r in rows for d in r["delays"]]
        return statistics.median(delays) if delays else None
    return sum(r[key] for r in rows) / len(rows)  # false alarms: mean per 20k over streams


def targets(table: dict[str, Any]) -> dict[str, Any]:
    adwin_delay = _pooled(table, ADWIN, ABRUPT, "median_delay")
    sup_delay = _pooled(table, SUPERVISED, ABRUPT, "median_delay")
    slowest = max((r[s]["seconds_per_20k_median"], d) for d, r in table.items() for s in STREAMS)
    return {
        "abrupt_drifts": sum(table[SUPERVISED][s]["runs"] for s in ABRUPT),
        "supervised_detected": _pooled(table, SUPERVISED, ABRUPT, "detected"),
        "supervised_median_delay": sup_delay,
        "adwin_median_delay": adwin_delay,
        "supervised_delay_vs_adwin": round(sup_delay / adwin_delay, 3),
        "supervised_false_alarms_per_20k": _pooled(table, SUPERVISED, STREAMS,
                                                   "false_alarms_per_20k"),
        "label_free_rbf_detected": table[LABEL_FREE]["rbf"]["detected"],
        "label_free_rbf_delay": table[LABEL_FREE]["rbf"]["median_delay"],
        "label_free_rbf_max_delay": max(table[LABEL_FREE]["rbf"]["delays"], default=None),
        "label_free_false_alarms_per_20k": _pooled(table, LABEL_FREE, STREAMS,
                                                   "false_alarms_per_20k"),
        "max_seconds_per_20k": round(slowest[0], 4),
        "slowest_detector": slowest[1],
    }


COLUMN_SEEDS, CBPE_SEEDS = [0, 1, 2], [0, 1, 2]


def evaluate(seeds: range, *, quick: bool = False) -> dict[str, Any]:
    from bench import drift_columns as dc

    detectors(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 1]))  # warm-up: imports
    runs = {name: [run_seed(name, seed) for seed in seeds] for name in STREAMS}
    table = summarize(runs)
    col_seeds = COLUMN_SEEDS[:1] if quick else COLUMN_SEEDS
    total, batches = (100_000, dc.BATCHES[:3]) if quick else (1_000_000, dc.BATCHES)
    columns = {"distml": dc.run_distml(col_seeds, total, batches)}
    for peer in dc.COLUMN_PEERS:
        columns[peer] = dc.run_peer(peer, col_seeds, total, batches)
    cbpe = dc.run_cbpe(CBPE_SEEDS[:1] if quick else CBPE_SEEDS, peers=True)
    return {**column_targets(columns, cbpe), **targets(table),
            "seeds": [seeds.start, seeds.stop - 1], "column_seeds": col_seeds,
            "stationary_rows_per_batch_size": total, "columns": columns, "cbpe": cbpe,
            "table": table}


def column_targets(columns: dict[str, Any], cbpe: dict[str, Any]) -> dict[str, Any]:
    ours = columns["distml"]
    peers = {k: v["median_delay"]["all"] for k, v in columns.items() if k != "distml"}
    best = min(peers, key=peers.get)
    return {
        "false_alarms_per_1m_stationary": ours["worst_per_1m"],
        "detected_shift_0_25sd": ours["detected"]["0.25"],
        "shift_runs": len(ours["delays"]["0.25"]),
        "median_delay": ours["median_delay"]["all"],
        "best_peer": best, "best_peer_median_delay": peers[best],
        "median_delay_vs_best_peer": round(ours["median_delay"]["all"] / peers[best], 3),
        "estimated_accuracy_mae": round(cbpe["distml"]["mae_points"], 3),
        "nannyml_estimated_accuracy_mae": (round(cbpe["nannyml"]["mae_points"], 3)
                                           if "nannyml" in cbpe else None),
    }


def main(seeds: range = SEEDS, *, quick: bool = QUICK) -> dict[str, Any]:
    result = evaluate(seeds, quick=quick)
    if seeds == SEEDS and not quick:  # tuning and quick runs are not results
        save("drift", result)
        update_readme_table(result)
    return result


def update_readme_table(result: dict[str, Any]) -> None:
    """The per-detector table in README's Monitoring section, between its markers."""
    text = README.read_text()
    if DETAIL_START not in text or DETAIL_END not in text:
        return
    head, rest = text.split(DETAIL_START, 1)
    _, tail = rest.split(DETAIL_END, 1)
    README.write_text(head + DETAIL_START + "\n" + detail_table(result) + "\n" + DETAIL_END
                      + tail)


def _column_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    c = r["columns"]
    peer_fa = ", ".join(f"{k} {v['worst_per_1m']:.3g}" for k, v in c.items() if k != "distml")
    return [
        ("drift, columns at defaults", "false_alarms_per_1m_stationary",
         f"{r['false_alarms_per_1m_stationary']:.3g} (worst of 10^3-10^6-row tests; "
         f"{peer_fa})", "<= 1"),
        ("drift, columns at defaults", "detected_shift_0_25sd",
         f"{r['detected_shift_0_25sd']}/{r['shift_runs']} within 10^5 rows", "all"),
        ("drift, columns at defaults", "median_delay_vs_best_peer",
         f"{r['median_delay_vs_best_peer']:.2f} (median {r['median_delay']:g} vs "
         f"{r['best_peer']} {r['best_peer_median_delay']:g} rows, shifts 0.1-0.5 sd)", "<= 1"),
        ("drift, label-free accuracy (CBPE)", "estimated_accuracy_mae",
         f"{r['estimated_accuracy_mae']:.2f} points (NannyML "
         f"{r['nannyml_estimated_accuracy_mae']:.2f})", "<= 2"),
    ]


def _cell(r: dict[str, Any], stream: str) -> str:
    d = r["median_delay"]
    return f"{r['detected']}/{r['runs']}" + ("" if d is None else f", {d:g}")


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """README's rows; a result saved before the column benchmark (no ``columns``) measured
    the former supervised default (ADWIN + window) and gets its own label and no column
    rows, until ``python -m bench drift`` replaces it."""
    n = r["abrupt_drifts"]
    sup = "drift, supervised (window test alone)" if "columns" in r else \
        "drift, supervised default"
    return [*(_column_rows(r) if "columns" in r else []),
        (sup, "supervised_detected", f"{r['supervised_detected']}/{n} abrupt drifts",
         f"{n}/{n}"),
        (sup, "supervised_delay_vs_adwin",
         f"{r['supervised_delay_vs_adwin']:.2f} (median {r['supervised_median_delay']:g} vs "
         f"ADWIN {r['adwin_median_delay']:g} samples)", "<= 1"),
        (sup, "supervised_false_alarms_per_20k",
         f"{r['supervised_false_alarms_per_20k']:.3g}", "<= 0.1"),
        ("drift, label-free (margin density)", "label_free_rbf_detected",
         f"{r['label_free_rbf_detected']}/10 RandomRBF switches", "10/10"),
        ("drift, label-free (margin density)", "label_free_rbf_delay",
         f"{r['label_free_rbf_delay']:g} samples (median; max {r['label_free_rbf_max_delay']})",
         "<= 300"),
        ("drift, label-free (margin density)", "label_free_false_alarms_per_20k",
         f"{r['label_free_false_alarms_per_20k']:.3g}", "0"),
        ("drift, every detector", "max_seconds_per_20k",
         f"{r['max_seconds_per_20k']:.3f} s CPU ({r['slowest_detector']})", "< 1"),
    ]


def detail_table(r: dict[str, Any]) -> str:
    """The README's tables (markdown): columns against the peers, then the stream
    detectors."""
    lines = _column_tables(r) if "columns" in r else []
    head = ("| detector | " + " | ".join(f"{s}: detected, median delay" for s in STREAMS)
            + " | false alarms / 20k | s / 20k (median, max) |")
    lines += [head, "|" + "---|" * (len(STREAMS) + 3)]
    for det, rows in r["table"].items():
        fa = statistics.mean(rows[s]["false_alarms_per_20k"] for s in STREAMS)
        t = max(rows[s]["seconds_per_20k_median"] for s in STREAMS)
        tmax = max(rows[s]["seconds_per_20k_max"] for s in STREAMS)
        lines.append(f"| {det} | " + " | ".join(_cell(rows[s], s) for s in STREAMS)
                     + f" | {fa:.3g} | {t:.3f}, {tmax:.3f} |")
    return "\n".join(lines)


def _column_tables(r: dict[str, Any]) -> list[str]:
    from bench.drift_columns import SHIFTS

    batches = list(r["columns"]["distml"]["false_alarms_per_1m"])
    lines = ["| column drift | " + " | ".join(f"false alarms / 10^6 rows, tests of {int(b):,}"
                                             for b in batches)
             + " | " + " | ".join(f"{s} sd: detected, median rows" for s in SHIFTS) + " |",
             "|" + "---|" * (len(batches) + len(SHIFTS) + 1)]
    for name, c in r["columns"].items():
        fa = " | ".join(f"{c['false_alarms_per_1m'][b]:.3g} ({c['false_alarms'][b]}/"
                        f"{c['tests'][b]})" for b in batches)
        det = " | ".join(f"{c['detected'][str(s)]}/{len(c['delays'][str(s)])}, "
                         f"{c['median_delay'][str(s)]:g}" for s in SHIFTS)
        lines.append(f"| {name} | {fa} | {det} |")
    lines += ["", "| estimated accuracy | mean abs. error (points) | max | chunks |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['mae_points']:.2f} | {v['max_points']:.2f} | {v['chunks']} |"
              for k, v in r["cbpe"].items()]
    return [*lines, ""]


if __name__ == "__main__":
    seeds, quick = SEEDS, QUICK or "--quick" in sys.argv
    if len(sys.argv) > 2 and sys.argv[1] == "--seeds":
        lo, hi = (int(v) for v in sys.argv[2].split("-"))
        seeds = range(lo, hi + 1)
    if quick:
        seeds = range(0, 2)
    res = main(seeds, quick=quick)
    print(json.dumps({k: v for k, v in res.items() if k not in ("table", "columns")},
                     indent=2))
    print(detail_table(res))
