"""Claims README makes about training that need no second process: fp16's dynamic loss
scaling, fsdp offload on a CPU, checkpoints loading with weights_only, and checkpoints that
survive a process killed while writing."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy

from distml.config import TrainSettings
from distml.distributed.checkpoint import checkpoint_paths, load_sharded, read_rank_state
from distml.distributed.data_parallel import FSDP
from distml.distributed.runtime import DistEnv
from distml.distributed.strategy import Strategy
from distml.models.mlp import MLP

ROOT = Path(__file__).parents[2]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out.float(), y)


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    torch.manual_seed(0)
    settings = TrainSettings(precision="fp16", optimizer="sgd", lr=0.1, grad_clip=None)
    strategy = Strategy(MLP(in_features=4, num_outputs=1, hidden_sizes=[8]), settings,
                        DistEnv())
    assert strategy.scaler is not None
    scale = strategy.scaler.get_scale()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    before = [p.detach().clone() for p in strategy.model.parameters()]
    strategy.train_step([(x, y)], _mse)
    assert any(not torch.equal(a, p) for a, p in zip(before, strategy.model.parameters(),
                                                    strict=True))  # a normal step moved
    after_good = [p.detach().clone() for p in strategy.model.parameters()]
    # Targets this large overflow fp16's gradients (max 65504): the scaler skips the step
    # and halves its scale instead of writing inf into the weights.
    strategy.train_step([(x, torch.full((8, 1), 1e30))], _mse)
    assert all(torch.equal(a, p) for a, p in zip(after_good, strategy.model.parameters(),
                                                 strict=True))
    assert strategy.scaler.get_scale() == scale / 2


def test_fsdp_offload_on_a_cpu_says_there_is_nothing_to_offload(tmp_path, caplog):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        settings = TrainSettings(parallel={"strategy": "fsdp", "fsdp": {"offload": True}})
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data",))
        with caplog.at_level(logging.WARNING):
            strategy = FSDP(MLP(in_features=4, num_outputs=1, hidden_sizes=[8]), settings,
                            DistEnv(), mesh=mesh)
        assert "offload: training runs on the CPU" in caplog.text
        assert "nothing to offload" in caplog.text
        # The policy was left out: FSDP keeps no CPU offload policy, and a step trains.
        groups = [g for m in strategy.model.modules() if hasattr(m, "_get_fsdp_state")
                  if (g := m._get_fsdp_state()._fsdp_param_group) is not None]
        assert groups
        assert not any(isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups)
        before = [p.full_tensor().clone() for p in strategy.model.parameters()]
        torch.manual_seed(0)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        first = strategy.train_step([(x, y)], _mse)
        for _ in range(20):
            last = strategy.train_step([(x, y)], _mse)
        assert math.isfinite(first)
        assert last < first
        assert all(not torch.equal(a, p.full_tensor()) for a, p in
                   zip(before, strategy.model.parameters(), strict=True))
    finally:
        dist.destroy_process_group()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_state_loads_with_weights_only_and_refuses_pickled_code(tmp_path):
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    torch.save({"step": 1, "rng": torch.get_rng_state()}, ckpt / "rank-0.pt")
    assert read_rank_state(ckpt, DistEnv())["step"] == 1
    torch.save({"step": 1, "evil": _Payload()}, ckpt / "rank-0.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        read_rank_state(ckpt, DistEnv())
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(ckpt))
    torch.save({"optim": _Payload()}, ckpt / "extra.pt")  # a strategy's whole-saved state
    with pytest.raises(Exception, match="Weights only load failed"):
        load_sharded(ckpt, {"w": torch.zeros(2)})


_WRITER = """
import os, sys, time
from pathlib import Path
import torch
from distml.distributed import checkpoint
from distml.distributed.runtime import DistEnv

out = Path(sys.argv[1])
def save(step, value):
    checkpoint.save_checkpoint(out, step, sharded={"w": torch.full((4,), value)},
                               rank_state={"step": step}, extra=None, env=DistEnv(), keep=2)
save(1, 1.0)
# The second save is killed after writing everything, just before its rename: the worst
# moment for a checkpoint that is not atomic.
def stall(src, dst):
    print("writing", flush=True)
    time.sleep(600)
checkpoint.os.replace = stall
save(2, 2.0)
"""


def test_a_checkpoint_survives_a_sigkill_during_the_next_write(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert (tmp_path / ".step-00000002.tmp" / ".metadata").is_file()  # all but renamed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    (last,) = checkpoint_paths(tmp_path)  # the half-done one is not a checkpoint
    assert last.name == "step-00000001"
    state = load_sharded(last, {"w": torch.zeros(4)})
    assert torch.equal(state["w"], torch.full((4,), 1.0))
    assert read_rank_state(last, DistEnv())["step"] == 1
