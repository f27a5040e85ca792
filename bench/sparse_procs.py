"""The processes of the sparse parameter-server benchmark (and of its test): two servers
hosting a ClickModel's row stores (distml's ServerHost) and one worker training through
them over gloo, spawned by torch.multiprocessing; and the single-process reference."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distml.config import ParameterServerConfig
from distml.data.sources.clicks import click_rows
from distml.distributed.param_server.protocol import Channel, Kind, Msg
from distml.distributed.param_server.server import ServerHost, ShardServer
from distml.distributed.param_server.sparse import (
    RowPartition,
    RowStore,
    SparseClient,
    TableHost,
    channel_transport,
    init_rows,
)
from distml.models.click import ClickModel

SEED, SCALE, LR = 3, 0.05, 0.01


def free_port() -> int:
    """A loopback port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(channel: Channel, tables: TableHost) -> None:
    """A parameter server's threads (distml's ServerHost) serving the worker rank 2 the
    rows of ``tables``, until it says BYE (the dense shard is a placeholder here)."""
    shard = nn.Parameter(torch.zeros(1))
    server = ShardServer(shard, torch.optim.SGD([shard], lr=0.0),
                         ps=ParameterServerConfig(), workers=[2])
    # The worker talks over the process group (gloo), not a socket: a client from the start.
    host = ServerHost(server, channel, workers=[2], peer_clients=[2], coordinator=None,
                      save=lambda step: None, tables=tables)
    host.start()
    host.join()



# -- a table far larger than the worker's memory growth --------------------------------------

BIG = {"cards": [2_000_000, 1000], "dim": 16, "train": 20_000, "val": 5_000, "batch": 256,
       "epochs": 2, "seed": 11}


def click_data(start: int, stop: int, big: dict = BIG) -> tuple[torch.Tensor, torch.Tensor]:
    dense, ids, y = click_rows(big["seed"], start, stop, cardinalities=big["cards"])
    x = torch.cat([torch.from_numpy(dense), torch.from_numpy(ids).float()], dim=1)
    return x, torch.from_numpy(y)[:, None]


def big_stores(big: dict) -> list[RowStore]:
    return [RowStore(big["dim"], table=t, seed=SEED, scale=SCALE, optimizer="adam", lr=LR)
            for t in range(len(big["cards"]))]


def fit(model: ClickModel, opt: list, prepare, big: dict) -> float:
    """Both sides' loop: the same batches in the same order; its seconds."""
    x, y = click_data(0, big["train"], big)
    start = time.perf_counter()
    for _ in range(big["epochs"]):
        for b in range(0, len(x), big["batch"]):
            xb, yb = x[b:b + big["batch"]], y[b:b + big["batch"]]
            for o in opt:
                o.zero_grad()
            prepare(xb)
            nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward()
            for o in opt:
                o.step()
    return time.perf_counter() - start


def scores(model: ClickModel, prepare, big: dict) -> list[float]:
    x, _ = click_data(big["train"], big["train"] + big["val"], big)
    out = []
    with torch.no_grad():
        for b in range(0, len(x), big["batch"]):
            prepare(x[b:b + big["batch"]])
            out += torch.sigmoid(model(x[b:b + big["batch"]])).flatten().tolist()
    return out


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_big(rank: int, port: int, out: str, big: dict = BIG) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=3)
    channel = Channel()
    if rank < 2:
        host = TableHost(big_stores(big), channel)
        serve(channel, host)
        Path(out, f"server-{rank}.json").write_text(json.dumps(
            {"table_bytes": host.resident_bytes(), "rows": sum(map(len, host.stores)),
             "peak_rss": _rss("VmHWM")}))
    else:
        fetch, push = channel_transport(channel, [0, 1], big["dim"])
        torch.manual_seed(0)
        model = ClickModel(num_dense=4, cardinalities=big["cards"], dim=big["dim"],
                           hidden_sizes=[32, 16])
        client = SparseClient(model, [RowPartition(c, 2, "hash") for c in big["cards"]],
                              fetch=fetch, push=push)
        dense = torch.optim.Adam(model.top.parameters(), lr=LR)
        click_data(0, 10, big)  # warm the generator's code paths before the baseline
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        base = _rss("VmRSS")

        class Pusher:
            def zero_grad(self) -> None: ...
            def step(self) -> None:
                client.push()

        seconds = fit(model, [dense, Pusher()], client.prepare, big)
        growth = _rss("VmHWM") - base
        got = scores(model, client.prepare, big)
        for peer in (0, 1):
            channel.send(peer, Msg(Kind.BYE))
        Path(out, "worker.json").write_text(json.dumps(
            {"rss_growth": growth, "peak_rss": _rss("VmHWM"), "peak_rows": client.peak_rows,
             "train_s": seconds, "scores": got}))
    dist.destroy_process_group()


def single_process(big: dict = BIG) -> tuple[list[float], float]:
    """The reference: one process holding each table whole, nn.EmbeddingBag(sparse=True)
    with SparseAdam (lazy Adam), the same initial rows (by row id) and batches."""
    torch.manual_seed(0)
    model = ClickModel(num_dense=4, cardinalities=big["cards"], dim=big["dim"],
                       hidden_sizes=[32, 16])
    with torch.no_grad():
        for t, bag in enumerate(model.bags):
            for a in range(0, bag.num_embeddings, 200_000):
                ids = torch.arange(a, min(a + 200_000, bag.num_embeddings))
                bag.weight[a:a + len(ids)] = init_rows(ids, big["dim"], seed=SEED, table=t,
                                                       scale=SCALE)
    opt = [torch.optim.SparseAdam(model.bags.parameters(), lr=LR),
           torch.optim.Adam(model.top.parameters(), lr=LR)]
    seconds = fit(model, opt, lambda xb: None, big)
    return scores(model, lambda xb: None, big), seconds
