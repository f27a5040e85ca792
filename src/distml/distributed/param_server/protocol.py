"""The messages between workers and servers, and their point-to-point ``Channel``.

Every exchange is a request and its reply between two ranks, in order, so one tag serves
them all. A message is a header (8 float64 numbers; integers below 2^53 are exact) and,
for some kinds, a payload whose size both sides know: a shard of parameters or gradients,
or a worker's statistics.

Workers and servers talk over TCP sockets (``sockets.SocketChannel``, which admits workers
that join mid-run); ``Channel`` here is the same interface over torch.distributed send/recv,
which the servers use among themselves and ``distml verify``'s lock step uses. Either goes
over CPU tensors, also when training on CUDA (a gloo group is made for it): both fail a send
or receive with an error when the peer's connection drops, and only that pair's, so a server
notices a dead worker at once and goes on with the others. NCCL would hang the communicator
instead.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

TAG = 71


class Kind(IntEnum):
    # worker -> server
    PULL = 1  # the server's shard (after the mode's gate: ssp's bound, sync's step)
    PUSH = 2  # a gradient for the shard; flag 1: reply with the shard too (a pull)
    IDLE = 3  # no work item for now: do not wait for my gradients
    TAKE = 4  # (server 0) report the finished item (or where its drops begin), take the
    #           next one; flag 1: block; flag 2: take none, I am leaving (scaled down)
    BYE = 5  # no more requests; flag 1: leaving a job that goes on (stop counting me)
    HELLO = 14  # a new connection: `item` is the worker's id (-1: give me one; server 0)
    ROWS = 8  # sparse tables: rows of table `item` (payload: `samples` int64 ids)
    PUSH_ROWS = 9  # sparse tables: their gradients (payload: the ids, then the rows)
    # server 0 -> another server
    PEEK = 6  # the shard, no gate (evaluation)
    SAVE = 7  # checkpoint your shard for step `version`
    # replies
    OK = 10
    ITEM = 11
    NONE = 12
    STOP = 13  # training is over (or you were declared dead): stop


@dataclass
class Msg:
    kind: int
    epoch: int = 0
    version: int = 0  # pulled version (push), wanted version (sync pull), server version
    item: int = -1  # the work item (take, item, push)
    # push: the batch's index in its item (to a sync follower: the leader's step count);
    # take: the first batch of the finished item not applied (-1: all were); item: the
    # first batch to do; pull reply: the ssp lead
    clock: int = 0
    loss: float = 0.0
    samples: int = 0  # push: the batch's rows; sync leader's reply: its step's count
    flag: int = 0

    def tensor(self) -> torch.Tensor:
        return torch.tensor([float(v) for v in astuple(self)], dtype=torch.float64)

    @classmethod
    def of(cls, t: torch.Tensor) -> Msg:
        v = t.tolist()
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), v[5], int(v[6]),
                   int(v[7]))


# A worker's statistics, sent with every TAKE: cumulative since it started.
STATS = ("items", "batches", "compute_s", "wait_s", "straggle_s", "redone_batches",
         "peak_mem_bytes")


class Channel:
    """Point-to-point messages on ``group`` (None: the default group); ranks are global."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def send(self, peer: int, msg: Msg, payload: torch.Tensor | None = None) -> None:
        dist.send(msg.tensor(), dst=peer, group=self.group, tag=TAG)
        if payload is not None:
            dist.send(payload.contiguous(), dst=peer, group=self.group, tag=TAG)

    def recv(self, peer: int) -> Msg:
        t = torch.empty(8, dtype=torch.float64)
        dist.recv(t, src=peer, group=self.group, tag=TAG)
        return Msg.of(t)

    def recv_into(self, peer: int, out: torch.Tensor) -> torch.Tensor:
        dist.recv(out, src=peer, group=self.group, tag=TAG)
        return out

    def close(self) -> None:
        """Nothing to close: the process group is the job's."""

    def request_all(self, peers: list[int], msgs: list[Msg],
                    payloads: list[torch.Tensor | None]) -> None:
        """Send one request to each peer at once (their transfers overlap)."""
        works, keep = [], []  # the tensors stay alive until their sends complete
        for peer, msg, payload in zip(peers, msgs, payloads, strict=True):
            for t in (msg.tensor(), None if payload is None else payload.contiguous()):
                if t is not None:
                    keep.append(t)
                    works.append(dist.isend(t, dst=peer, group=self.group, tag=TAG))
        for w in works:
            w.wait()
