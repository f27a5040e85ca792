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
from typing import Any

import torch
from torch import nn

from distml.distributed.param_server import keeper
from distml.distributed.param_server.layout import ShardLayout
from distml.distributed.param_server.protocol import STATS, Channel, Kind, Msg
from distml.distributed.param_server.work import ItemReader

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ServerLostError(RuntimeError):
    """A server stopped answering: the job cannot go on (it restarts from a checkpoint)."""


class Worker:
    def __init__(self, *, rank: int, model: nn.Module, layout: ShardLayout, channel: Channel,
                 servers: list[int], reader: ItemReader, loss_fn: LossFn, mode: str,
                 device: torch.device, autocast: Callable[[], Any], grad_clip: float | None,
                 peak_memory: Callable[[], int], store: Any = None, key: str = "") -> None:
        self.rank, self.model, self.layout, self.channel = rank, model, layout, channel
        self.servers, self.reader, self.loss_fn, self.mode = servers, reader, loss_fn, mode
        self.device, self.autocast, self.grad_clip = device, autocast, grad_clip
        self.peak_memory, self.store, self.key = peak_memory, store, key
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.flat = torch.empty(layout.numel, dtype=layout.dtype)
        self.pulled = [0] * len(servers)  # the version of each shard this worker holds
        self.wanted = [0] * len(servers)  # sync: the version the next pull must wait for
        self.stats = dict.fromkeys(STATS, 0.0)
        self.epoch = 0

    def run(self) -> dict[str, float]:
        keeper.mark("worker")
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        beat.start()
        try:
            self._loop()
            for s in self.servers:
                self.channel.send(s, Msg(Kind.BYE))
        except RuntimeError as e:
            keeper.mark("")  # not this worker's death: a server's, which stops the job
            raise ServerLostError(f"worker rank {self.rank} lost a server: {e}") from None
        finally:
            stop.set()
        keeper.mark("")
        return self.stats

    def _loop(self) -> None:
        done: int | None = None
        while True:
            reply = self._take(done, wait=False)
            done = None
            if reply.kind == Kind.NONE:  # the epoch's last items are elsewhere: stand by
                self._request_all([Msg(Kind.IDLE, epoch=self.epoch)] * len(self.servers))
                for s in self.servers:
                    self.channel.recv(s)
                reply = self._take(None, wait=True)
            if reply.kind == Kind.STOP:
                return
            self.epoch = reply.epoch
            if self._work(reply.epoch, reply.item):
                done = reply.item
                self.stats["items"] += 1

    def _take(self, done: int | None, *, wait: bool) -> Msg:
        self.stats["peak_mem_bytes"] = float(self.peak_memory())
        stats = torch.tensor([self.stats[k] for k in STATS], dtype=torch.float64)
        start = time.perf_counter()
        self.channel.send(self.servers[0], Msg(Kind.TAKE, item=-1 if done is None else done,
                                               flag=int(wait)), stats)
        reply = self.channel.recv(self.servers[0])
        self.stats["wait_s"] += time.perf_counter() - start
        return reply

    def _work(self, epoch: int, item: int) -> bool:
        """Process one item; False if the servers stopped training midway."""
        batches = self.reader.batches(epoch, item)
        if not self._pull(epoch):
            return False
        for i, (x, y) in enumerate(batches):
            start = time.perf_counter()
            grad, loss = self._gradient(x, y)
            compute = time.perf_counter() - start
            self.stats["compute_s"] += compute
            self.stats["straggle_s"] += self.after_gradient(compute)
            if not self._push(epoch, grad, loss, len(x), pull=i < len(batches) - 1):
                return False
            self.stats["batches"] += 1
        return True

    def after_gradient(self, compute: float) -> float:
        """Called after each batch's gradient (``compute``: the seconds it took), before
        the push; returns the seconds it held the worker up, reported as ``straggle_s``
        (what a slowed worker subclass injects). This worker adds none."""
        return 0.0

    def _gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        self.model.train()
        for p in self.params:
            p.grad = None
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.grad_clip is not None:  # per gradient, on the whole model
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        return self.layout.flatten([p.grad for p in self.params]), float(loss.item())

    def _pull(self, epoch: int) -> bool:
        start = time.perf_counter()
        self._request_all([Msg(Kind.PULL, epoch=epoch, version=v) for v in self.wanted])
        ok = self._receive_shards()
        self.stats["wait_s"] += time.perf_counter() - start
        return ok

    def _push(self, epoch: int, grad: torch.Tensor, loss: float, samples: int, *,
              pull: bool) -> bool:
        start = time.perf_counter()
        msgs = [Msg(Kind.PUSH, epoch=epoch, version=v, loss=loss, samples=samples,
                    flag=int(pull)) for v in self.pulled]
        self._request_all(msgs, self.layout.split(grad))
        if pull:
            ok = self._receive_shards()
        else:
            replies = [self.channel.recv(s) for s in self.servers]
            ok = all(r.kind == Kind.OK and not r.flag for r in replies)
            self.wanted = [v + 1 if self.mode == "sync" else 0 for v in self.pulled]
        self.stats["wait_s"] += time.perf_counter() - start
        return ok

    def _receive_shards(self) -> bool:
        ok = True
        for i, (s, part) in enumerate(zip(self.servers, self.layout.split(self.flat),
                                          strict=True)):
            reply = self.channel.recv(s)
            if reply.kind != Kind.OK:
                ok = False
                continue
            self.channel.recv_into(s, part)
            self.pulled[i] = self.wanted[i] = reply.version
            ok = ok and not reply.flag
        if ok:
            self.layout.copy_into(self.flat, self.params)
        return ok

    def _request_all(self, msgs: list[Msg], payloads: list[torch.Tensor] | None = None
                     ) -> None:
        self.channel.request_all(self.servers, msgs, payloads or [None] * len(msgs))

    def _heartbeat(self, stop: threading.Event) -> None:
        while self.store is not None and not stop.is_set():
            try:
                self.store.add(f"{self.key}/hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            stop.wait(1.0)
