"""The processes of the sparse-rows transport test (the 128 MB table's are the benchmark's,
``bench.sparse_procs``): two servers hosting row stores and one
worker training a ClickModel through them over gloo (spawned by torch.multiprocessing, so
this module, not the test, holds the process function)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from bench.sparse_procs import LR, SCALE, SEED, serve
from torch import nn

from distml.distributed.param_server.protocol import Channel, Kind, Msg
from distml.distributed.param_server.sparse import (
    RowPartition,
    RowStore,
    SparseClient,
    TableHost,
    channel_transport,
)
from distml.models.click import ClickModel

CARDS, DIM = [5000, 300], 8


def stores() -> list[RowStore]:
    return [RowStore(DIM, table=t, seed=SEED, scale=SCALE, optimizer="adam", lr=LR)
            for t in range(len(CARDS))]


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        dense = torch.randn(64, 3, generator=gen)
        ids = [(torch.rand(64, generator=gen) ** 3 * c).long() for c in CARDS]
        out.append(torch.cat([dense, *[i[:, None].float() for i in ids]], dim=1))
    return out


def train(fetch, push) -> tuple[ClickModel, SparseClient]:
    torch.manual_seed(0)
    model = ClickModel(num_dense=3, cardinalities=CARDS, dim=DIM, hidden_sizes=[16])
    client = SparseClient(model, [RowPartition(c, 2, "hash") for c in CARDS],
                          fetch=fetch, push=push)
    opt = torch.optim.Adam(model.top.parameters(), lr=LR)
    for x in batches(6):
        opt.zero_grad()
        client.prepare(x)
        nn.functional.binary_cross_entropy_with_logits(
            model(x), (x[:, 0] > 0).float()[:, None]).backward()
        opt.step()
        client.push()
    return model, client


def run(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=3)
    channel = Channel()
    if rank < 2:
        serve(channel, TableHost(stores(), channel))
    else:
        fetch, push = channel_transport(channel, [0, 1], DIM)
        _, client = train(fetch, push)
        local = [stores(), stores()]
        train(lambda s, t, ids: local[s][t].get(ids),
              lambda s, t, ids, g: local[s][t].apply(ids, g))
        diffs = []
        for s in range(2):
            for t in range(len(CARDS)):
                ids = local[s][t].ids
                diffs.append((fetch(s, t, ids) - local[s][t].get(ids)).abs().max().item())
        for peer in (0, 1):
            channel.send(peer, Msg(Kind.BYE))
        Path(out).write_text(json.dumps({"max_diff": max(diffs),
                                         "peak_rows": client.peak_rows}))
    dist.destroy_process_group()
