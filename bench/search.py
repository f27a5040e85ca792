"""Hyperparameter and architecture search on digits: distml's search stage against Ray Tune
(ASHA) and Optuna in one process, on the same data, space and budget.

- Space: lr loguniform [1e-4, 0.3], layers (width x depth) one of 9 shapes, dropout uniform
  [0, 0.5], batch size one of 32/64/128; each trial trains an MLP for ``EPOCHS`` epochs
  (AdamW, cosine decay, gradient clipping at 1: distml's defaults) and reports validation
  accuracy every epoch. Budget: ``TRIALS`` trials per search.
- distml: ``distml run``'s pipeline on a config whose candidate has a ``search`` section:
  TPE, the ASHA pruner (Optuna's successive halving), 2 trials at a time on the local
  executor (a process pool; one thread per trial), trials written as candidates of the run
  (TensorBoard and checkpoints off, as for a search one does not resume). Its clock starts
  when its train stage does (ingest is timed by the ingest benchmark).
- Ray Tune: ``tune.Tuner`` with random search and ``ASHAScheduler`` (grace period 1,
  reduction factor 3), 2 trials at a time (one CPU and one thread each), in this project's
  Ray (started before the clock: a user's cluster is up already), the trial a plain
  PyTorch loop as its docs show.
- Optuna serial: ``study.optimize`` in this process, TPE and the median pruner, the same
  plain loop (torch using both cores).

Per seed (the search's and the data split's): wall time until a trial first reports
validation accuracy >= ``TARGET`` (from each search's start), the best accuracy of all its
trials, and the epochs its pruner saved (of TRIALS x EPOCHS). Reported: medians over the
seeds; ``time_to_target_vs_*`` = distml's median time over the peer's. Quick mode
(``DISTML_BENCH_QUICK=1``): one seed, fewer trials and epochs, to check that it runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import QUICK, save

SEEDS = (0,) if QUICK else (0, 1, 2)
TRIALS = 8 if QUICK else 24
EPOCHS = 4 if QUICK else 10
CONCURRENT = 2
TARGET = 0.97
SHAPES = [[32], [64], [128], [32, 32], [64, 64], [128, 128], [32, 32, 32], [64, 64, 64],
          [128, 128, 128]]
BATCH_SIZES = [32, 64, 128]
LR = (1e-4, 0.3)
DROPOUT = (0.0, 0.5)


def distml_config(root: Path, seed: int) -> dict[str, Any]:
    return {
        "name": f"search-{seed}", "seed": seed,
        "output_dir": str(root / "runs"), "registry": str(root / "registry"),
        "data": {"source": "sklearn:digits"},
        "execution": {"executor": "local", "num_workers": CONCURRENT},
        "train": {"epochs": EPOCHS, "checkpoints": False, "candidates": [{
            "name": "mlp", "model": {"type": "mlp"}, "search": {
                "space": {"lr": {"loguniform": list(LR)},
                          "model.hidden_sizes": {"choice": SHAPES},
                          "model.dropout": {"uniform": list(DROPOUT)},
                          "batch_size": {"choice": BATCH_SIZES}},
                "num_trials": TRIALS, "max_concurrent_trials": CONCURRENT,
                "sampler": "tpe", "pruner": "asha"}}]},
        "select": {"promote": False},
        "monitor": {"tensorboard": False, "system_metrics_interval_s": None},
    }


def run_distml(root: Path, seed: int) -> dict[str, Any]:
    from distml.config import parse_config
    from distml.workflow.pipeline import run_pipeline

    start = time.time()
    _, summary = run_pipeline(parse_config(distml_config(root, seed)))
    ingest = next(s["seconds"] for s in summary["stages"] if s["name"] == "ingest")
    t0 = start + ingest
    trials = summary["search"]["mlp"]["trials"]
    reached = [when - t0 for t in trials for when, acc in t["curve"] if acc >= TARGET]
    return {"time_to_target_s": min(reached) if reached else math.inf,
            "best_accuracy": max(t["value"] for t in trials if t["state"] == "complete"),
            "epochs_saved": sum(EPOCHS - (t["evals"] or 0) for t in trials
                                if t["state"] == "pruned"),
            "wall_s": max(t["end"] for t in trials) - t0,
            "trials": {s: sum(t["state"] == s for t in trials)
                       for s in ("complete", "pruned", "fail")}}


# -- the peers' trial: a plain PyTorch loop, as their docs show ------------------------------


def load_digits_split(root: Path, seed: int) -> dict[str, torch.Tensor]:
    """The train and validation rows distml's ingest makes for this seed (the same rows for
    every contender)."""
    from distml.config import parse_config
    from distml.data.tensors import SplitTensors
    from distml.workflow.pipeline import stage_ingest, start_run

    run = start_run(parse_config(distml_config(root / "peers", seed)))
    manifest = stage_ingest(run)
    train, val = SplitTensors.load(manifest, "train"), SplitTensors.load(manifest, "val")
    return {"x": train.x, "y": train.y, "vx": val.x, "vy": val.y}


def mlp(width_in: int, shape: list[int], dropout: float) -> nn.Module:
    layers: list[nn.Module] = []
    for w in shape:
        layers += [nn.Linear(width_in, w), nn.ReLU(), nn.Dropout(dropout)]
        width_in = w
    return nn.Sequential(*layers, nn.Linear(width_in, 10))


def train_epochs(params: dict[str, Any], data: dict[str, torch.Tensor], seed: int):
    """Yield validation accuracy after each epoch."""
    torch.manual_seed(seed)
    model = mlp(data["x"].shape[1], params["shape"], params["dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"])
    n, bs = len(data["x"]), params["batch_size"]
    steps = EPOCHS * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(n).split(bs):
            loss = nn.functional.cross_entropy(model(data["x"][idx]), data["y"][idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            yield (model(data["vx"]).argmax(1) == data["vy"]).float().mean().item()


def ray_trainable(config: dict[str, Any], data: dict[str, torch.Tensor] | None = None) -> None:
    from ray import tune

    torch.set_num_threads(1)
    params = {**config, "shape": SHAPES[config["shape"]]}
    for acc in train_epochs(params, data, config["seed"]):
        tune.report({"accuracy": acc, "wall": time.time()})


def run_ray_tune(data: dict[str, torch.Tensor], seed: int, root: Path) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    ray.init(num_cpus=CONCURRENT, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        space = {"lr": tune.loguniform(*LR), "shape": tune.randint(0, len(SHAPES)),
                 "dropout": tune.uniform(*DROPOUT), "batch_size": tune.choice(BATCH_SIZES),
                 "seed": seed}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(ray_trainable, data=data), {"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="accuracy", mode="max", num_samples=TRIALS,
                search_alg=tune.search.BasicVariantGenerator(
                    random_state=seed, max_concurrent=CONCURRENT),
                scheduler=ASHAScheduler(max_t=EPOCHS, grace_period=1, reduction_factor=3)),
            run_config=tune.RunConfig(storage_path=str(root / "ray"), verbose=0))
        t0 = time.time()
        results = tuner.fit()
        histories = [r.metrics_dataframe for r in results]
    finally:
        ray.shutdown()
    reached = [row["wall"] - t0 for h in histories for _, row in h.iterrows()
               if row["accuracy"] >= TARGET]
    return {"time_to_target_s": min(reached) if reached else math.inf,
            "best_accuracy": float(max(h["accuracy"].max() for h in histories)),
            "epochs_saved": sum(EPOCHS - len(h) for h in histories),
            "wall_s": float(max(h["wall"].max() for h in histories) - t0)}


def run_optuna_serial(data: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    reached: list[float] = []
    t0 = time.time()

    def objective(trial: optuna.Trial) -> float:
        params = {"lr": trial.suggest_float("lr", *LR, log=True),
                  "shape": SHAPES[trial.suggest_int("shape", 0, len(SHAPES) - 1)],
                  "dropout": trial.suggest_float("dropout", *DROPOUT),
                  "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES)}
        best = 0.0
        for epoch, acc in enumerate(train_epochs(params, data, seed), 1):
            best = max(best, acc)
            if acc >= TARGET:
                reached.append(time.time() - t0)
            trial.report(acc, epoch)
            trial.set_user_attr("epochs", epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, n_trials=TRIALS)
    wall = time.time() - t0
    torch.set_num_threads(1)
    return {"time_to_target_s": min(reached) if reached else math.inf,
            "best_accuracy": max(max(t.intermediate_values.values()) for t in study.trials),
            "epochs_saved": sum(EPOCHS - t.user_attrs["epochs"] for t in study.trials),
            "wall_s": wall}


def main() -> dict[str, Any]:
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="distml-bench-search-") as tmp:
        root = Path(tmp)
        for seed in SEEDS:
            data = load_digits_split(root, seed)
            row = {"seed": seed,
                   "distml": run_distml(root, seed),
                   "ray_tune": run_ray_tune(data, seed, root),
                   "optuna_serial": run_optuna_serial(data, seed)}
            print(json.dumps(row, default=float), flush=True)
            per_seed.append(row)
    med = {c: {k: statistics.median(r[c][k] for r in per_seed)
               for k in ("time_to_target_s", "best_accuracy", "epochs_saved", "wall_s")}
           for c in ("distml", "ray_tune", "optuna_serial")}
    budget = TRIALS * EPOCHS
    result = {
        "time_to_target_vs_ray_tune": med["distml"]["time_to_target_s"]
        / med["ray_tune"]["time_to_target_s"],
        "time_to_target_vs_optuna_serial": med["distml"]["time_to_target_s"]
        / med["optuna_serial"]["time_to_target_s"],
        "best_accuracy_gap_vs_ray_tune_pp": 100 * (med["ray_tune"]["best_accuracy"]
                                                   - med["distml"]["best_accuracy"]),
        "epochs_saved_by_pruning": med["distml"]["epochs_saved"] / budget,
        "medians": med, "seeds": per_seed, "quick": QUICK,
        "budget": {"trials": TRIALS, "epochs": EPOCHS, "concurrent": CONCURRENT,
                   "target_accuracy": TARGET},
    }
    if not QUICK:  # a quick run checks that it runs; its figures are not results
        save("search", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    m, what = r["medians"], "search, digits MLP"
    budget = r["budget"]
    return [
        (what, "time_to_target_vs_ray_tune",
         f"{r['time_to_target_vs_ray_tune']:.2f} ({m['distml']['time_to_target_s']:.1f} s vs "
         f"{m['ray_tune']['time_to_target_s']:.1f} s to val accuracy "
         f"{budget['target_accuracy']})", "<= 0.8"),
        (what, "time_to_target_vs_optuna_serial",
         f"{r['time_to_target_vs_optuna_serial']:.2f} (Optuna in one process "
         f"{m['optuna_serial']['time_to_target_s']:.1f} s)", "<= 0.6"),
        (what, "best_accuracy_gap_vs_ray_tune_pp",
         f"{r['best_accuracy_gap_vs_ray_tune_pp']:+.2f} (distml "
         f"{100 * m['distml']['best_accuracy']:.2f}%, Ray Tune "
         f"{100 * m['ray_tune']['best_accuracy']:.2f}%)", "<= 0"),
        (what, "epochs_saved_by_pruning",
         f"{100 * r['epochs_saved_by_pruning']:.0f}% of {budget['trials']} x "
         f"{budget['epochs']} epochs (Ray Tune's ASHA "
         f"{100 * m['ray_tune']['epochs_saved'] / (budget['trials'] * budget['epochs']):.0f}"
         "%)", "reported"),
    ]


if __name__ == "__main__":
    print(main())
