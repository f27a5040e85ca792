"""Knowledge distillation through distml's pipeline: paired seeds, gains with their
uncertainty.

Each setting runs one pipeline per seed (its config: teacher, the student trained alone,
the distilled student; the seed is everything's seed, the split's too), so the student
and its twin are paired: same model, settings, seed and split, differing only by the
teacher. Per setting: the mean gain (distilled minus alone) over the seeds with its 95%
confidence interval (a t-interval on the paired differences), how many seeds improved,
and the fraction of the teacher-twin gap recovered (mean gain / mean gap; its interval is
the gain's divided by the mean gap).

1. label_limited: digits with 8% of the rows labelled for training (10% of the rows not
   held out), 72% an unlabelled transfer set (``data.split.unlabelled``: labels dropped at
   ingestion), 10% validation, 10% test. The teacher, a CNN trained on the labelled rows
   only; the student, a 16-unit MLP, learns the teacher's answers on the labelled and
   unlabelled rows (``distill.transfer``), its twin from the labelled rows alone.
2. hinton: digits, 70% labelled; a CNN teacher (97-99% by seed), an 8-unit MLP student
   whose transfer set is the training rows plus a jittered copy of each batch
   (Gaussian noise of 0.5 standard deviations, answered online by the teacher: function
   matching, Beyer et al. 2022).
3. lm: byte-level language models on standard-library sources, a 1-layer student and
   its twin trained for the same epochs, the student distilled online from a 2-layer
   teacher; 5 seeds; test perplexity (gain: alone minus distilled, lower is better).

Seeds 0.. are the benchmark's; the defaults (temperature, alpha) were chosen on tuning
seeds 100.. (``python -m bench.distill --tune``), never on these. Every process runs one
thread; the runs use one executor worker (digits is one partition per split).
``DISTML_BENCH_QUICK=1``: 2 seeds per setting, short training, nothing saved unless
``--save`` (a check that it runs).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scipy import stats

from bench.common import QUICK, save

SEEDS = range(2) if QUICK else range(10)
LM_SEEDS = range(2) if QUICK else range(5)
TUNING_SEEDS = range(100, 103)
KD = {"temperature": 2.0, "alpha": 0.5}  # the defaults (README), chosen on TUNING_SEEDS
DIGITS_TRAIN = {"epochs": 10 if QUICK else 60, "batch_size": 64, "lr": 0.003,
                "weight_decay": 0.01, "warmup_steps": 20, "checkpoints": False}
QUIET = {"select": {"promote": False}, "execution": {"num_workers": 1},
         "monitor": {"tensorboard": False, "system_metrics_interval_s": None}}
CNN = {"type": "cnn", "channels": [16, 32], "hidden_size": 64}


def _digits(root: Path, name: str, seed: int, split: dict[str, float],
            candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "seed": seed, "output_dir": str(root / "runs"),
            "registry": str(root / "registry"),
            "data": {"source": "sklearn:digits", "transforms": ["standardize"], "split": split},
            "train": {**DIGITS_TRAIN, "candidates": candidates}, **QUIET}


def label_limited_config(root: Path, seed: int, kd: dict[str, Any] = KD) -> dict[str, Any]:
    student = {"type": "mlp", "hidden_sizes": [16]}
    return _digits(root, "distill-label-limited", seed,
                   {"train": 0.08, "unlabelled": 0.72, "val": 0.1, "test": 0.1}, [
                       {"name": "teacher", "model": CNN,
                        "epochs": 20 if QUICK else 100},
                       {"name": "alone", "model": student},
                       {"name": "distilled", "model": student,
                        "distill": {"teacher": "teacher", **kd,
                                    "transfer": {"labelled": True}}}])


def hinton_config(root: Path, seed: int, kd: dict[str, Any] = KD) -> dict[str, Any]:
    student = {"type": "mlp", "hidden_sizes": [8]}
    return _digits(root, "distill-hinton", seed, {"train": 0.7, "val": 0.1, "test": 0.2}, [
        {"name": "teacher", "model": CNN, "epochs": 5 if QUICK else 60},
        {"name": "alone", "model": student},
        {"name": "distilled", "model": student,
         "distill": {"teacher": "teacher", **kd,
                     "transfer": {"labelled": True, "copies": 1, "noise": 0.5}}}])


def lm_config(root: Path, seed: int) -> dict[str, Any]:
    student = {"type": "transformer", "num_layers": 1, "num_heads": 2, "dim": 32}
    return {
        "name": "distill-lm", "seed": seed,
        "output_dir": str(root / "runs"), "registry": str(root / "registry"),
        "data": {"source": {"type": "text", "sequence_length": 64,
                            "paths": ["stdlib:json/*.py", "stdlib:email/*.py"]},
                 "transforms": []},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.003, "weight_decay": 0.1,
                  "warmup_steps": 30, "checkpoints": False,
                  **({"max_steps": 20} if QUICK else {}), "candidates": [
                      {"name": "teacher", "model": {"type": "transformer", "num_layers": 2,
                                                    "num_heads": 4, "dim": 96}},
                      {"name": "alone", "model": student},
                      {"name": "distilled", "model": student,
                       "distill": {"teacher": "teacher", "temperature": 1.0,
                                   "alpha": 0.5}}]},
        **QUIET}


def run_seed(raw: dict[str, Any]) -> dict[str, Any]:
    """One pipeline run: teacher, twin and student on the test split."""
    from distml.config import parse_config
    from distml.workflow.pipeline import run_pipeline

    start = time.perf_counter()
    _, summary = run_pipeline(parse_config(raw))
    (row,) = summary["distillation"]
    out = {"seed": raw["seed"], "teacher": row["teacher"]["test"],
           "alone": row["alone"]["test"], "distilled": row["distilled"]["test"],
           "params": {k: row[k]["params"] for k in ("teacher", "alone", "distilled")},
           "train_seconds": {c["name"]: round(c["train_seconds"], 2)
                             for c in summary["candidates"]},
           "seconds": round(time.perf_counter() - start, 1)}
    print(out, flush=True)
    return out


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean of paired differences with its 95% t-interval."""
    n, mean = len(diffs), statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else math.nan
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "ci": [float(mean - half), float(mean + half)], "sd": sd, "n": n,
            "improved": sum(d > 0 for d in diffs)}


def digits_setting(root: Path, make: Any, seeds: range) -> dict[str, Any]:
    """Accuracy gain (points) and gap recovered over paired seeds."""
    per_seed = [run_seed(make(root, s)) for s in seeds]
    gain = paired([100 * (s["distilled"] - s["alone"]) for s in per_seed])
    gap = statistics.mean(100 * (s["teacher"] - s["alone"]) for s in per_seed)
    return {"seeds": per_seed, "gain_pp": gain, "gap_pp": gap,
            "gap_recovered": gain["mean"] / gap if gap else math.nan,
            "gap_recovered_ci": [c / gap if gap else math.nan for c in gain["ci"]],
            **{f"accuracy_{k}": statistics.mean(s[k] for s in per_seed)
               for k in ("teacher", "alone", "distilled")},
            "config": make(root, seeds[0])["train"]}


def lm_setting(root: Path) -> dict[str, Any]:
    per_seed = [run_seed(lm_config(root, s)) for s in LM_SEEDS]
    gain = paired([s["alone"] - s["distilled"] for s in per_seed])  # lower is better
    return {"seeds": per_seed, "perplexity_gain": gain,
            **{f"perplexity_{k}": statistics.mean(s[k] for s in per_seed)
               for k in ("teacher", "alone", "distilled")},
            "config": lm_config(root, 0)["train"]}


def main() -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"  # read by distml's runtime: one thread per process
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        root = Path(tmp)
        ll = digits_setting(root, label_limited_config, SEEDS)
        hinton = digits_setting(root, hinton_config, SEEDS)
        lm = lm_setting(root)
    result = {
        "label_limited_gain_pp": ll["gain_pp"]["mean"],
        "label_limited_gain_pp_ci": ll["gain_pp"]["ci"],
        "label_limited_gap_recovered": ll["gap_recovered"],
        "label_limited_gap_recovered_ci": ll["gap_recovered_ci"],
        "hinton_gain_pp": hinton["gain_pp"]["mean"],
        "hinton_gain_pp_ci": hinton["gain_pp"]["ci"],
        "hinton_gap_recovered": hinton["gap_recovered"],
        "hinton_gap_recovered_ci": hinton["gap_recovered_ci"],
        "lm_perplexity_gain": lm["perplexity_gain"]["mean"],
        "lm_perplexity_gain_ci": lm["perplexity_gain"]["ci"],
        "distill": KD, "tuning_seeds": list(TUNING_SEEDS), "quick": QUICK,
        "label_limited": ll, "hinton": hinton, "lm": lm,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if not QUICK or "--save" in sys.argv:
        save("distill", result)
    return result


def tune() -> None:
    """The defaults' search, on tuning seeds only: label_limited and hinton's mean gain."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="distml-tune-") as tmp:
        for t in (2.0, 4.0):
            for a in (0.5, 0.9):
                kd = {"temperature": t, "alpha": a}
                gains = {m.__name__: statistics.mean(
                    100 * (r["distilled"] - r["alone"]) for r in
                    (run_seed(m(Path(tmp), s, kd)) for s in TUNING_SEEDS))
                    for m in (label_limited_config, hinton_config)}
                print("TUNE", kd, gains, flush=True)


def _ci(r: dict, key: str, fmt: str = "+.2f") -> str:
    lo, hi = r[f"{key}_ci"]
    return f"{r[key]:{fmt}} (95% CI {lo:{fmt}} to {hi:{fmt}})"


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    ll, h, lm = r["label_limited"], r["hinton"], r["lm"]
    n, n_lm = len(ll["seeds"]), len(lm["seeds"])

    def acc(s: dict) -> str:
        return (f"alone {100 * s['accuracy_alone']:.1f}%, distilled "
                f"{100 * s['accuracy_distilled']:.1f}%, teacher "
                f"{100 * s['accuracy_teacher']:.1f}%; {s['gain_pp']['improved']} of {n} "
                "seeds improved")

    return [
        ("distill, digits, 8% labelled + unlabelled transfer, MLP 16 student",
         "label_limited_gain_pp", f"{_ci(r, 'label_limited_gain_pp')} ({acc(ll)})",
         ">= 3, CI above 0"),
        ("distill, digits, 8% labelled + unlabelled transfer, MLP 16 student",
         "label_limited_gap_recovered", _ci(r, "label_limited_gap_recovered", ".2f"),
         ">= 0.5"),
        ("distill, digits, CNN teacher, MLP 8 student, jittered copies",
         "hinton_gap_recovered", f"{_ci(r, 'hinton_gap_recovered', '.2f')} (gain "
         f"{_ci(r, 'hinton_gain_pp')} points; {acc(h)})", ">= 0.5, CI above 0"),
        ("distill, transformer LM", "lm_perplexity_gain",
         f"{_ci(r, 'lm_perplexity_gain')} over {n_lm} seeds (alone "
         f"{lm['perplexity_alone']:.2f}, distilled {lm['perplexity_distilled']:.2f}, teacher "
         f"{lm['perplexity_teacher']:.2f})", "reported"),
    ]


if __name__ == "__main__":
    if "--tune" in sys.argv:
        tune()
    else:
        print(main())
