"""``distml verify``: does each distributed strategy train the model one process would?

The reference trains N steps in this process; every strategy trains N steps on
``world_size`` processes (one launch, strategies in turn; or, with ``separate``, a launch
per strategy, so that each process's peak memory is that strategy's own). Both start from
the same seeded weights, and at step k the reference's batch is the union of the ranks'
batches at step k, so with exact arithmetic the losses and final parameters would be equal.
Dropout is turned off: random masks differ by construction between one process and several.

Workers run ``python -m distml.verify --run-dir ...`` and write, per strategy, the loss of
every step and (rank 0) the full final parameters; the driver compares them.

With ``reshard``, each strategy's trained state (model and optimizer) also goes through a
torch.distributed.checkpoint checkpoint into another strategy on the same processes and back
into a fresh instance of itself: both loads' parameters and the round trip's optimizer state
are compared with the trained ones, at the same tolerance.

Parameter servers: ``ps-sync`` runs one worker and world_size - 1 servers in lock step
(``ParameterServer.train_step``), which is one process's step. The asynchronous modes are
refused with the reason: their result depends on the order gradients arrive in.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from distml.config import (
    Candidate,
    Config,
    ParallelConfig,
    TrainSettings,
    deep_merge,
)
from distml.config.strategies import NONDETERMINISTIC, STRATEGIES, VARIANTS, variant_names
from distml.data.dataset import Manifest
from distml.distributed.checkpoint import load_sharded, save_checkpoint
from distml.distributed.runtime import DistEnv, run_worker, worker_main
from distml.distributed.strategy import LossFn, Strategy, make_strategy
from distml.errors import DistmlError
from distml.rundir import RunDir
from distml.tasks import loss_fn
from distml.training.candidate import build_candidate_model, distiller_for, train_loader
from distml.training.distill import Distiller
from distml.training.trainer import lr_lambda, peak_memory, step_groups

logger = logging.getLogger(__name__)

Group = list[tuple[torch.Tensor, torch.Tensor]]
# Steps not timed: the first warms up, the first two carry the memory probe (the optimizer
# state exists from the second step on, so the fullest moments are seen by then).
WARMUP_STEPS = 2


def settings_for(name: str, base: TrainSettings, world_size: int, *,
                 own: ParallelConfig | None = None) -> TrainSettings:
    """Training settings of a strategy to verify (see the strategy table's variants; a
    'module:Class' user strategy runs as ddp); the candidate's other settings (precision,
    activation checkpointing, and from ``own``, the candidate's parallel settings with every
    section, those its record's ``verify_keeps`` names) are kept, and its degrees are not.
    Parameter servers run one worker, the other ranks servers: each step is one process's."""
    variant = VARIANTS.get(name, {"strategy": "ddp"})
    record, own = STRATEGIES[variant["strategy"]], own or base.parallel
    parallel: dict[str, Any] = {"strategy": record.name, "world_size": world_size}
    for section, keys in record.verify_keeps.items():
        parallel[section] = getattr(own, section).model_dump(include=set(keys))
    if record.servers:
        parallel["parameter_server"] = {"num_servers": world_size - 1}
    update = {"max_steps": None, "max_restarts": 0,
              "parallel": deep_merge(parallel, variant)}
    return TrainSettings(**{**base.model_dump(exclude={"parallel"}), **update})


def reference_settings(base: TrainSettings) -> TrainSettings:
    """One process, no activation checkpointing (it must not change the numbers), the
    candidate's precision (bf16 is compared with bf16)."""
    return settings_for("single", base.model_copy(update={"activation_checkpointing": False}), 1)


def _model(cfg: Config, cand: Candidate, manifest: Manifest, val_x: torch.Tensor) -> nn.Module:
    model, _ = build_candidate_model(cfg, cand, manifest, val_x)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _groups(manifest: Manifest, cfg: Config, s: TrainSettings, *, rank: int, world: int,
            steps: int, distiller: Distiller | None = None) -> Iterator[Group]:
    """This rank's micro-batches for ``steps`` optimizer steps, across epochs if need be
    (a distilled student's with its teacher's logits in the targets)."""
    loader = train_loader(cfg, manifest, s, rank=rank, replicas=world,
                          drop_last=True, distiller=distiller)  # the same shapes for all
    attach = distiller.attach if distiller is not None else (lambda b: b)
    done, epoch = 0, 0
    while True:
        for group in step_groups(loader.batches(epoch), s.grad_accum_steps):
            yield [attach(b) for b in group]
            done += 1
            if done == steps:
                return
        epoch += 1


def _union(groups_per_rank: list[Iterator[Group]]) -> Iterator[Group]:
    """The reference's step: micro-batch i is every rank's micro-batch i, concatenated."""
    for per_rank in zip(*groups_per_rank, strict=True):
        yield [(torch.cat([g[i][0] for g in per_rank]), torch.cat([g[i][1] for g in per_rank]))
               for i in range(len(per_rank[0]))]


def run_steps(strategy: Strategy, groups: Iterator[Group], task: str, steps: int,
              loss: LossFn | None = None) -> dict[str, Any]:
    """Train ``steps`` steps with the candidate's LR schedule (and loss: a distilled
    student's, or the task's); losses and timings."""
    sched = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer,
                                              lr_lambda(strategy.settings, steps))
    loss = loss or (lambda out, y: loss_fn(task, out, y))
    losses, seconds = [], []
    for group in groups:
        start = time.perf_counter()
        losses.append(strategy.train_step(group, loss))
        sched.step()
        seconds.append(time.perf_counter() - start)
    # the first steps warm up (and carry verify's memory probe): timed are the rest
    timed = sorted(seconds[WARMUP_STEPS:] or seconds[-1:])
    quartiles = [timed[(len(timed) - 1) * q // 4] for q in (1, 2, 3)]
    return {"losses": losses, "step_seconds": sum(timed) / len(timed),
            "step_seconds_median": quartiles[1], "step_seconds_quartiles": quartiles}


def _full_state(strategy: Strategy) -> dict[str, torch.Tensor] | None:
    sd = strategy.full_state_dict()
    return None if sd is None else {k: v.detach().clone().contiguous() for k, v in sd.items()}


def relative_diffs(ref: dict[str, Any], ref_state: dict[str, torch.Tensor],
                   got: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Max relative difference of the per-step losses, and of the final parameters
    (per tensor, ||p - p_ref|| / ||p_ref||)."""
    loss = max(abs(a - b) / max(abs(a), 1e-12)
               for a, b in zip(ref["losses"], got["losses"], strict=True))
    return loss, param_diff(ref_state, state)


def param_diff(ref_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> float:
    """Max over tensors of ||p - p_ref|| / ||p_ref||."""
    if state.keys() != ref_state.keys():
        missing = sorted(set(ref_state) ^ set(state))[:3]
        raise DistmlError(f"the strategy's parameters differ in names from the model's: {missing}")
    return max(_rel(state[k], v) for k, v in ref_state.items())


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = (getattr(t, "_local_tensor", t).float() for t in (got, ref))  # a DTensor's piece
    return float((got - ref).norm() / max(ref.norm(), 1e-12))


# -- the driver (the CLI process) ----------------------------------------------------------


def verify(
    cfg: Config, run: RunDir, manifest: Manifest, *, candidate: str, strategies: list[str],
    steps: int, world_size: int, tolerance: float | None = None, separate: bool = False,
    reshard: str | None = None,
) -> dict[str, Any]:
    """Run the reference here and the strategies on ``world_size`` processes; compare.
    ``separate``: one launch per strategy (peak memory per strategy; slower to start).
    ``reshard``: a variant each strategy's checkpoint goes through and back (see above)."""
    from distml.data.tensors import SplitTensors
    from distml.distributed.launch import launch_local

    check_names(strategies, reshard)
    cand = cfg.train.candidate(candidate)
    base = cfg.train.settings_for(cand)
    tol = tolerance if tolerance is not None else (1e-4 if base.precision == "fp32" else 2e-2)
    val_x = SplitTensors.load(manifest, "val").x[:2]
    distiller = distiller_for(cand, run.candidate(cand.name), torch.device("cpu"))
    references: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    for name in strategies:  # one reference per data-parallel degree: its batches
        data = settings_for(name, base, world_size).dims.data
        if data in references:
            continue
        strategy = Strategy(_model(cfg, cand, manifest, val_x), reference_settings(base),
                            DistEnv())
        ranks = [_groups(manifest, cfg, base, rank=r, world=data, steps=steps,
                         distiller=distiller) for r in range(data)]
        ref = run_steps(strategy, _union(ranks), manifest.task, steps,
                        distiller.loss if distiller else None)
        ref["peak_mem_bytes"] = peak_memory()
        references[data] = ref, _full_state(strategy)
    out = run.verify
    out.mkdir(parents=True, exist_ok=True)
    for names in ([[n] for n in strategies] if separate else [strategies]):
        launch_local("distml.verify", ["--run-dir", str(run.path), "--candidate", candidate,
                                       "--strategies", ",".join(names), "--steps", str(steps),
                                       "--out", str(out),
                                       *(["--reshard", reshard] if reshard else [])],
                     world_size=world_size, max_restarts=0, log_dir=out / "logs",
                     what="verify")
    results = []
    for name in strategies:
        got = json.loads((out / f"{_slug(name)}.json").read_text())
        state = load_file(out / f"{_slug(name)}.safetensors")
        ref, ref_state = references[settings_for(name, base, world_size).dims.data]
        loss_diff, params = relative_diffs(ref, ref_state, got, state)
        trip = got.get("reshard")  # {through, max_rel_param_diff, max_rel_optim_diff}
        results.append({
            "strategy": name, "max_rel_loss_diff": loss_diff, "max_rel_param_diff": params,
            "peak_mem_bytes": got["peak_mem_bytes"], "step_seconds": got["step_seconds"],
            "step_seconds_median": got["step_seconds_median"],
            "step_seconds_quartiles": got["step_seconds_quartiles"],
            "state_bytes_per_rank": got["state_bytes"],  # [{params, grads, optimizer}] by rank
            "held_bytes_per_rank": got["held_bytes"],  # [{moment: {params, grads, ...}}]
            **({"reshard": trip} if trip else {}),
            "passed": loss_diff <= tol and params <= tol and (trip is None or max(
                trip["max_rel_param_diff"], trip["max_rel_optim_diff"]) <= tol),
        })
    return {"candidate": candidate, "world_size": world_size, "steps": steps,
            "tolerance": tol, "separate_launches": separate,
            "reference": {"strategy": "single", **ref}, "results": results}


def check_names(strategies: list[str], reshard: str | None) -> None:
    """Refuse what verify cannot certify, before anything runs."""
    for name in strategies:
        if name in NONDETERMINISTIC:
            raise DistmlError(
                f"--strategies {name}: not deterministic ({NONDETERMINISTIC[name]}), so "
                "no run of it equals one process and verify cannot certify it; verify "
                "ps-sync (one worker, no backup workers: each step is the one process's "
                "step) and judge the asynchronous modes by their accuracy and measured "
                "staleness")
    unknown = [n for n in strategies if n not in VARIANTS and ":" not in n]
    if unknown:
        raise DistmlError(f"--strategies: unknown {', '.join(map(repr, unknown))}; use "
                          f"{variant_names()}")
    into = [n for n, v in VARIANTS.items()
            if STRATEGIES[v["strategy"]].distributed and not STRATEGIES[v["strategy"]].servers]
    if reshard is not None and reshard not in into:
        raise DistmlError(f"--reshard {reshard!r}: not a strategy whose checkpoints "
                          f"torch.distributed.checkpoint reshards; use one of {', '.join(into)}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# -- the workers ---------------------------------------------------------------------------


def _worker(args: argparse.Namespace, env: DistEnv) -> None:
    from distml.data.tensors import SplitTensors

    run = RunDir(args.run_dir)
    cfg = run.load_config()
    manifest = Manifest.read(run.data)
    cand = cfg.train.candidate(args.candidate)
    base = cfg.train.settings_for(cand)
    val_x = SplitTensors.load(manifest, "val").x[:2]
    distiller = distiller_for(cand, run.candidate(cand.name), env.device)
    def build(name: str) -> Strategy:
        s = settings_for(name, base, env.world_size, own=cfg.train.parallel_for(cand))
        return make_strategy(name if ":" in name else s.parallel.strategy,
                             _model(cfg, cand, manifest, val_x), s, env, sample=val_x)

    for name in args.strategies.split(","):
        strategy = build(name)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        held = _probe_held_bytes(strategy, manifest.task)
        trace = run_steps(strategy, _groups(manifest, cfg, base, rank=strategy.data_rank,
                                            world=strategy.data_size, steps=args.steps,
                                            distiller=distiller),
                          manifest.task, args.steps, distiller.loss if distiller else None)
        per_rank: list[Any] = [None] * env.world_size
        dist.all_gather_object(per_rank, (peak_memory(), strategy.local_bytes(), held))
        full = _full_state(strategy)
        trip = args.reshard and round_trip(strategy, name, args.reshard, build,
                                           args.out / "reshard" / _slug(name), env)
        if env.is_main:
            save_file(full, args.out / f"{_slug(name)}.safetensors")
            (args.out / f"{_slug(name)}.json").write_text(json.dumps(
                {**trace, "peak_mem_bytes": max(p for p, _, _ in per_rank),
                 "state_bytes": [b for _, b, _ in per_rank],
                 "held_bytes": [h for _, _, h in per_rank],
                 **({"reshard": trip} if trip else {})}))
        dist.barrier()


def round_trip(strategy: Strategy, name: str, through: str,
               build: Callable[[str], Strategy], folder: Path, env: DistEnv
               ) -> dict[str, Any]:
    """The trained ``strategy``'s state saved as a checkpoint (DCP, as training saves it),
    loaded into a fresh ``through`` on the same ranks, saved again and loaded back into a
    fresh ``name``: both loads' whole parameters against the trained ones, and the round
    trip's optimizer state against the trained optimizer's (piece by piece: the same
    strategy holds the same pieces)."""
    trained = _full_state(strategy)
    via = _reload(build(through), _save(strategy, folder / "there", env))
    there = _full_state(via)
    back = _reload(build(name), _save(via, folder / "back", env))
    returned = _full_state(back)  # every rank takes part; rank 0 gets it
    params = max(param_diff(trained, there), param_diff(trained, returned)) \
        if env.is_main else 0.0
    optim = _optim_diff(strategy, back)  # an all-reduce: every rank has loaded
    if env.is_main:
        shutil.rmtree(folder, ignore_errors=True)
    return {"through": through, "max_rel_param_diff": params, "max_rel_optim_diff": optim}


def _save(strategy: Strategy, folder: Path, env: DistEnv) -> Path:
    return save_checkpoint(folder, 0, sharded=strategy.state_dict(), rank_state={},
                           extra=strategy.extra_state(), env=env, keep=1)


def _reload(strategy: Strategy, path: Path) -> Strategy:
    loaded = load_sharded(path, strategy.state_template())
    strategy.load_state_dict(loaded)
    if loaded["extra"] is not None:
        strategy.load_extra_state(loaded["extra"])
    return strategy


def _optim_diff(a: Strategy, b: Strategy) -> float:
    """Max relative difference of the optimizer state tensors this rank holds, over ranks."""
    sa, sb = a.state_dict()["optim"]["state"], b.state_dict()["optim"]["state"]
    worst = 0.0 if sa.keys() == sb.keys() else float("inf")
    for key, state in sa.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and key in sb:
                worst = max(worst, _rel(sb[key][k], v))
    t = torch.tensor(worst, dtype=torch.float64, device=a.env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _probe_held_bytes(strategy: Strategy, task: str) -> dict[str, dict[str, int]]:
    """What the rank holds (Strategy.held_bytes) at three moments of each of the first
    WARMUP_STEPS steps (the untimed ones): after forward (the loss is being computed:
    gathered parameters still held, no gradients yet), after backward (the gradients as the
    strategy keeps them, before the optimizer step updates or reshards anything) and after
    the step. The dict fills in as steps run; each moment keeps the largest total seen."""
    held: dict[str, dict[str, int]] = {}
    probed = [0]

    def record(moment: str) -> None:
        now = strategy.held_bytes()
        if sum(now.values()) >= sum(held.get(moment, {}).values()):
            held[moment] = now

    step_optimizer, train_step = strategy.step_optimizer, strategy.train_step

    def probed_step_optimizer() -> None:
        record("after_backward")
        step_optimizer()
        record("after_step")

    def probed_train_step(groups: Group, loss: Any) -> float:
        def probed_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            record("after_forward")
            return loss(out, y)
        out = train_step(groups, probed_loss)
        probed[0] += 1
        if probed[0] == WARMUP_STEPS:  # the timed steps run unprobed
            strategy.step_optimizer, strategy.train_step = step_optimizer, train_step
        return out

    strategy.step_optimizer = probed_step_optimizer  # type: ignore[method-assign]
    strategy.train_step = probed_train_step  # type: ignore[method-assign]
    return held


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distml.verify")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--candidate", required=True)
    p.add_argument("--strategies", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reshard")
    args = p.parse_args(argv)
    worker_main(lambda env: _worker(args, env))


if __name__ == "__main__":
    run_worker(main)
