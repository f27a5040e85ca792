"""A worker: take a work item from the coordinator (server 0), and for each of its batches
pull the parameters, compute the gradient, push it to the servers; repeat until told to
stop. Workers hold no optimizer state.

The pull of the next batch rides on the push of this one (one round trip per batch per
server); the last push of an item asks for no parameters, and the next item starts with
its own pull. A heartbeat thread renews the worker's lease in the job's store.

``after_gradient`` is the seam for a subclass named by ``parallel.parameter_server.worker``:
the tests and the benchmark slow one worker down with it (a persistent straggler).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from distml.distributed.param_server import keeper
from distml.distributed.param_server.layout import ShardLayout
from distml.distributed.param_server.protocol import STATS, Channel, Kind, Msg
from distml.distributed.param_server.sparse import SparseClient
from distml.distributed.param_server.work import ItemReader

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ServerLostError(RuntimeError):
    """A server stopped answering: the job cannot go on (it restarts from a checkpoint)."""


class Worker:
    def __init__(self, *, rank: int, model: nn.Module, layout: ShardLayout, channel: Channel,
                 servers: list[int], reader: ItemReader, loss_fn: LossFn, mode: str,
                 device: torch.device, autocast: Callable[[], Any], grad_clip: float | None,
                 peak_memory: Callable[[], int], store: Any = None, key: str = "",
                 tables: SparseClient | None = None) -> None:
        self.rank, self.model, self.layout, self.channel = rank, model, layout, channel
        self.servers, self.reader, self.loss_fn, self.mode = servers, reader, loss_fn, mode
        self.device, self.autocast, self.grad_clip = device, autocast, grad_clip
        self.peak_memory, self.store, self.key = peak_memory, store, key
        self.tables = tables  # the model's sparse tables' rows, on the row servers
        self.step_size = 1  # sync: how many gradients the last step taken averaged
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.flat = torch.empty(layout.numel, dtype=layout.dtype)
        self.pulled = [0] * len(servers)  # the version of each shard this worker holds
        self.wanted = [0] * len(servers)  # sync: the version the next pull must wait for
        self.stats = dict.fromkeys(STATS, 0.0)
        self.epoch = 0
        # Set (e.g. on SIGTERM): finish the current item, report it, leave the job (BYE
        # with flag 1: the servers stop counting this worker; the job goes on).
        self.leaving = threading.Event()
        self.left = False  # it did leave (the job was not over yet)

    def run(self) -> dict[str, float]:
        keeper.mark("worker")
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        beat.start()
        try:
            self._loop()
            for s in self.servers:
                self.channel.send(s, Msg(Kind.BYE, flag=int(self.left)))
        except RuntimeError as e:
            keeper.mark("")  # not this worker's death: a server's, which stops the job
            raise ServerLostError(f"worker rank {self.rank} lost a server: {e}") from None
        finally:
            stop.set()
        keeper.mark("")
        return self.stats

    def _loop(self) -> None:
        done: int | None = None
        undone = -1
        while True:
            leave = self.leaving.is_set()
            reply = self._take(done, undone, wait=False, leave=leave)
            self.left = leave
            done = None
            if reply.kind == Kind.NONE:  # the epoch's last items are elsewhere: stand by
                self._request_all([Msg(Kind.IDLE, epoch=self.epoch)] * len(self.servers))
                for s in self.servers:
                    self.channel.recv(s)
                reply = self._take(None, -1, wait=True)
            if reply.kind == Kind.STOP:
                return
            self.epoch = reply.epoch
            undone = self._work(reply.epoch, reply.item, reply.clock)
            if undone is not None:
                done = reply.item
                self.stats["items"] += undone < 0

    def _take(self, done: int | None, undone: int, *, wait: bool, leave: bool = False
              ) -> Msg:
        self.stats["peak_mem_bytes"] = float(self.peak_memory())
        stats = torch.tensor([self.stats[k] for k in STATS], dtype=torch.float64)
        start = time.perf_counter()
        self.channel.send(self.servers[0], Msg(Kind.TAKE, item=-1 if done is None else done,
                                               clock=undone, flag=2 if leave else int(wait)),
                          stats)
        reply = self.channel.recv(self.servers[0])
        self.stats["wait_s"] += time.perf_counter() - start
        return reply

    def _work(self, epoch: int, item: int, first: int) -> int | None:
        """Process one item from its batch ``first``: -1 when all its gradients were
        applied, the index of the first dropped one (sync: the rest is handed back), or
        None if the servers stopped training midway."""
        batches = self.reader.batches(epoch, item)
        if not self._pull(epoch):
            return None
        for i in range(first, len(batches)):
            x, y = batches[i]
            start = time.perf_counter()
            grad, loss = self._gradient(x, y)
            compute = time.perf_counter() - start
            self.stats["compute_s"] += compute
            self.stats["straggle_s"] += self.after_gradient(compute)
            last = i == len(batches) - 1
            head = Msg(Kind.PUSH, epoch=epoch, item=item, clock=i, loss=loss, samples=len(x))
            ok, taken = (self._push_sync(head, grad, pull=not last) if self.mode == "sync"
                         else (self._push(head, grad, pull=not last), True))
            if taken and self.tables is not None:  # the rows' gradients follow the dense one
                self.tables.push(1.0 / max(self.step_size, 1))
            if not ok:
                return None
            if not taken:
                return i
            self.stats["batches"] += 1
        return -1

    def after_gradient(self, compute: float) -> float:
        """Called after each batch's gradient (``compute``: the seconds it took), before
        the push; returns the seconds it held the worker up, reported as ``straggle_s``
        (what a slowed worker subclass injects). This worker adds none."""
        return 0.0

    def _gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        self.model.train()
        for p in self.params:
            p.grad = None
        if self.tables is not None:
            self.tables.prepare(x)  # the rows this batch touches, from their servers
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.grad_clip is not None:  # per gradient, on the whole model
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        return self.layout.flatten([p.grad for p in self.params]), float(loss.item())

    def _pull(self, epoch: int) -> bool:
        start = time.perf_counter()
        if self.mode == "sync":  # the leader's step first, then the followers' at least as new
            self._request_all([Msg(Kind.PULL, epoch=epoch, version=self.wanted[0])], None,
                              self.servers[:1])
            lead = self.channel.recv(self.servers[0])
            ok = lead.kind == Kind.OK
            if ok:
                self.channel.recv_into(self.servers[0], self.layout.split(self.flat)[0])
                self.pulled[0] = self.wanted[0] = lead.version
                self._request_all([Msg(Kind.PULL, epoch=epoch, version=lead.version)]
                                  * (len(self.servers) - 1), None, self.servers[1:])
                ok = self._receive_shards(first=1) and not lead.flag
        else:
            self._request_all([Msg(Kind.PULL, epoch=epoch, version=v) for v in self.wanted])
            ok = self._receive_shards()
        self.stats["wait_s"] += time.perf_counter() - start
        return ok

    def _push(self, head: Msg, grad: torch.Tensor, *, pull: bool) -> bool:
        """async, ssp: the gradient to every server at once (and their shards back)."""
        start = time.perf_counter()
        msgs = [replace(head, version=v, flag=int(pull)) for v in self.pulled]
        self._request_all(msgs, self.layout.split(grad))
        if pull:
            ok = self._receive_shards()
        else:
            replies = [self.channel.recv(s) for s in self.servers]
            ok = all(r.kind == Kind.OK and not r.flag for r in replies)
            self.wanted = [0] * len(self.servers)
        self.stats["wait_s"] += time.perf_counter() - start
        return ok

    def _push_sync(self, head: Msg, grad: torch.Tensor, *, pull: bool) -> tuple[bool, bool]:
        """sync: the gradient to the leader first; if its step took it, to the followers
        with the step's count (so every shard averages the same workers' gradients); then
        the shards of the next step (the followers' as recent as the leader's). (ok, taken)."""
        start = time.perf_counter()
        parts, followers = self.layout.split(grad), self.servers[1:]
        self.channel.send(self.servers[0],
                          replace(head, version=self.pulled[0], flag=int(pull)), parts[0])
        lead = self.channel.recv(self.servers[0])
        answered = lead.kind == Kind.OK
        taken, ok = answered and lead.samples > 0, answered and not lead.flag
        self.step_size = lead.samples if taken else 1
        if answered and pull:
            self.channel.recv_into(self.servers[0], self.layout.split(self.flat)[0])
            self.pulled[0] = self.wanted[0] = lead.version
        if taken:
            self._request_all([replace(head, version=v, clock=lead.samples, flag=int(pull))
                               for v in self.pulled[1:]], parts[1:], followers)
        elif answered and pull:
            self._request_all([Msg(Kind.PULL, epoch=head.epoch, version=lead.version)]
                              * len(followers), None, followers)
        if answered and pull:
            ok = self._receive_shards(first=1) and ok
        elif taken:
            ok = all([r.kind == Kind.OK and not r.flag
                      for r in (self.channel.recv(s) for s in followers)]) and ok
        if not pull:
            self.wanted = [max(lead.version, self.pulled[0] + 1)] * len(self.servers)
        self.stats["wait_s"] += time.perf_counter() - start
        return ok, taken

    def _receive_shards(self, first: int = 0) -> bool:
        """The replies of servers ``first``.. to a pull: their shards into the model."""
        ok = True
        parts = self.layout.split(self.flat)
        for i in range(first, len(self.servers)):
            s = self.servers[i]
            reply = self.channel.recv(s)
            if reply.kind != Kind.OK:
                ok = False
                continue
            self.channel.recv_into(s, parts[i])
            self.pulled[i] = self.wanted[i] = reply.version
            ok = ok and not reply.flag
        if ok:
            self.layout.copy_into(self.flat, self.params)
        return ok

    def _request_all(self, msgs: list[Msg], payloads: list[torch.Tensor] | None = None,
                     servers: list[int] | None = None) -> None:
        self.channel.request_all(self.servers if servers is None else servers, msgs,
                                 payloads or [None] * len(msgs))

    def _heartbeat(self, stop: threading.Event) -> None:
        while self.store is not None and not stop.is_set():
            keeper.beat()
            try:
                self.store.add(f"{self.key}/hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            stop.wait(1.0)
