"""Pieces of model parallelism that need no process group: stage balancing, layer lists,
tensor-parallel plans (a 3d stage's share), what activation checkpointing keeps for
backward, and what verify --reshard goes through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distml.distributed.mesh3d import stage_plan_entries
from distml.distributed.model_parallel import pipeline_layers, split_stages
from distml.distributed.strategy import checkpoint_blocks
from distml.errors import DistmlError
from distml.models.mlp import MLP
from distml.models.transformer import Transformer
from distml.verify import check_names


def test_split_stages_minimises_the_slowest_stage():
    assert split_stages([1, 1, 1, 1], 2) == [2, 2]
    assert split_stages([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert split_stages([1, 2, 3, 4, 5, 6], 3) == [3, 2, 1]  # 1+2+3 | 4+5 | 6: at most 9
    assert split_stages([3, 3], 2) == [1, 1]
    sizes = split_stages([float(i % 5 + 1) for i in range(20)], 4)
    assert sum(sizes) == 20
    assert min(sizes) >= 1


def test_pipeline_layers_compose_to_the_model():
    torch.manual_seed(0)
    for model, x in ((MLP(in_features=8, num_outputs=3, hidden_sizes=[16, 16]),
                      torch.randn(4, 8)),
                     (Transformer(context_length=8, num_layers=2, num_heads=2, dim=16),
                      torch.randint(0, 256, (2, 8)))):
        h = x
        for fn, _ in pipeline_layers(model):
            h = fn(h)
        torch.testing.assert_close(h, model(x))
        owned = [p for _, paths in pipeline_layers(model) for p in paths]
        assert len(owned) == len(set(owned))  # each module belongs to one layer


def test_tensor_plans_cover_the_pairs():
    mlp = MLP(in_features=8, num_outputs=3, hidden_sizes=[16, 16])
    assert {k: type(v).__name__ for k, v in mlp.tensor_plan().items()} == {
        "0": "ColwiseParallel", "2": "RowwiseParallel"}  # the last Linear stays whole
    gpt = Transformer(context_length=8, num_layers=1, num_heads=2, dim=16)
    assert {k: type(v).__name__ for k, v in gpt.tensor_plan().items()} == {
        "blocks.0.attn.q": "ColwiseParallel", "blocks.0.attn.k": "ColwiseParallel",
        "blocks.0.attn.v": "ColwiseParallel", "blocks.0.attn.out": "RowwiseParallel",
        "blocks.0.mlp.0": "ColwiseParallel", "blocks.0.mlp.2": "RowwiseParallel"}


def test_a_3d_stage_takes_the_tensor_plan_of_its_own_layers_only():
    gpt = Transformer(context_length=8, num_layers=3, num_heads=2, dim=16)
    stage_of = {"tok_emb": 0, "pos_emb": 0, "drop": 0, "blocks.0": 0, "blocks.1": 1,
                "blocks.2": 2, "norm": 2, "head": 2}
    mine = stage_plan_entries(gpt.tensor_plan(), stage_of, [1])
    assert sorted(mine) == [f"blocks.1.{m}" for m in
                            ("attn.k", "attn.out", "attn.q", "attn.v", "mlp.0", "mlp.2")]
    mlp = MLP(in_features=8, num_outputs=3, hidden_sizes=[16, 16])
    by_layer = {str(i): int(i) // 2 for i in range(len(mlp))}  # Linear + activation per stage
    assert sorted(stage_plan_entries(mlp.tensor_plan(), by_layer, [1])) == ["2"]
    assert stage_plan_entries(mlp.tensor_plan(), by_layer, [2]) == {}


def test_verify_reshards_only_through_strategies_whose_checkpoints_dcp_reshards():
    check_names(["3d"], "ddp")
    for bad in ("ps-sync", "single", "nope"):
        with pytest.raises(DistmlError, match=rf"--reshard '{bad}': not a strategy whose "
                                              r"checkpoints .* use one of ddp, zero1, .*3d"):
            check_names(["3d"], bad)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps from forward for backward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return total


def test_activation_checkpointing_keeps_less_and_computes_the_same():
    torch.manual_seed(0)
    plain = Transformer(context_length=64, num_layers=4, num_heads=4, dim=64)
    checkpointed = Transformer(context_length=64, num_layers=4, num_heads=4, dim=64)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_blocks(checkpointed)
    assert all("CheckpointWrapper" in type(b).__name__ for b in checkpointed.blocks)
    x = torch.randint(0, 256, (8, 64))
    full, less = _saved_bytes(plain, x), _saved_bytes(checkpointed, x)
    assert less < 0.5 * full
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
