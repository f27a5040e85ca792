"""Model parallelism measured on a transformer (4 blocks, dim 256, 4 heads, 128 tokens,
batch 16), each configuration on its own launch of 2 processes (or 1 for single):

- pipeline bubble: K = 2 stages under GPipe at M = 1, K and 4K micro-batches, and
  interleaved 1F1B with 2 stages per rank at M = K and 4K. Each stage
  records when its forward and backward of each micro-batch ran; the bubble is the fraction
  of the step's wall time in which the stage computed nothing, averaged over stages and
  steps (after warm-up), next to GPipe's formula (K - 1) / (M + K - 1).
- memory per rank: the activations kept from forward for backward (bytes of the tensors
  autograd saves, parameters excluded, counted until backward starts) and the training state
  (parameters + gradients + Adam), for single with and without activation checkpointing,
  and for tensor parallel over 2 ranks. (On CPU there is no allocator peak to read; these
  are the two terms the peak is made of. On CUDA, torch.cuda.max_memory_allocated is also
  recorded.)

    python -m bench.model_parallel            the measurements, as JSON
    python -m bench.model_parallel --worker   one process of a launch (internal)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import mean

import torch

MODEL = {"type": "transformer", "num_layers": 4, "num_heads": 4, "dim": 256,
         "context_length": 128}
BATCH, TOKENS, STEPS, WARMUP = 16, 128, 8, 2


def _settings(**train):
    from distml.config import TrainSettings

    return TrainSettings(batch_size=BATCH, lr=1e-3, **train)


def _parallel(strategy: str, world_size: int, **pipeline) -> dict:
    return {"parallel": {"strategy": strategy, "world_size": world_size,
                         **({"pipeline": pipeline} if pipeline else {})}}


def _activation_bytes(strategy, x, y, loss) -> int:
    """Bytes of the non-parameter tensors autograd saves during forward."""
    params = {p.data_ptr() for p in strategy.model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        in_forward = torch._C._current_graph_task_id() == -1  # not a backward recompute
        if in_forward and t.data_ptr() not in params:
            seen[t.data_ptr(), t.numel()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        strategy.train_step([(x, y)], loss)
    return sum(seen.values())


def _worker(args: argparse.Namespace) -> None:
    from distml.distributed.runtime import init_distributed, shutdown
    from distml.distributed.strategy import make_strategy
    from distml.models import build_model
    from distml.tasks import loss_fn

    env = init_distributed()
    settings = _settings(**json.loads(args.settings))
    torch.manual_seed(0)
    model = build_model({"type": "transformer", "kwargs": {
        k: v for k, v in MODEL.items() if k != "type"}})
    strategy = make_strategy(settings.parallel.strategy, model, settings, env)
    rows = BATCH // strategy.data_size
    g = torch.Generator().manual_seed(strategy.data_rank)
    x = torch.randint(0, 256, (rows, TOKENS), generator=g)
    y = torch.randint(0, 256, (rows, TOKENS), generator=g)

    def loss(out, target):
        return loss_fn("language_modeling", out, target)

    result: dict = {"rank": env.rank}
    if settings.parallel.strategy == "pipeline":
        bubbles = []
        for step in range(STEPS):
            strategy.train_step([(x, y)], loss)
            start, end = strategy.last_step
            if step >= WARMUP:
                busy = sum(b - a for a, b in strategy.busy)
                bubbles.append(1 - busy / (end - start))
        result["bubble"] = mean(bubbles)
    else:
        strategy.train_step([(x, y)], loss)  # warm-up: optimizer state exists from here on
        result["activation_bytes"] = _activation_bytes(strategy, x, y, loss)
        result["state_bytes"] = sum(strategy.local_bytes().values())
        if torch.cuda.is_available():
            result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    out: list = [None] * env.world_size
    if env.distributed:
        torch.distributed.all_gather_object(out, result)
    else:
        out = [result]
    if env.is_main:
        Path(args.out).write_text(json.dumps(out))
    shutdown()


def _launch(name: str, world_size: int, folder: Path, **train) -> list[dict]:
    from distml.distributed.launch import launch_local

    out = folder / f"{name}.json"
    launch_local("bench.model_parallel", ["--worker", "--settings", json.dumps(
        train), "--out", str(out)], world_size=world_size,
        max_restarts=0, log_dir=folder / "logs", what=name)
    return json.loads(out.read_text())


def measure() -> dict:
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        folder = Path(tmp)
        k = 2
        bubble, interleaved = {}, {}
        for m in (1, k, 4 * k):
            ranks = _launch(f"gpipe-{m}", k, folder, **_parallel(
                "pipeline", k, schedule="gpipe", num_microbatches=m))
            bubble[str(m)] = {"measured": round(mean(r["bubble"] for r in ranks), 3),
                              "formula": round((k - 1) / (m + k - 1), 3)}
        v = 2  # interleaved: v stages per rank cut the bubble to (K-1)/(v*M + K-1)
        for m in (k, 4 * k):
            ranks = _launch(f"interleaved-{m}", k, folder, **_parallel(
                "pipeline", k, schedule="interleaved-1f1b", virtual_stages=v,
                num_microbatches=m))
            interleaved[str(m)] = {"measured": round(mean(r["bubble"] for r in ranks), 3),
                                   "formula": round((k - 1) / (v * m + k - 1), 3)}
        memory = {
            "single": _launch("single", 1, folder),
            "single_activation_checkpointing": _launch(
                "single-ac", 1, folder, activation_checkpointing=True),
            "tensor_2": _launch("tensor", 2, folder, **_parallel("tensor", 2)),
        }
    return {
        "model": MODEL, "batch_size": BATCH, "stages": k,
        "pipeline_bubble_measured": {m: v["measured"] for m, v in bubble.items()},
        "pipeline_bubble_formula": {m: v["formula"] for m, v in bubble.items()},
        "interleaved_bubble": interleaved,
        "memory_per_rank": {name: [{k: v for k, v in r.items() if k != "rank"} for r in ranks]
                            for name, ranks in memory.items()},
    }


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    m = r
    bubble = "; ".join(f"M={k}: {v:.3f} vs {m['pipeline_bubble_formula'][k]:.3f}"
                       for k, v in m["pipeline_bubble_measured"].items())
    mem = m["memory_per_rank"]

    def mib(name: str, key: str) -> float:
        return mem[name][0][key] / 2**20

    interleaved = "; ".join(f"M={k}: {v['measured']:.3f} vs {v['formula']:.3f}"
                            for k, v in m["interleaved_bubble"].items())
    return [
        ("pipeline, 2 stages, GPipe", "pipeline_bubble_measured vs (K-1)/(M+K-1)", bubble,
         "reported"),
        ("pipeline, 2 ranks x 2 stages, interleaved 1F1B", "bubble vs (K-1)/(vM+K-1)",
         interleaved, "reported"),
        ("transformer 4x256, batch 16x128", "activation MiB per rank: single / activation "
         "checkpointing / tensor x2",
         f"{mib('single', 'activation_bytes'):.1f} / "
         f"{mib('single_activation_checkpointing', 'activation_bytes'):.1f} / "
         f"{mib('tensor_2', 'activation_bytes'):.1f}", "reported"),
        ("transformer 4x256", "state MiB per rank (params+grads+Adam): single / tensor x2",
         f"{mib('single', 'state_bytes'):.1f} / {mib('tensor_2', 'state_bytes'):.1f}",
         "reported"),
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--settings")
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        from distml.distributed.runtime import run_worker

        run_worker(lambda: _worker(a))
    else:
        json.dump(measure(), sys.stdout, indent=2)
