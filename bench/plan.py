"""The planner against measurement: ``distml plan --check`` on the digits MLP and CNN, the
transformer example and a user model (bench/plan_user_model.py), each plan at world size 2
that ``distml verify`` runs (ddp, zero1, fsdp, fsdp-zero2, tensor, pipeline schedules,
ps-sync) plus one process, each strategy on its own processes.

- memory_mape: mean over (model, strategy) of |predicted - measured| / measured per-rank
  bytes held of parameters, gradients and optimizer state at the step's fullest moment
  (Strategy.held_bytes, what bench/train.py measures on CPU). Parameter servers: verify
  probes a worker after forward only, so no memory figure (their step time counts).
- step_time_mape: the same for the step time: per pair, the median over REPEATS runs of
  ``--check`` of the median of its timed steps (verify leaves the first two out: warm-up and
  the memory probe); each row keeps every run's quartiles and the spread between runs
  ((max - min) / median), and ``step_time_spread`` is the median of those spreads (a target
  cannot be met against more noise than that). Each run of ``distml plan`` calibrates
  the machine afresh (``--recalibrate``, into a cache of the bench's own), just before the
  runs it is checked against.
- rank_agreement: cases are (model, memory budget): for each budget at a measured
  per-rank size, the plans predicted to fit it; a case agrees when the plan predicted
  fastest is measured fastest or within 10% of the measured fastest.
- deepspeed: DeepSpeed's model-state estimators for ZeRO stages 1-2 and 3
  (estimate_zero2/zero3_model_states_mem_needs, from parameter counts), in a virtual
  environment of its own (bench/.venvs/deepspeed), next to the measured bytes of zero1,
  fsdp-zero2 and fsdp: they assume mixed-precision Adam (2-byte weights and gradients,
  12 bytes of fp32 state per parameter), distml's runs are fp32.

``DISTML_BENCH_QUICK=1``: the digits MLP only, two plans, one run, nothing saved.
``DISTML_BENCH_PLAN_REPEATS``: runs of each ``--check`` (default 2).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.common import QUICK, save
from bench.peers import ROOT, VENVS

USER_MODEL = Path(__file__).with_name("plan_user_model.py")
STEPS = 5 if QUICK else 16
REPEATS = int(os.environ.get("DISTML_BENCH_PLAN_REPEATS", "1" if QUICK else "2"))
DEEPSPEED = "deepspeed==0.19.8"
# verify's plan -> the ZeRO stage whose DeepSpeed estimator it is set beside
ZERO_STAGE = {"zero1": 1, "fsdp-zero2": 2, "fsdp": 3}


def _configs(root: Path) -> list[tuple[Path, str | None]]:
    """(config, candidate) pairs to plan and check."""
    digits = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    lm = yaml.safe_load((ROOT / "examples" / "transformer.yaml").read_text())
    user = {"name": "user", "seed": 0,
            "data": {"source": {"type": "synthetic:classification", "n_samples": 4000,
                                "n_features": 24, "n_classes": 5}},
            "train": {"batch_size": 64, "candidates": [
                {"name": "resnet-mlp", "model": {"type": f"{USER_MODEL}:make",
                                                 "kwargs": {"width": 128, "depth": 3}}}]}}
    out = []
    for name, cfg in (("digits", digits), ("lm", lm), ("user", user)):
        cfg["output_dir"], cfg["registry"] = str(root / "runs"), str(root / "reg")
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    out = [(root / "digits.yaml", "mlp-wide")]
    if not QUICK:
        out += [(root / "digits.yaml", "cnn"), (root / "lm.yaml", "gpt-tiny"),
                (root / "user.yaml", "resnet-mlp")]
    return out


def _plan(config: Path, candidate: str | None, out: Path, cache: Path) -> dict[str, Any]:
    # calibrated afresh each time: as close as can be to the runs it is checked against
    cmd = [sys.executable, "-m", "distml", "plan", str(config), "--world-size", "2",
           "--check", "--steps", str(STEPS), "--json", str(out), "-q", "--recalibrate"]
    if candidate:
        cmd += ["--candidate", candidate]
    if QUICK:
        cmd += ["--check-only", "ddp,fsdp"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                         "DISTML_CACHE": str(cache)})
    return json.loads(out.read_text())


def merge_repeats(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (candidate, plan) from several runs of ``--check``: predicted and
    measured step time the median over runs, each run's quartiles kept, and the spread."""
    rows = []
    for first in runs[0]:
        same = [r for run in runs for r in run
                if (r["candidate"], r["plan"]) == (first["candidate"], first["plan"])]
        measured = sorted(r["measured_step_s"] for r in same)
        predicted = sorted(r["predicted_step_s"] for r in same)
        mid = statistics.median(measured)
        pred = statistics.median(predicted)
        rows.append({**first, "predicted_step_s": pred, "measured_step_s": mid,
                     "measured_step_s_per_run": [r["measured_step_s"] for r in same],
                     "measured_step_quartiles_s": [r.get("measured_step_quartiles_s")
                                                   for r in same],
                     "measured_spread": (measured[-1] - measured[0]) / max(mid, 1e-12),
                     "step_time_error": abs(pred - mid) / max(mid, 1e-12)})
    return rows


def agreement(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """Per candidate and per budget at each measured size: does the plan predicted fastest
    among those predicted to fit run fastest (or within 10% of it)?"""
    cases = []
    for cand in sorted({r["candidate"] for r in rows}):
        mine = [r for r in rows if r["candidate"] == cand and "predicted_bytes_per_rank" in r]
        budgets = sorted({max(r["measured_bytes_per_rank"] or [0]) for r in mine} | {None},
                         key=lambda b: float("inf") if b is None else b)
        for budget in budgets:
            fit = [r for r in mine if budget is None or
                   max(r["predicted_bytes_per_rank"]) <= budget]
            if len(fit) < 2:
                continue
            picked = min(fit, key=lambda r: r["predicted_step_s"])
            best = min(fit, key=lambda r: r["measured_step_s"])
            cases.append({"candidate": cand, "budget_bytes": budget, "plans": len(fit),
                          "predicted_fastest": picked["plan"], "measured_fastest": best["plan"],
                          "agrees": picked["measured_step_s"] <= 1.1 * best["measured_step_s"]})
    return cases, sum(c["agrees"] for c in cases) / max(len(cases), 1)


def _deepspeed_python() -> Path | None:
    """DeepSpeed's own environment (torch from ours through a .pth file, put there first:
    its build imports torch); None when it cannot be installed."""
    venv = VENVS / "deepspeed"
    exe = venv / "bin" / "python"
    if (venv / ".ready").is_file():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        site = subprocess.run([str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], check=True, capture_output=True, text=True)
        (Path(site.stdout.strip()) / "zz_distml_bench.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n")
        pip = [str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "wheel"], check=True)
        subprocess.run([*pip, "--no-build-isolation", DEEPSPEED], check=True,
                       env={**os.environ, "DS_BUILD_OPS": "0"})
    except subprocess.CalledProcessError:
        return None
    (venv / ".ready").touch()
    return exe


DS_SCRIPT = """
import json, sys
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
params, largest, ranks = (int(v) for v in sys.argv[1:4])
# no offload (the estimators' default offloads the optimizer state to CPU memory)
z2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks, num_nodes=1,
                                           cpu_offload=False)
z3 = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=ranks,
                                           num_nodes=1, cpu_offload=False,
                                           cpu_offload_params=False)
print(json.dumps({"zero2": z2[1], "zero3": z3[1]}))
"""


def deepspeed_estimates(models: dict[str, dict[str, int]], ranks: int) -> dict[str, Any]:
    """DeepSpeed's per-GPU model-state estimates for each model's parameter counts."""
    exe = _deepspeed_python()
    if exe is None:
        return {"available": False, "why": f"pip install {DEEPSPEED} failed here"}
    out: dict[str, Any] = {"available": True, "version": DEEPSPEED, "models": {}}
    for name, m in models.items():
        run = subprocess.run([str(exe), "-c", DS_SCRIPT, str(m["params"]), str(m["largest"]),
                              str(ranks)], capture_output=True, text=True,
                             env={**os.environ, "DS_ACCELERATOR": "cpu"})
        if run.returncode != 0:
            return {"available": False, "why": run.stderr.strip().splitlines()[-1:]}
        out["models"][name] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def _mape(errors: list[float]) -> float:
    return sum(errors) / max(len(errors), 1)


def versus_deepspeed(rows: list[dict[str, Any]], sizes: dict[str, dict[str, int]],
                     ds: dict[str, Any]) -> dict[str, Any]:
    """Measured per-rank model-state bytes of the ZeRO stages, distml's prediction and
    DeepSpeed's estimate, with each one's error."""
    table = []
    for r in rows:
        stage = ZERO_STAGE.get(r["strategy"])
        if stage is None or "measured_bytes_per_rank" not in r:
            continue
        measured = max(r["measured_bytes_per_rank"])
        entry = {"candidate": r["candidate"], "strategy": r["strategy"], "zero_stage": stage,
                 "parameters": sizes[r["candidate"]]["params"], "measured_bytes": measured,
                 "distml_bytes": max(r["predicted_bytes_per_rank"])}
        if ds.get("available"):
            est = ds["models"][r["candidate"]]["zero3" if stage == 3 else "zero2"]
            entry["deepspeed_bytes"] = est
            entry["deepspeed_error"] = abs(est - measured) / measured
        entry["distml_error"] = abs(entry["distml_bytes"] - measured) / measured
        table.append(entry)
    return {"rows": table, "distml_mape": _mape([e["distml_error"] for e in table]),
            **({"deepspeed_mape": _mape([e["deepspeed_error"] for e in table])}
               if ds.get("available") else {})}


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="distml-bench-plan-") as tmp:
        root = Path(tmp)
        runs: list[list[dict[str, Any]]] = [[] for _ in range(REPEATS)]
        sizes: dict[str, dict[str, int]] = {}
        machine: dict[str, Any] = {}
        for config, cand in _configs(root):
            for run in runs:
                report = _plan(config, cand, root / f"{config.stem}-{cand}.json",
                               root / "cache")
                run += report["check"]
            sizes[cand] = {k: report["candidates"][cand][k] for k in ("params", "largest")}
            machine = report["machine"]
    rows = merge_repeats(runs)
    with_mem = [r for r in rows if "memory_error" in r]
    cases, agree = agreement(rows)
    result = {
        "world_size": 2, "steps": STEPS, "pairs": len(rows),
        "memory_mape": _mape([r["memory_error"] for r in with_mem]),
        "memory_pairs": len(with_mem),
        "step_time_mape": _mape([r["step_time_error"] for r in rows]),
        "repeats": REPEATS,
        "step_time_spread": statistics.median(r["measured_spread"] for r in rows),
        "machine_model": machine,
        "rank_agreement": agree, "rank_cases": cases, "rows": rows,
        "deepspeed": versus_deepspeed(rows, sizes, deepspeed_estimates(sizes, 2)),
        "targets": {"memory_mape": 0.10, "step_time_mape": 0.25, "rank_agreement": 0.80},
    }
    if not QUICK:
        save("plan", result)
    return result


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    ds = r["deepspeed"]
    vs = (f"distml {ds['distml_mape']:.1%} vs DeepSpeed's estimators "
          f"{ds['deepspeed_mape']:.1%}" if "deepspeed_mape" in ds else
          f"distml {ds['distml_mape']:.1%} (DeepSpeed not available)")
    where = f"plan, {r['pairs']} (model, strategy) pairs, world size 2"
    return [(where, "memory_mape", f"{r['memory_mape']:.1%}", "<= 10%"),
            (where, "step_time_mape", f"{r['step_time_mape']:.1%}" + (
                f" (measured runs differ by {r['step_time_spread']:.0%}, median)"
                if "step_time_spread" in r else ""), "<= 25%"),
            (where, "rank_agreement", f"{r['rank_agreement']:.0%} of "
             f"{len(r['rank_cases'])} cases", ">= 80%"),
            ("plan, ZeRO stages", "model-state bytes/rank, error", vs, "reported")]


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
