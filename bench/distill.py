"""Knowledge distillation through distml's pipeline, 5 seeds in one run.

- digits: per seed, one pipeline run of one config: an ensemble teacher of three wide MLPs
  (different shapes, so different initial weights under the run's one seed), and MLP
  students of 16 and 32 hidden units, each trained alone and distilled from the ensemble
  (the twins share model, settings and seed: they differ only by the teacher). 30% of the
  rows train, 10% validate, 60% test (1,078 rows: one row is 0.09 points). Every batch is
  jittered (Gaussian noise of one standard deviation on the standardized pixels, the same
  for teachers, twins and students), so the teachers answer online, on the rows the
  student sees: distillation as "consistent teaching" (Beyer et al. 2022).
  Per student width, over the seeds: ``accuracy_gain_pp`` (distilled minus alone, test
  accuracy, mean, in points), ``seeds_improved`` (seeds where the distilled student beats
  its twin), and ``gap_recovered``: the mean gain over the mean teacher-twin gap.
- transformer: byte-level language models on standard-library sources; a smaller student
  trained alone and distilled online from a larger teacher (one seed); test perplexity.

Each seed changes the data split too (the config's seed is everything's seed), so the
spread over seeds includes the split's. Every process runs one thread: on 2 cores shared
with other work, two OpenMP threads per process spin against each other (measured: a step
17x slower).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save

SEEDS = (0, 1, 2, 3, 4)
WIDTHS = (16, 32)
TEACHERS = {"wide-a": [512, 512], "wide-b": [1024], "wide-c": [384, 384, 384]}
DISTILL = {"temperature": 2.0, "alpha": 0.9}
NOISE = 1.0  # standard deviations of the standardized pixels
DIGITS_TRAIN = {"epochs": 60, "batch_size": 64, "lr": 0.003, "weight_decay": 0.01,
                "warmup_steps": 20}


def jitter(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The loader's map function: Gaussian noise on the standardized pixels, the same for
    teachers, students and twins. Seeded by the batch's contents, so runs repeat."""
    rng = np.random.default_rng(zlib.crc32(x.tobytes()))
    return x + NOISE * rng.standard_normal(x.shape, dtype=np.float32), y


def _digits_config(root: Path, seed: int) -> dict[str, Any]:
    teachers = [{"name": n, "model": {"type": "mlp", "hidden_sizes": h, "dropout": 0.2}}
                for n, h in TEACHERS.items()]
    students = []
    for w in WIDTHS:
        model = {"type": "mlp", "hidden_sizes": [w]}
        students += [{"name": f"s{w}-alone", "model": model},
                     {"name": f"s{w}-kd", "model": model,
                      "distill": {"teacher": list(TEACHERS), **DISTILL}}]
    return {
        "name": f"distill-digits-{seed}", "seed": seed,
        "output_dir": str(root / "runs"), "registry": str(root / "registry"),
        "data": {"source": "sklearn:digits", "transforms": ["standardize"],
                 "split": {"train": 0.3, "val": 0.1, "test": 0.6},
                 "loader": {"map_fn": "bench.distill:jitter"}},
        "train": {**DIGITS_TRAIN, "candidates": [*teachers, *students]},
        "select": {"promote": False},
        "monitor": {"tensorboard": False, "system_metrics_interval_s": None},
    }


def digits(root: Path) -> dict[str, Any]:
    from distml.config import parse_config
    from distml.workflow.pipeline import run_pipeline

    per_seed = []
    for seed in SEEDS:
        _, summary = run_pipeline(parse_config(_digits_config(root, seed)))
        rows = {r["student"]: r for r in summary["distillation"]}
        per_seed.append({
            "seed": seed, "teacher": rows[f"s{WIDTHS[0]}-kd"]["teacher"]["test"],
            "teacher_params": rows[f"s{WIDTHS[0]}-kd"]["teacher"]["params"],
            **{f"alone_{w}": rows[f"s{w}-kd"]["alone"]["test"] for w in WIDTHS},
            **{f"distilled_{w}": rows[f"s{w}-kd"]["distilled"]["test"] for w in WIDTHS},
            **{f"params_{w}": rows[f"s{w}-kd"]["distilled"]["params"] for w in WIDTHS},
            **{f"latency_ms_{w}": rows[f"s{w}-kd"]["distilled"]["latency_ms"] for w in WIDTHS},
            "teacher_latency_ms": rows[f"s{WIDTHS[0]}-kd"]["teacher"]["latency_ms"],
        })
        print(per_seed[-1], flush=True)
    out: dict[str, Any] = {"seeds": per_seed, "teachers": TEACHERS, "distill": DISTILL,
                           "train": DIGITS_TRAIN}
    for w in WIDTHS:
        gains = [100 * (s[f"distilled_{w}"] - s[f"alone_{w}"]) for s in per_seed]
        gaps = [100 * (s["teacher"] - s[f"alone_{w}"]) for s in per_seed]
        out[f"accuracy_gain_pp_{w}"] = statistics.mean(gains)
        out[f"accuracy_gain_pp_{w}_stdev"] = statistics.stdev(gains)
        out[f"seeds_improved_{w}"] = sum(g > 0 for g in gains)
        out[f"gap_recovered_{w}"] = statistics.mean(gains) / statistics.mean(gaps)
        out[f"accuracy_alone_{w}"] = statistics.mean(s[f"alone_{w}"] for s in per_seed)
        out[f"accuracy_distilled_{w}"] = statistics.mean(s[f"distilled_{w}"] for s in per_seed)
    out["accuracy_teacher"] = statistics.mean(s["teacher"] for s in per_seed)
    return out


def _lm_config(root: Path) -> dict[str, Any]:
    student = {"type": "transformer", "num_layers": 1, "num_heads": 2, "dim": 32}
    return {
        "name": "distill-lm", "seed": 0,
        "output_dir": str(root / "runs"), "registry": str(root / "registry"),
        "data": {"source": {"type": "text", "sequence_length": 64,
                            "paths": ["stdlib:json/*.py", "stdlib:email/*.py"]},
                 "transforms": []},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.003, "weight_decay": 0.1,
                  "warmup_steps": 30, "candidates": [
                      {"name": "teacher", "model": {"type": "transformer", "num_layers": 2,
                                                    "num_heads": 4, "dim": 96}},
                      {"name": "student-alone", "model": student},
                      {"name": "student-kd", "model": student,
                       "distill": {"teacher": "teacher", "temperature": 1.0, "alpha": 0.5}}]},
        "select": {"promote": False},
        "monitor": {"tensorboard": False, "system_metrics_interval_s": None},
    }


def transformer(root: Path) -> dict[str, Any]:
    from distml.config import parse_config
    from distml.workflow.pipeline import run_pipeline

    _, summary = run_pipeline(parse_config(_lm_config(root)))
    (row,) = summary["distillation"]
    seconds = {c["name"]: c["train_seconds"] for c in summary["candidates"]}
    return {"perplexity_teacher": row["teacher"]["test"],
            "perplexity_alone": row["alone"]["test"],
            "perplexity_distilled": row["distilled"]["test"],
            "gap_recovered": row["gap_recovered"],
            "params": {k: row[k]["params"] for k in ("teacher", "alone", "distilled")},
            "train_seconds": seconds, "config": _lm_config(root)["train"]}


def main() -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"  # read by distml's runtime: one thread per process
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        root = Path(tmp)
        result = {"digits": digits(root), "transformer": transformer(root)}
    flat = {k: v for k, v in result["digits"].items() if k.startswith(
        ("accuracy_gain_pp", "seeds_improved", "gap_recovered"))}
    result = {**flat, **result}
    save("distill", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    d, t = r["digits"], r["transformer"]
    rows = []
    for w in WIDTHS:
        rows += [
            (f"distill, digits, MLP {w} student", f"accuracy_gain_pp_{w}",
             f"{d[f'accuracy_gain_pp_{w}']:+.2f} (sd {d[f'accuracy_gain_pp_{w}_stdev']:.2f}; "
             f"alone {100 * d[f'accuracy_alone_{w}']:.2f}%, distilled "
             f"{100 * d[f'accuracy_distilled_{w}']:.2f}%, teacher "
             f"{100 * d['accuracy_teacher']:.2f}%)", ">= 0.5"),
            (f"distill, digits, MLP {w} student", f"seeds_improved_{w}",
             f"{d[f'seeds_improved_{w}']} of {len(d['seeds'])}", ">= 4"),
            (f"distill, digits, MLP {w} student", f"gap_recovered_{w}",
             f"{d[f'gap_recovered_{w}']:.2f}", ">= 0.5"),
        ]
    rows.append(("distill, transformer LM", "test perplexity: teacher / alone / distilled",
                 f"{t['perplexity_teacher']:.2f} / {t['perplexity_alone']:.2f} / "
                 f"{t['perplexity_distilled']:.2f} (gap recovered "
                 f"{t['gap_recovered']:.2f}; params {t['params']['teacher']:,} vs "
                 f"{t['params']['distilled']:,})", "reported"))
    return rows


if __name__ == "__main__":
    print(main())
