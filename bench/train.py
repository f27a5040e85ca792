"""Training: distml's loop against a hand-written torch loop, DDP scaling, memory per rank,
and model parallelism (pipeline bubble, activation checkpointing, tensor parallel memory: see
bench/model_parallel.py).

- ratio_vs_raw_torch: steps/s of distml's single strategy (the whole Trainer: loader,
  scheduler, clipping, loss logging) over a hand-written loop running the same model, the
  same initial weights and the same batches from memory. Same thread count.
- ddp_efficiency_2: samples/s of ddp on 2 processes over 1 process, one thread per process,
  on a compute-bound MLP; efficiency = speedup / 2. Both runs go through the launcher.
- memory: bytes per rank of parameters, gradients and optimizer state under ddp, zero1 and
  fsdp at world size 2 (as measured by distml verify), next to the ZeRO paper's formulas for
  fp32 Adam: 4 bytes per parameter each for parameters and gradients, 8 for Adam's moments.
"""

from __future__ import annotations

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
from bench.common import save

HIDDEN, FEATURES, CLASSES, BATCH = [1024, 1024], 32, 4, 256
STEPS = 150


def _config(root: Path, **train) -> dict:
    return {
        "name": "bench", "output_dir": str(root / "runs"), "registry": str(root / "reg"),
        "data": {"source": {"type": "synthetic:classification", "n_samples": 60_000,
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
    from distml.distributed.runtime import DistEnv
    from distml.distributed.strategy import Strategy
    from distml.training.candidate import SplitTensors, build_candidate_model
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
    results = {}
    for _ in range(2):  # alternate, twice: the second round is reported
        model, _ = build_candidate_model(cfg, cand, manifest, val.x[:2])
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(settings, STEPS))
        start = time.perf_counter()
        for x, y in batches:  # the hand-written loop
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        results["raw_torch_steps_per_s"] = STEPS / (time.perf_counter() - start)

        model, _ = build_candidate_model(cfg, cand, manifest, val.x[:2])
        trainer = Trainer(Strategy(model, settings, DistEnv()), settings, task=manifest.task,
                          train_loader=loader(), val_data=(val.x[:1], val.y[:1]),
                          metric=cfg.metric, checkpoint_dir=root / "ck")
        start = time.perf_counter()
        trainer.fit()
        results["distml_steps_per_s"] = STEPS / (time.perf_counter() - start)
    results["ratio_vs_raw_torch"] = results["distml_steps_per_s"] / results["raw_torch_steps_per_s"]
    results["threads"] = torch.get_num_threads()
    return results


def _train(root: Path, name: str, **train) -> dict:
    cfg_path = root / f"{name}.yaml"
    cfg = _config(root, **train)
    cfg["name"] = name
    cfg_path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "distml", "train", str(cfg_path), "--quiet"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (result,) = (root / "runs" / name).glob("*/candidates/mlp/result.json")
    return json.loads(result.read_text())


def ddp_scaling(root: Path) -> dict:
    batch = 1024  # a bigger global batch: compute-bound, as data parallelism is meant for
    one = _train(root, "one", parallel={"strategy": "ddp", "world_size": 1}, batch_size=batch)
    two = _train(root, "two", parallel={"strategy": "ddp", "world_size": 2}, batch_size=batch)
    rate1, rate2 = one["epochs"][-1]["samples_per_s"], two["epochs"][-1]["samples_per_s"]
    return {"samples_per_s_1": rate1, "samples_per_s_2": rate2, "ddp_batch_size": batch,
            "ddp_speedup_2": rate2 / rate1, "ddp_efficiency_2": rate2 / rate1 / 2}


def memory(root: Path) -> dict:
    from distml.config import parse_config
    from distml.verify import verify
    from distml.workflow.pipeline import stage_ingest, start_run

    cfg = parse_config(_config(root))
    run = start_run(cfg)
    report = verify(cfg, run.dir, stage_ingest(run), candidate="mlp",
                    strategies=["ddp", "zero1", "fsdp", "fsdp-zero2"], steps=3, world_size=2)
    params = sum(a * b + b for a, b in zip([FEATURES, *HIDDEN], [*HIDDEN, CLASSES],
                                           strict=True))
    w = 2
    formula = {  # bytes per rank, fp32 Adam (ZeRO paper, Table 1 with K=8, 4-byte weights)
        "ddp": 16 * params, "zero1": 4 * params + 4 * params + 8 * params / w,
        "zero2": 4 * params + 12 * params / w, "zero3": 16 * params / w}
    measured = {r["strategy"]: [sum(b.values()) for b in r["state_bytes_per_rank"]]
                for r in report["results"]}
    return {"parameters": params, "world_size": w, "measured_bytes_per_rank": measured,
            "formula_bytes_per_rank": formula,
            # (peak RSS on CPU is per process; verify runs the strategies in one process)
            "peak_rss_bytes": {r["strategy"]: r["peak_mem_bytes"] for r in report["results"]},
            "verify_passed": all(r["passed"] for r in report["results"])}


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
    m = r["memory"]
    mem = ", ".join(f"{k} {' / '.join(f'{b / 2**20:.1f}' for b in v)}"
                    for k, v in m["measured_bytes_per_rank"].items())
    formula = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in m["formula_bytes_per_rank"].items())
    return [
        ("train, mlp 32-1024-1024-4", "ratio_vs_raw_torch",
         f"{r['ratio_vs_raw_torch']:.3f} ({r['distml_steps_per_s']:.0f} vs "
         f"{r['raw_torch_steps_per_s']:.0f} steps/s, batch {r['batch_size']})", ">= 0.95"),
        ("train, mlp 32-1024-1024-4", "ddp_efficiency_2",
         f"{r['ddp_efficiency_2']:.2f} (speedup {r['ddp_speedup_2']:.2f}, 1 thread/rank, "
         f"batch {r['ddp_batch_size']})", "reported"),
        ("train, world size 2", "MiB of params+grads+optimizer, rank 0 / rank 1",
         f"measured: {mem}; ZeRO formulas: {formula}", "reported"),
        *model_parallel.table_rows(r["model_parallel"]),
    ]


if __name__ == "__main__":
    print(main())
