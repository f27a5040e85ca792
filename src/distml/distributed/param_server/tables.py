"""A model's sparse embedding tables under ``strategy: parameter_server``: where the strategy,
the trainer and export meet the row servers of ``sparse``.

When the model is a ``ClickModel``, its bags never reach the flat parameter vector: every
rank swaps them for ``RemoteBag``s before the layout is cut (the dense part keeps the flat
path). Each server hosts a ``TableHost`` with its ``RowStore``s (its rows of every table,
``parallel.parameter_server.table_partition``); a worker's ``SparseClient`` fetches the rows
its batch touches and pushes their gradients; server 0 evaluates through a client that
peeks at the rows (its own stores directly, the others' over the channel) without creating
any. At export the servers send server 0 the rows they hold, and server 0 writes the whole
tables (untouched rows: their initial values, a pure function of seed, table and row id)
into the model's ``bags.<f>.weight``, so the artifact is a plain ``ClickModel``.
"""

from __future__ import annotations

import torch
from torch import nn

from distml.config import ParameterServerConfig
from distml.distributed.param_server.protocol import Channel, Kind, Msg
from distml.distributed.param_server.sparse import (
    RowPartition,
    RowStore,
    SparseClient,
    TableHost,
    channel_transport,
    init_rows,
)
from distml.models.click import ClickModel

_CHUNK = 1 << 16  # rows initialised at a time at export


class ModelTables:
    """The tables of ``model`` on the rank ``rank`` of a job with servers ``servers``."""

    def __init__(self, model: ClickModel, ps: ParameterServerConfig, *, rank: int,
                 servers: list[int], channel: Channel, lr: float) -> None:
        self.cardinalities, self.dim = list(model.cardinalities), model.dim
        self.seed = torch.initial_seed() % (1 << 63)  # every rank seeded alike
        self.servers, self.channel, self.rank = servers, channel, rank
        self.partitions = [RowPartition(c, len(servers), ps.table_partition)
                           for c in self.cardinalities]
        self.host: TableHost | None = None
        if rank in servers:
            stores = [RowStore(self.dim, table=t, seed=self.seed, scale=ps.table_init_scale,
                               optimizer=ps.table_optimizer, lr=ps.table_lr or lr)
                      for t in range(len(self.cardinalities))]
            self.host = TableHost(stores, channel)
        if rank in servers and rank != servers[0]:
            fetch, push = channel_transport(channel, servers, self.dim)  # never called
        elif rank == servers[0]:
            _, push = channel_transport(channel, servers, self.dim, peek=True)
            fetch = self._peek_fetch
        else:
            fetch, push = channel_transport(channel, servers, self.dim)
        self.client = SparseClient(model, self.partitions, fetch=fetch, push=push)

    def _peek_fetch(self, server: int, table: int, ids: torch.Tensor) -> torch.Tensor:
        if server == 0:
            assert self.host is not None
            with self.host.lock:
                return self.host.stores[table].peek(ids)
        peer = self.servers[server]
        self.channel.send(peer, Msg(Kind.ROWS, item=table, samples=len(ids), flag=1), ids)
        self.channel.recv(peer)
        return self.channel.recv_into(peer, torch.empty(len(ids), self.dim))

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.host.state_dict() if self.host is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.host is not None and state:
            self.host.load_state_dict(state)

    # -- export -----------------------------------------------------------------------------

    def gather(self) -> dict[str, torch.Tensor] | None:
        """Server 0: every table whole (``bags.<f>.weight``); the other servers send theirs
        rows; workers: nothing (None on every rank but server 0)."""
        if self.host is None:
            return None
        if self.rank != self.servers[0]:
            with self.host.lock:
                for store in self.host.stores:
                    self.channel.send(self.servers[0], Msg(Kind.OK, samples=len(store)),
                                      store.ids)
                    if len(store):
                        self.channel.send(self.servers[0], Msg(Kind.OK), store.values)
            return None
        tables = [self._initial(t) for t in range(len(self.cardinalities))]
        with self.host.lock:
            for t, store in enumerate(self.host.stores):
                tables[t][store.ids] = store.values
        for peer in self.servers[1:]:
            for t in range(len(self.cardinalities)):
                n = self.channel.recv(peer).samples
                ids = self.channel.recv_into(peer, torch.empty(n, dtype=torch.int64))
                if n:
                    self.channel.recv(peer)
                    tables[t][ids] = self.channel.recv_into(peer, torch.empty(n, self.dim))
        return {f"bags.{t}.weight": w for t, w in enumerate(tables)}

    def _initial(self, table: int) -> torch.Tensor:
        rows = self.cardinalities[table]
        out = torch.empty(rows, self.dim)
        for start in range(0, rows, _CHUNK):
            ids = torch.arange(start, min(start + _CHUNK, rows))
            out[start:start + len(ids)] = init_rows(ids, self.dim, seed=self.seed, table=table,
                                                    scale=self.host.stores[table].scale)
        return out


class Fetching(nn.Module):
    """A model whose tables' rows are fetched for each input before its forward pass (server
    0's evaluation of a sparse model, in the batches ``tasks.predict`` cuts)."""

    def __init__(self, model: nn.Module, client: SparseClient) -> None:
        super().__init__()
        self.inner, self.client = model, client

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.client.prepare(x)
        return self.inner(x)


def tables_of(model: nn.Module, ps: ParameterServerConfig, *, rank: int, servers: list[int],
              channel: Channel, lr: float) -> ModelTables | None:
    """The model's tables, taken off it (None if it has none)."""
    if not isinstance(model, ClickModel):
        return None
    return ModelTables(model, ps, rank=rank, servers=servers, channel=channel, lr=lr)
