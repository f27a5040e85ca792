"""Training: distml's loop against a hand-written torch loop, DDP scaling, memory per rank,
and model parallelism (pipeline bubble, activation checkpointing, tensor parallel memory: see
bench/model_parallel.py).

- ratio_vs_raw_torch: steps/s of distml's single strategy (the whole Trainer: loader,
  scheduler, clipping, loss logging) over a hand-written loop running the same model, the
  same initial weights and the same batches from memory. Same thread count. The two
  alternate: a warm-up round, then REPEATS rounds (each ratio is of one round's pair).
- ddp_efficiency_2: samples/s of ddp on 2 processes over 1 process, one thread per process,
  on a compute-bound MLP; efficiency = speedup / 2. Both go through the launcher; launches
  alternate (1, 2, 2, 1, 1, 2), DDP_LAUNCHES each, and every epoch after a launch's first is
  a sample (paired with the same epoch of the other's launch in that round).
- memory: bytes per rank of parameters, gradients and optimizer state under ddp, zero1,
  fsdp-zero2 and fsdp at world size 2, each strategy on its own processes (distml verify
  --separate), measured (Strategy.held_bytes: the tensors' storages, each counted once) at
  three moments of a step: after forward, after backward (before the optimizer step) and
  after the step; next to the ZeRO paper's formulas for fp32 Adam (4 bytes per parameter
  for parameters, 4 for gradients, 8 for Adam's moments) for ddp, ZeRO-1, ZeRO-2, ZeRO-3.
  Peak RSS is per strategy too, since each has its own processes.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench import model_parallel
from bench.common import interleaved, median, pin_ranks, ratios, save, show, stats

HIDDEN, FEATURES, CLASSES, BATCH = [1024, 1024], 32, 4, 256
STEPS, REPEATS = 150, 5
DDP_LAUNCHES, DDP_EPOCHS, DDP_ROWS = 5, 4, 30_000
# verify's strategies and the ZeRO stage each realises
ZERO_STAGE = {"ddp": "ddp", "zero1": "zero1", "fsdp-zero2": "zero2", "fsdp": "zero3"}


def _config(root: Path, n_samples: int = 60_000, **train) -> dict:
    return {
        "name": "bench", "output_dir": str(root / "runs"), "registry": str(root / "reg"),
        "data": {"source": {"type": "synthetic:classification", "n_samples": n_samples,
                            "n_features": FEATURES, "n_classes": CLASSES},
                 "split": {"train": 0.9, "val": 0.05, "test": 0.05}},
        "train": {"epochs": 2, "batch_size": BATCH, "lr": 1e-3, "checkpoints": False,
                  "restore_best": False,
                  "candidates": [{"name": "mlp", "model": {"type": "mlp",
                                                           "hidden_sizes": HIDDEN}}], **train},
    }


def raw_vs_distml(root: Path) -> dict:
    """Both in this process, one after the other, on the same batches."""
    from distml.config import parse_config
    from distml.data.ingest import ingest
    from distml.data.loader import PartitionLoader
    from distml.data.tensors import SplitTensors
    from distml.distributed.runtime import DistEnv
    from distml.distributed.strategy import Strategy
    from distml.training.candidate import build_candidate_model
    from distml.training.trainer import Trainer, lr_lambda

    cfg = parse_config(_config(root, max_steps=STEPS, epochs=50))
    manifest = ingest(cfg.data, root / "data", seed=0)
    cand = cfg.train.candidates[0]
    settings = cfg.train.settings_for(cand)
    val = SplitTensors.load(manifest, "val")

    def loader() -> PartitionLoader:
        return PartitionLoader(manifest, "train", batch_size=BATCH, seed=0,
                               config=cfg.data.loader)

    batches = [b for _, b in zip(range(STEPS), loader().batches(0), strict=False)]

    def raw() -> float:  # the hand-written loop
        model, _ = build_candidate_model(cfg, cand, manifest, val.x[:2])
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(settings, STEPS))
        start = time.perf_counter()
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        return STEPS / (time.perf_counter() - start)

    def distml() -> float:
        model, _ = build_candidate_model(cfg, cand, manifest, val.x[:2])
        trainer = Trainer(Strategy(model, settings, DistEnv()), settings, task=manifest.task,
                          train_loader=loader(), val_data=(val.x[:1], val.y[:1]),
                          metric=cfg.metric, checkpoint_dir=root / "ck")
        start = time.perf_counter()
        trainer.fit()
        return STEPS / (time.perf_counter() - start)

    rates = interleaved({"raw_torch": raw, "distml": distml}, repeats=REPEATS)
    return {"raw_torch_steps_per_s": stats(rates["raw_torch"]),
            "distml_steps_per_s": stats(rates["distml"]),
            "ratio_vs_raw_torch": stats(ratios(rates["distml"], rates["raw_torch"])),
            "threads": torch.get_num_threads()}


def _pinned(cmd: list[str], world: int) -> None:
    """Run a training command, each of its ranks pinned to its own core, one thread each."""
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL)
    pin_ranks(proc, list(range(world)))
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")


def _distml_ddp(root: Path, name: str, world: int, batch: int) -> list[float]:
    """samples/s of distml's ddp per epoch after the first (warm-up), through its launcher."""
    cfg = _config(root, DDP_ROWS, batch_size=batch, epochs=DDP_EPOCHS,
                  parallel={"strategy": "ddp", "world_size": world})
    cfg["name"] = name
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    _pinned([sys.executable, "-m", "distml", "train", str(root / f"{name}.yaml"), "--quiet"],
            world)
    (result,) = (root / "runs" / name).glob("*/candidates/mlp/result.json")
    return [e["samples_per_s"] for e in json.loads(result.read_text())["epochs"][1:]]


def _raw_ddp(root: Path, name: str, world: int, batch: int) -> list[float]:
    """The same for the DDP tutorial's hand-written loop (bench/raw_ddp.py) under torchrun,
    on as many training rows as distml's split holds."""
    out = root / f"{name}.json"
    _pinned([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", str(world), str(Path(__file__).with_name("raw_ddp.py")),
             "--rows", str(int(DDP_ROWS * 0.9)), "--epochs", str(DDP_EPOCHS), "--batch",
             str(batch), "--features", str(FEATURES), "--classes", str(CLASSES),
             "--hidden", *map(str, HIDDEN), "--out", str(out)], world)
    return json.loads(out.read_text())["samples_per_s"][1:]


def ddp_scaling(root: Path) -> dict:
    """distml's ddp on 1 and 2 ranks and the hand-written DDP loop on 2, each rank pinned to
    its own core, in interleaved rounds; ratios within a round (medians of its epochs)."""
    batch = 1024  # a bigger global batch: compute-bound, as data parallelism is meant for
    launches = {"distml_1": lambda i: _distml_ddp(root, f"ddp1-{i}", 1, batch),
                "distml_2": lambda i: _distml_ddp(root, f"ddp2-{i}", 2, batch),
                "raw_2": lambda i: _raw_ddp(root, f"raw2-{i}", 2, batch)}
    rounds = itertools.count()  # a fresh name per launch
    rates = interleaved({k: (lambda f=f: median(f(next(rounds)))) for k, f in launches.items()},
                        repeats=DDP_LAUNCHES)
    speedup = ratios(rates["distml_2"], rates["distml_1"])
    return {"samples_per_s_1": stats(rates["distml_1"]),
            "samples_per_s_2": stats(rates["distml_2"]),
            "raw_ddp_samples_per_s_2": stats(rates["raw_2"]),
            "ddp_batch_size": batch, "ddp_speedup_2": stats(speedup),
            "ddp_efficiency_2": stats([x / 2 for x in speedup]),
            "ddp_ratio_vs_raw_ddp": stats(ratios(rates["distml_2"], rates["raw_2"])),
            "pinned": "each rank to its own core, one thread"}


def memory(root: Path) -> dict:
    from distml.config import parse_config
    from distml.verify import verify
    from distml.workflow.pipeline import stage_ingest, start_run

    cfg = parse_config(_config(root))
    run = start_run(cfg)
    report = verify(cfg, run.folder, stage_ingest(run), candidate="mlp",
                    strategies=list(ZERO_STAGE), steps=3, world_size=2, separate=True)
    params = sum(a * b + b for a, b in zip([FEATURES, *HIDDEN], [*HIDDEN, CLASSES],
                                           strict=True))
    w = 2
    formula = {  # bytes per rank, fp32 Adam (ZeRO paper, Table 1 with K=8, 4-byte weights)
        "ddp": 16 * params, "zero1": 4 * params + 4 * params + 8 * params / w,
        "zero2": 4 * params + 12 * params / w, "zero3": 16 * params / w}
    held, peak_moment = {}, {}
    for r in report["results"]:
        per_rank = r["held_bytes_per_rank"]  # [{moment: {params, grads, optimizer}}]
        held[r["strategy"]] = per_rank
        peak_moment[r["strategy"]] = [max(moments.items(), key=lambda kv: sum(kv[1].values()))
                                      for moments in per_rank]
    return {
        "parameters": params, "world_size": w, "formula_bytes_per_rank": formula,
        "zero_stage_of_strategy": ZERO_STAGE,
        # the most a rank held at the three moments, and when (measured)
        "measured_bytes_per_rank": {k: [sum(b.values()) for _, b in v]
                                    for k, v in peak_moment.items()},
        "measured_moment_per_rank": {k: [m for m, _ in v] for k, v in peak_moment.items()},
        "held_bytes_per_rank": held,
        # what local_bytes derives from the shapes after the step (the former figure)
        "state_bytes_after_step_per_rank": {
            r["strategy"]: [sum(b.values()) for b in r["state_bytes_per_rank"]]
            for r in report["results"]},
        "peak_rss_bytes": {r["strategy"]: r["peak_mem_bytes"] for r in report["results"]},
        "verify_passed": all(r["passed"] for r in report["results"]),
    }


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        root = Path(tmp)
        result = {"model": {"type": "mlp", "hidden_sizes": HIDDEN, "features": FEATURES},
                  "batch_size": BATCH, "steps": STEPS,
                  **raw_vs_distml(root), **ddp_scaling(root), "memory": memory(root),
                  "model_parallel": model_parallel.measure()}
    save("train", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    if not isinstance(r.get("ratio_vs_raw_torch"), dict):  # a file from before the repeats
        return []
    m = r["memory"]
    mib = 1 / 2**20

    def split(moment: dict) -> str:
        return "+".join(f"{moment[k] * mib:.1f}" for k in ("params", "grads", "optimizer"))

    mem = "; ".join(
        f"{name} {' / '.join(f'{b * mib:.1f}' for b in v)} (vs {stage} "
        f"{m['formula_bytes_per_rank'][stage] * mib:.1f}; rank 0 "
        f"{m['measured_moment_per_rank'][name][0].replace('_', ' ')}: "
        f"{split(m['held_bytes_per_rank'][name][0][m['measured_moment_per_rank'][name][0]])})"
        for name, stage in m["zero_stage_of_strategy"].items()
        for v in [m["measured_bytes_per_rank"][name]])
    rss = ", ".join(f"{k} {v * mib:.0f}" for k, v in m["peak_rss_bytes"].items())
    return [
        ("train, mlp 32-1024-1024-4", "ratio_vs_raw_torch",
         f"{show(r['ratio_vs_raw_torch'], '{:.3f}')} ({show(r['distml_steps_per_s'], '{:.0f}')}"
         f" vs {show(r['raw_torch_steps_per_s'], '{:.0f}')} steps/s, batch {r['batch_size']})",
         ">= 0.95"),
        ("train, mlp 32-1024-1024-4", "ddp_efficiency_2",
         f"{show(r['ddp_efficiency_2'])} (speedup {show(r['ddp_speedup_2'])}, 1 thread/rank, "
         f"batch {r['ddp_batch_size']})", "reported"),
        *([("train, mlp 32-1024-1024-4, ddp x2", "ddp_ratio_vs_raw_ddp",
            f"{show(r['ddp_ratio_vs_raw_ddp'], '{:.3f}')} (distml "
            f"{show(r['samples_per_s_2'], '{:.0f}')} vs the DDP tutorial's loop "
            f"{show(r['raw_ddp_samples_per_s_2'], '{:.0f}')} samples/s; ranks pinned)",
            ">= 0.98")] if "ddp_ratio_vs_raw_ddp" in r else []),
        ("train, world size 2", "MiB held per rank at the step's fullest moment, rank 0 / "
         "rank 1 (params+grads+optimizer)", f"{mem}", "reported"),
        ("train, world size 2", "peak RSS MiB per strategy (own processes)", rss, "reported"),
        *model_parallel.table_rows(r["model_parallel"]),
    ]


if __name__ == "__main__":
    print(main())
