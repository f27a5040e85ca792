"""Runs on disk, for a user without an MLflow server: list them, compare their configs and
metrics (from each run's config.yaml and summary.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distml import storage
from distml.rundir import RunDir, finished_runs


def list_runs(output_dir: Path) -> list[dict[str, Any]]:
    """Finished runs (those with a summary.json), oldest first; of a storage URL, the runs
    in this machine's mirror of it."""
    runs = []
    for run in finished_runs(storage.local_path(output_dir)):
        s = run.read_summary()
        runs.append({"run": str(run.path), "name": s["name"], "selected": s["selected"],
                     "metric": s["metric"], "test": s["test"].get(s["metric"]),
                     "config_hash": s["config_hash"],
                     "seconds": sum(st["seconds"] for st in s["stages"])})
    return runs


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) and "name" in v for v in obj):
        out = {}
        for v in obj:  # candidates, by name
            out.update(_flatten({k: x for k, x in v.items() if k != "name"},
                                f"{prefix}{v['name']}."))
        return out
    return {prefix.rstrip("."): obj}


def compare(run_dirs: list[Path]) -> dict[str, Any]:
    """Config keys whose values differ between the runs, and each run's metrics."""
    configs, summaries = [], []
    for d in run_dirs:
        run = RunDir.open(d, finished=True)
        configs.append(_flatten(run.raw_config()))
        summaries.append(run.read_summary())
    keys = sorted(set().union(*configs))
    differ = {k: [c.get(k) for c in configs] for k in keys
              if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1}
    metrics = [{"run": str(d), "selected": s["selected"], "test": s["test"],
                "val": {c["name"]: c["val"][s["metric"]] for c in s["candidates"]}}
               for d, s in zip(run_dirs, summaries, strict=True)]
    return {"config_differences": differ, "metrics": metrics,
            "metric": summaries[0]["metric"]}
