"""Model parallelism measured on a transformer (4 blocks, dim 256, 4 heads, 128 tokens,
batch 16):

- pipeline bubble: K = 2 stages under GPipe at M = 1, K and 4K micro-batches, and
  interleaved 1F1B with 2 stages per rank at M = K and 4K, all five built in one launch of
  2 processes (one thread each) and run in interleaved rounds (a warm-up round, then
  ROUNDS, each running every configuration STEPS_PER_ROUND steps, in a rotated order).
  Every rank records each compute action of a step (forward, loss, backward of a stage and
  micro-batch, start and end on time.perf_counter, which on Linux is CLOCK_MONOTONIC: one
  clock for all processes of the machine), and the records are gathered. The bubble of a
  step is the idle share of the K ranks over ONE shared window, from the first rank's entry
  into the schedule to the last rank's exit: 1 - sum(busy) / (K x window). Next to it: the
  formula (K-1)/(M+K-1) (or (K-1)/(vM+K-1) interleaved), which assumes every stage takes
  the same time and sends are free; a makespan model that replays each rank's recorded
  order of actions with the measured per-stage forward/loss/backward times and free sends
  (so measured - model is what communication and overhead cost, model - formula what
  unequal stages cost); and the old per-rank measure over each rank's own window, which
  leaves out the ranks' waits at the edges of the step and so reads too low.
- memory per rank: the activations kept from forward for backward (bytes of the tensors
  autograd saves, parameters excluded, counted until backward starts) and the training state
  (parameters + gradients + Adam), for single with and without activation checkpointing,
  and for tensor parallel over 2 ranks. These are byte counts of tensors: the same on every
  run. (On CPU there is no allocator peak to read; these are the two terms the peak is made
  of. On CUDA, torch.cuda.max_memory_allocated is also recorded.)

    python -m bench.model_parallel            the measurements, as JSON
    python -m bench.model_parallel --worker   one process of a launch (internal)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

import torch

from bench.common import show, stats

MODEL = {"type": "transformer", "num_layers": 4, "num_heads": 4, "dim": 256,
         "context_length": 128}
BATCH, TOKENS = 16, 128
K, V = 2, 2  # pipeline ranks; stages per rank under interleaved 1F1B
ROUNDS, WARMUP_ROUNDS, STEPS_PER_ROUND = 5, 1, 1
PIPELINES = {f"gpipe-{m}": {"schedule": "gpipe", "num_microbatches": m} for m in (1, K, 4 * K)}
PIPELINES |= {f"interleaved-{m}": {"schedule": "interleaved-1f1b", "virtual_stages": V,
                                   "num_microbatches": m} for m in (K, 4 * K)}

Action = tuple[str, int, int, float, float]  # kind, stage, micro-batch, start, end


# -- the bubble from the ranks' records of one step -----------------------------------------

def shared_window_bubble(ranks: list[dict]) -> float:
    """Idle share of all ranks over one window, first entry to last exit of the schedule.
    ``ranks``: per rank {"step": (start, end), "actions": [Action, ...]}."""
    start = min(r["step"][0] for r in ranks)
    end = max(r["step"][1] for r in ranks)
    busy = sum(b - a for r in ranks for *_, a, b in r["actions"])
    return 1 - busy / (len(ranks) * (end - start))


def own_window_bubble(ranks: list[dict]) -> float:
    """The former measure: each rank's idle share of its own step window, averaged."""
    return mean(1 - sum(b - a for *_, a, b in r["actions"]) / (r["step"][1] - r["step"][0])
                for r in ranks)


def stage_times(ranks: list[dict]) -> dict[tuple[int, str], float]:
    """Mean seconds of one micro-batch's action, per (stage, kind)."""
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in ranks:
        for kind, stage, _, a, b in r["actions"]:
            times[stage, kind].append(b - a)
    return {key: mean(v) for key, v in times.items()}


def model_bubble(orders: list[list[tuple[str, int, int]]],
                 times: dict[tuple[int, str], float]) -> float:
    """The bubble of a schedule whose ranks run their actions in the given orders, each
    (stage, kind) taking ``times`` seconds and sends taking none: an action starts when its
    rank is free and its input is ready (a forward: the previous stage's forward of that
    micro-batch; the loss: the forward; a backward: the next stage's backward, or the loss
    on the last stage; a weight backward: the backward)."""
    last = max(stage for order in orders for _, stage, _ in order)
    done: dict[tuple[str, int, int], float] = {}

    def needs(kind: str, stage: int, mb: int) -> tuple[str, int, int] | None:
        if kind == "forward":
            return ("forward", stage - 1, mb) if stage > 0 else None
        if kind == "loss":
            return "forward", stage, mb
        if kind == "backward":
            return ("backward", stage + 1, mb) if stage < last else (
                ("loss", stage, mb) if ("loss", stage, mb) in wanted else ("forward", stage, mb))
        return "backward", stage, mb

    wanted = {a for order in orders for a in order}
    free, nxt = [0.0] * len(orders), [0] * len(orders)
    while any(n < len(o) for n, o in zip(nxt, orders, strict=True)):
        progressed = False
        for r, order in enumerate(orders):
            while nxt[r] < len(order):
                kind, stage, mb = order[nxt[r]]
                dep = needs(kind, stage, mb)
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep] if dep is not None else 0.0)
                free[r] = done[kind, stage, mb] = start + times[stage, kind]
                nxt[r] += 1
                progressed = True
        if not progressed:
            raise ValueError("the orders deadlock: not a valid pipeline schedule")
    busy = sum(times[stage, kind] for order in orders for kind, stage, _ in order)
    return 1 - busy / (len(orders) * max(free))


def analyse(steps: list[list[dict]]) -> dict:
    """Per step: the shared-window bubble, the own-window one, the model's; and the
    per-stage times over all steps."""
    out: dict = {"shared_window": [], "own_window": [], "model_from_measured_times": []}
    for ranks in steps:
        orders = [[(k, s, m) for k, s, m, *_ in sorted(r["actions"], key=lambda a: a[3])]
                  for r in ranks]
        out["shared_window"].append(shared_window_bubble(ranks))
        out["own_window"].append(own_window_bubble(ranks))
        out["model_from_measured_times"].append(model_bubble(orders, stage_times(ranks)))
    per_stage = stage_times([r for ranks in steps for r in ranks])
    out["stage_ms"] = {f"{stage} {kind}": round(1e3 * t, 2)
                       for (stage, kind), t in sorted(per_stage.items())}
    return out


# -- the workers -------------------------------------------------------------------------------

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


def _model():
    from distml.models import build_model

    torch.manual_seed(0)
    return build_model({"type": "transformer", "kwargs": {
        k: v for k, v in MODEL.items() if k != "type"}})


def _data(strategy) -> tuple[torch.Tensor, torch.Tensor]:
    rows = BATCH // strategy.data_size
    g = torch.Generator().manual_seed(strategy.data_rank)
    return (torch.randint(0, 256, (rows, TOKENS), generator=g),
            torch.randint(0, 256, (rows, TOKENS), generator=g))


def _loss(out, target):
    from distml.tasks import loss_fn

    return loss_fn("language_modeling", out, target)


def _pipeline_worker(env) -> dict:
    """Every pipeline configuration, built once, run in interleaved rounds; rank 0 gets each
    measured step's records from every rank."""
    from distml.distributed.strategy import make_strategy

    strategies = {name: make_strategy("pipeline", _model(), _settings(**_parallel(
        "pipeline", K, **pp)), env) for name, pp in PIPELINES.items()}
    records: dict[str, list[list[dict]]] = {name: [] for name in strategies}
    names = list(strategies)
    for r in range(WARMUP_ROUNDS + ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            strategy = strategies[name]
            x, y = _data(strategy)
            for _ in range(STEPS_PER_ROUND):
                strategy.train_step([(x, y)], _loss)
                mine = {"step": strategy.last_step, "actions": list(strategy.actions)}
                ranks: list = [None] * env.world_size
                torch.distributed.all_gather_object(ranks, mine)
                if r >= WARMUP_ROUNDS:
                    records[name].append(ranks)
    return {"rounds": ROUNDS, "steps_per_round": STEPS_PER_ROUND,
            "clock": time.get_clock_info("perf_counter").implementation,
            **{name: analyse(steps) for name, steps in records.items()}}


def _memory_worker(env, settings) -> dict:
    from distml.distributed.strategy import make_strategy

    strategy = make_strategy(settings.parallel.strategy, _model(), settings, env)
    x, y = _data(strategy)
    strategy.train_step([(x, y)], _loss)  # warm-up: optimizer state exists from here on
    result = {"activation_bytes": _activation_bytes(strategy, x, y, _loss),
              "state_bytes": sum(strategy.local_bytes().values())}
    if torch.cuda.is_available():
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return result


def _worker(args: argparse.Namespace) -> None:
    from distml.distributed.runtime import init_distributed, shutdown

    env = init_distributed()
    if args.pipelines:
        result = _pipeline_worker(env)
        out = [result]
    else:
        result = {"rank": env.rank, **_memory_worker(env, _settings(**json.loads(args.settings)))}
        out = [None] * env.world_size
        if env.distributed:
            torch.distributed.all_gather_object(out, result)
        else:
            out = [result]
    if env.is_main:
        Path(args.out).write_text(json.dumps(out))
    shutdown()


def _launch(name: str, world_size: int, folder: Path, *extra: str) -> list[dict]:
    from distml.distributed.launch import launch_local

    out = folder / f"{name}.json"
    launch_local("bench.model_parallel", ["--worker", "--out", str(out), *extra],
                 world_size=world_size, max_restarts=0, log_dir=folder / "logs", what=name)
    return json.loads(out.read_text())


def _formula(name: str) -> float:
    pp = PIPELINES[name]
    m, v = pp["num_microbatches"], pp.get("virtual_stages", 1)
    return (K - 1) / (v * m + K - 1)


def measure() -> dict:
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        folder = Path(tmp)
        (runs,) = _launch("pipelines", K, folder, "--pipelines")
        memory = {
            name: _launch(name, world, folder, "--settings", json.dumps(train))
            for name, world, train in (
                ("single", 1, {}),
                ("single_activation_checkpointing", 1, {"activation_checkpointing": True}),
                ("tensor_2", 2, _parallel("tensor", 2)))
        }
    bubbles = {}
    for name in PIPELINES:
        r = runs[name]
        bubbles[name] = {
            "num_microbatches": PIPELINES[name]["num_microbatches"],
            "shared_window": stats(r["shared_window"]), "formula": round(_formula(name), 4),
            "model_from_measured_times": stats(r["model_from_measured_times"]),
            "own_window_old_measure": stats(r["own_window"]), "stage_ms": r["stage_ms"]}
    return {
        "model": MODEL, "batch_size": BATCH, "stages": K, "virtual_stages": V,
        "rounds": runs["rounds"], "steps_per_round": runs["steps_per_round"],
        "clock": runs["clock"], "pipeline_bubble": bubbles,
        "memory_per_rank": {name: [{k: v for k, v in r.items() if k != "rank"} for r in ranks]
                            for name, ranks in memory.items()},
    }


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    if "pipeline_bubble" not in r:  # a results file from before the shared window
        return []
    b = r["pipeline_bubble"]

    def row(names: list[str]) -> str:
        return "; ".join(
            f"M={b[n]['num_microbatches']}: {show(b[n]['shared_window'], '{:.3f}')} vs "
            f"{b[n]['formula']:.3f} (model {show(b[n]['model_from_measured_times'], '{:.3f}')}"
            f", own-window {b[n]['own_window_old_measure']['median']:.3f})" for n in names)
    mem = r["memory_per_rank"]

    def mib(name: str, key: str) -> float:
        return mem[name][0][key] / 2**20

    return [
        ("pipeline, 2 stages, GPipe", "bubble over the ranks' shared window vs "
         "(K-1)/(M+K-1) (makespan model from measured stage times; old own-window measure)",
         row([n for n in b if n.startswith("gpipe")]), "reported"),
        ("pipeline, 2 ranks x 2 stages, interleaved 1F1B", "bubble vs (K-1)/(vM+K-1)",
         row([n for n in b if n.startswith("interleaved")]), "reported"),
        ("transformer 4x256, batch 16x128", "activation MiB per rank: single / activation "
         "checkpointing / tensor x2 (byte counts)",
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
    p.add_argument("--pipelines", action="store_true")
    p.add_argument("--settings", default="{}")
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        from distml.distributed.runtime import run_worker

        run_worker(lambda: _worker(a))
    else:
        json.dump(measure(), sys.stdout, indent=2)
