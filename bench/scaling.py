"""A scaling study kept with the results: ``distml scale`` (strong scaling, 1 and 2
workers, REPEATS rounds after a warm-up) on ingestion of a 2,000,000 x 32 synthetic table
(executor workers) and on ddp training of an MLP 32-512-512-4, batch 1,024, 30 steps
(processes, one CPU thread each). The analysis (speedup, efficiency, Karp-Flatt, the Amdahl
fit where the timings allow one) and its plots go to bench/results/.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench.common import RESULTS, save

REPEATS = 3
STAGES = ("ingest", "train")


def _config(root: Path) -> dict:
    return {
        "name": "scaling", "output_dir": str(root / "runs"), "registry": str(root / "reg"),
        "data": {"source": {"type": "synthetic:classification", "n_samples": 2_000_000,
                            "n_features": 32, "n_classes": 4},
                 "rows_per_partition": 125_000},
        "monitor": {"tensorboard": False, "system_metrics_interval_s": None},
        "train": {"epochs": 1, "max_steps": 30, "batch_size": 1024, "lr": 1e-3,
                  "checkpoints": False, "restore_best": False,
                  "parallel": {"strategy": "ddp"},
                  "candidates": [{"name": "mlp", "model": {"type": "mlp",
                                                           "hidden_sizes": [512, 512]}}]},
    }


def main() -> dict:
    from distml.config import parse_config
    from distml.workflow.scale import scale

    studies = {}
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        cfg = parse_config(_config(Path(tmp)))
        for stage in STAGES:
            study = scale(cfg, workers=[1, 2], mode="strong", stage=stage, repeats=REPEATS)
            RESULTS.mkdir(exist_ok=True)
            plot = RESULTS / f"scaling_{stage}.png"
            shutil.copyfile(study["plot"], plot)
            study["plot"] = str(plot.relative_to(RESULTS.parent.parent))
            study.pop("folder")
            studies[stage] = study
    result = {"repeats": REPEATS, "workers": [1, 2], "studies": studies}
    save("scaling", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for stage, s in r["studies"].items():
        one, two = s["points"][0], s["points"][1]
        fit = ("; Amdahl not fitted: " + "; ".join(s["warnings"]) if s["warnings"] else
               f"; Amdahl parallel fraction {s['amdahl_parallel_fraction']:.2f}")
        rows.append((f"scaling, {stage}, 1 -> 2 workers", "speedup / efficiency / Karp-Flatt",
                     f"{two['speedup']:.2f} / {two['efficiency']:.2f} / "
                     f"{two['karp_flatt']:.2f} ({one['seconds']:.2f} s -> "
                     f"{two['seconds']:.2f} s, medians of {two['repeats']}{fit})",
                     "reported"))
    return rows


if __name__ == "__main__":
    print(main())
