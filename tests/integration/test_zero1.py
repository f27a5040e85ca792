"""zero1's flat sharding on two real processes (gloo): each rank holds half the optimizer
state to within padding, the training equals ddp's, and its state moves to and from the
per-parameter form a plain optimizer keeps (what checkpoints hold)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distml.config import TrainSettings
from distml.distributed.data_parallel import DDP, ZeRO1
from distml.distributed.runtime import DistEnv
from distml.models.mlp import MLP
from tests.helpers.net import free_port

WORLD = 2


def _model() -> MLP:
    torch.manual_seed(0)  # one matrix (200 x 300) outweighs the rest, as in the benchmark
    return MLP(in_features=7, num_outputs=3, hidden_sizes=[200, 300])


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, y)


def _batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 7, generator=g), torch.randn(16, 3, generator=g))
            for _ in range(steps)]


def _train(strategy, rank: int, steps: int) -> None:
    for batch in _batches(rank, steps):
        strategy.train_step([batch], _mse)


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        env = DistEnv(rank=rank, world_size=WORLD)
        settings = TrainSettings(lr=1e-2, grad_clip=1.0)
        zero, ddp = ZeRO1(_model(), settings, env), DDP(_model(), settings, env)
        _train(zero, rank, 3)
        _train(ddp, rank, 3)
        result = {"zero_bytes": zero.local_bytes(), "ddp_bytes": ddp.local_bytes(),
                  "param_diff": max(float((a - b).abs().max()) for a, b in zip(
                      zero.model.parameters(), ddp.model.parameters(), strict=True))}
        # Its state, in per-parameter form, is the plain optimizer's (ddp's) state.
        mine, plain = zero.state_dict()["optim"], ddp.state_dict()["optim"]
        result["same_names"] = mine["state"].keys() == plain["state"].keys()
        result["state_diff"] = max(
            float((mine["state"][n][k].float() - v.float()).abs().max())
            for n, s in plain["state"].items() for k, v in s.items())
        # A fresh zero1 loading ddp's state (a checkpoint from another strategy) goes on
        # exactly as ddp does.
        resumed = ZeRO1(_model(), settings, env)
        resumed.load_state_dict(ddp.state_dict())
        _train(resumed, rank, 2)
        _train(ddp, rank, 2)
        result["resumed_diff"] = max(float((a - b).abs().max()) for a, b in zip(
            resumed.model.parameters(), ddp.model.parameters(), strict=True))
        out[rank] = result
    finally:
        dist.destroy_process_group()


def test_zero1_halves_the_optimizer_state_evenly_and_trains_and_resumes_as_ddp():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    ddp_optim = out[0]["ddp_bytes"]["optimizer"]
    shares = [out[r]["zero_bytes"]["optimizer"] / ddp_optim for r in range(WORLD)]
    for share in shares:  # torch's ZeroRedundancyOptimizer: 0.92 / 0.08 on this model
        assert abs(share - 1 / WORLD) < 0.05 / WORLD, shares
    for r in range(WORLD):
        res = out[r]
        assert res["zero_bytes"]["params"] == res["ddp_bytes"]["params"]
        assert res["param_diff"] < 1e-6, res
        assert res["same_names"]
        assert res["state_diff"] < 1e-6, res
        assert res["resumed_diff"] < 1e-6, res
