"""Sharded sparse embedding tables: rows spread over the servers, created when first touched.

A table of ``num_rows`` x ``dim`` is never materialised whole outside export: each server
holds a ``RowStore`` with the rows of its part (``RowPartition``: by hash, row mod servers,
or by contiguous ranges) that some batch has touched. A row is created on first touch with
values that depend only on (seed, table, row id) (``init_rows``, a counter-based hash): any
server, a restarted one, or the single-process reference gets the same initial row without
storing it. A worker asks for the rows its batch touches and sends back their gradients
(one per distinct row, summed); the store applies a row-wise sparse optimizer:

- ``adagrad``: row-wise Adagrad (one accumulator per row, the mean of the squared gradient,
  as FBGEMM's rowwise Adagrad): ``acc += mean(g^2)``, ``row -= lr * g / (sqrt(acc) + eps)``.
- ``adam``: lazy Adam with torch.optim.SparseAdam's rule: only the touched rows' moments
  move, and the bias correction uses the store's step count (one step per push it applies,
  as SparseAdam's per-tensor step), so on one store it is SparseAdam exactly.

``state_dict`` gives the rows held (ids, values, optimizer state) as tensors for
torch.distributed.checkpoint; ``load_state_dict`` takes them back (a restarted server).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from distml.distributed.param_server.protocol import Channel, Kind, Msg
from distml.models.click import ClickModel

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK


def init_rows(ids: torch.Tensor, dim: int, *, seed: int, table: int, scale: float
              ) -> torch.Tensor:
    """Rows ``ids`` of table ``table``: uniform in [-scale, scale), a pure function of (seed,
    table, row id, column)."""
    rows = ids.numpy().astype(np.uint64)[:, None]
    cols = np.arange(dim, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        key = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
               + np.uint64(table) * np.uint64(0xD1B54A32D192ED03))
        z = _mix(_mix(rows + key) + cols * np.uint64(0x9E3779B97F4A7C15))
    unit = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # [0, 1), 24 bits
    return torch.from_numpy(((2.0 * unit - 1.0) * scale).astype(np.float32))


@dataclass(frozen=True)
class RowPartition:
    """Which server holds which row: ``hash`` (row mod servers) or ``range`` (contiguous)."""

    num_rows: int
    num_servers: int
    how: Literal["hash", "range"] = "hash"

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "hash":
            return ids % self.num_servers
        per = -(-self.num_rows // self.num_servers)
        return ids // per

    def split(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The positions in ``ids`` of each server's rows."""
        owner = self.owner(ids)
        return [torch.nonzero(owner == s).flatten() for s in range(self.num_servers)]


class RowStore:
    """One server's rows of one table, and their optimizer state (module docstring)."""

    def __init__(self, dim: int, *, table: int, seed: int, scale: float,
                 optimizer: Literal["adagrad", "adam"] = "adagrad", lr: float = 0.01,
                 eps: float | None = None, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.dim, self.table, self.seed, self.scale = dim, table, seed, scale
        self.optimizer, self.lr, self.betas = optimizer, lr, betas
        self.eps = eps if eps is not None else (1e-10 if optimizer == "adagrad" else 1e-8)
        self.slot: dict[int, int] = {}
        self.ids = torch.empty(0, dtype=torch.int64)
        self.values = torch.empty(0, dim)
        width = 1 if optimizer == "adagrad" else 2 * dim
        self.state = torch.empty(0, width)  # adagrad: acc; adam: m then v
        self.steps = 0

    def __len__(self) -> int:
        return len(self.slot)

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.ids, self.values, self.state))

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """The slots of rows ``ids``, creating the missing ones."""
        new = [i for i in dict.fromkeys(ids.tolist()) if i not in self.slot]
        if new:
            self._grow(torch.tensor(new, dtype=torch.int64))
        return torch.tensor([self.slot[i] for i in ids.tolist()], dtype=torch.int64)

    def _grow(self, new: torch.Tensor) -> None:
        start = len(self.slot)
        for k, i in enumerate(new.tolist()):
            self.slot[i] = start + k
        self.ids = torch.cat([self.ids, new])
        self.values = torch.cat([self.values, init_rows(new, self.dim, seed=self.seed,
                                                        table=self.table, scale=self.scale)])
        self.state = torch.cat([self.state, torch.zeros(len(new), self.state.shape[1])])

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        slots = self.slots(ids)  # first: it may grow ``values``
        return self.values[slots]

    def peek(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` as they are, creating none (an untouched row: its initial values)."""
        out = init_rows(ids, self.dim, seed=self.seed, table=self.table, scale=self.scale)
        held = [k for k, i in enumerate(ids.tolist()) if i in self.slot]
        if held:
            pos = torch.tensor(held, dtype=torch.int64)
            out[pos] = self.values[torch.tensor([self.slot[i] for i in ids[pos].tolist()])]
        return out

    def apply(self, ids: torch.Tensor, grads: torch.Tensor, lr: float | None = None) -> None:
        """One step on rows ``ids`` (distinct) with their summed gradients."""
        lr = self.lr if lr is None else lr
        self.steps += 1
        if len(ids) == 0:
            return
        s = self.slots(ids)
        w, st = self.values[s], self.state[s]
        if self.optimizer == "adagrad":
            acc = st[:, :1] + grads.pow(2).mean(dim=1, keepdim=True)
            w = w - lr * grads / (acc.sqrt() + self.eps)
            st = acc
        else:
            b1, b2 = self.betas
            m = st[:, :self.dim].mul(b1).add_(grads, alpha=1 - b1)
            v = st[:, self.dim:].mul(b2).addcmul_(grads, grads, value=1 - b2)
            bias1, bias2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
            w = w - (lr * bias2 ** 0.5 / bias1) * m / (v.sqrt() + self.eps)  # SparseAdam's
            st = torch.cat([m, v], dim=1)
        self.values[s], self.state[s] = w, st

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids.clone(), "values": self.values.clone(),
                "state": self.state.clone(), "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ids = state["ids"].clone()
        self.values, self.state = state["values"].clone(), state["state"].clone()
        self.steps = int(state["steps"])
        self.slot = {i: k for k, i in enumerate(self.ids.tolist())}


class RemoteBag(nn.Module):
    """A table's bag on a worker: only the rows of the current batch (``load``), as a leaf
    tensor whose gradient is what the worker pushes."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.dim, self.mode = dim, mode
        self.rows: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def load(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        self.index, self.rows = index, rows.requires_grad_(True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.rows is None or self.index is None or self.index.shape != ids.shape:
            raise RuntimeError("RemoteBag: load the batch's rows before the forward pass")
        return functional.embedding_bag(self.index, self.rows, mode=self.mode)


Fetch = Callable[[int, int, torch.Tensor], torch.Tensor]  # (server, table, ids) -> rows
Push = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (server, table, ids, grads)


class SparseClient:
    """A worker's side of the sharded tables of a ``ClickModel``: its bags replaced by
    ``RemoteBag``s; ``prepare`` fetches the rows a batch touches (each distinct row once,
    from its server), ``push`` sends their summed gradients back. ``fetch`` and ``push`` are
    the transport (messages to the servers; direct calls in one process)."""

    def __init__(self, model: ClickModel, partitions: list[RowPartition], *, fetch: Fetch,
                 push: Push) -> None:
        self.model, self.partitions, self.fetch, self.send = model, partitions, fetch, push
        mode = model.bags[0].mode if len(model.bags) else "mean"
        model.bags = nn.ModuleList(RemoteBag(model.dim, mode) for _ in model.cardinalities)
        self.touched: list[torch.Tensor] = []
        self.peak_rows = 0

    def prepare(self, x: torch.Tensor) -> None:
        ids = self.model.ids(x)
        self.touched = []
        for f, (bag, part) in enumerate(zip(self.model.bags, self.partitions, strict=True)):
            uniq, inverse = torch.unique(ids[:, f], return_inverse=True)
            if len(uniq) and not 0 <= uniq[0] <= uniq[-1] < part.num_rows:
                raise ValueError(
                    f"click model: categorical column {f} holds ids {uniq[0]}..{uniq[-1]}, "
                    f"outside its table's [0, {part.num_rows}); make the hash transform's "
                    f"buckets the model's cardinalities")
            rows = torch.empty(len(uniq), self.model.dim)
            for server, pos in enumerate(part.split(uniq)):
                if len(pos):
                    rows[pos] = self.fetch(server, f, uniq[pos])
            bag.load(inverse.view(-1, 1), rows)
            self.touched.append(uniq)
        self.peak_rows = max(self.peak_rows, sum(len(u) for u in self.touched))

    def push(self, scale: float = 1.0) -> None:
        """The rows' gradients (times ``scale``: sync averages a step's workers)."""
        for f, (bag, part) in enumerate(zip(self.model.bags, self.partitions, strict=True)):
            uniq, grad = self.touched[f], bag.rows.grad
            if grad is None:
                grad = torch.zeros(len(uniq), self.model.dim)
            elif scale != 1.0:
                grad = grad * scale
            for server, pos in enumerate(part.split(uniq)):
                self.send(server, f, uniq[pos], grad[pos])


# -- over the wire (protocol's ROWS and PUSH_ROWS) -------------------------------------------


def channel_transport(channel: Channel, servers: list[int], dim: int, *, peek: bool = False
                      ) -> tuple[Fetch, Push]:
    """A worker's ``fetch`` and ``push`` to the servers (ranks ``servers``, by index);
    ``peek``: fetch rows without creating them (evaluation)."""

    def fetch(server: int, table: int, ids: torch.Tensor) -> torch.Tensor:
        peer = servers[server]
        channel.send(peer, Msg(Kind.ROWS, item=table, samples=len(ids), flag=int(peek)), ids)
        channel.recv(peer)
        return channel.recv_into(peer, torch.empty(len(ids), dim))

    def push(server: int, table: int, ids: torch.Tensor, grads: torch.Tensor) -> None:
        peer = servers[server]
        channel.send(peer, Msg(Kind.PUSH_ROWS, item=table, samples=len(ids)),
                     ids if len(ids) else None)  # none: a step all the same (adam's count)
        if len(ids):
            channel.send(peer, Msg(Kind.OK), grads.contiguous())
        channel.recv(peer)

    return fetch, push


class TableHost:
    """A server's row stores, answering ROWS and PUSH_ROWS from its client threads (one lock:
    a push's rows are updated together)."""

    def __init__(self, stores: list[RowStore], channel: Channel) -> None:
        self.stores, self.channel = stores, channel
        self.lock = threading.Lock()
        self.lr_at: Callable[[int], float] | None = None  # the rows' lr at a server version

    def answer(self, client: int, msg: Msg, lr: float | None = None) -> None:
        ch, store = self.channel, self.stores[msg.item]
        ids = torch.empty(msg.samples, dtype=torch.int64)
        if msg.samples:
            ch.recv_into(client, ids)
        if msg.kind == Kind.ROWS:
            with self.lock:
                rows = store.peek(ids) if msg.flag else store.get(ids)
            ch.send(client, Msg(Kind.OK), rows)
            return
        grads = torch.empty(len(ids), store.dim)
        if len(ids):
            ch.recv(client)
            ch.recv_into(client, grads)
        with self.lock:
            store.apply(ids, grads, lr)
        ch.send(client, Msg(Kind.OK))

    def resident_bytes(self) -> int:
        return sum(s.nbytes() for s in self.stores)

    def state_dict(self, prefix: str = "tables/") -> dict[str, torch.Tensor]:
        """Every store's state, flat (``tables/<table>/<name>``), for the server's DCP
        checkpoint (``checkpoint.load_rows`` reads it back)."""
        with self.lock:
            return {f"{prefix}{t}/{k}": v for t, store in enumerate(self.stores)
                    for k, v in store.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "tables/"
                        ) -> None:
        with self.lock:
            for t, store in enumerate(self.stores):
                store.load_state_dict({k: state[f"{prefix}{t}/{k}"]
                                       for k in ("ids", "values", "state", "steps")})
