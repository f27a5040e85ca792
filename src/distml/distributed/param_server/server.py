"""A parameter server: its shard, its optimizer, the mode's rules, and one thread per client.

``ShardServer`` holds the state behind one condition variable; every request from a worker
is a method call here, from that worker's thread:

- ``async``: a gradient is applied as it arrives. Its staleness, the server's version at
  apply minus the version the worker pulled, is recorded.
- ``ssp``: as async, but a pull waits while the worker's clock (its pushes this epoch) is
  more than ``staleness`` ahead of the slowest working worker's (Ho et al. 2013). The lead
  it was granted is recorded with its gradient: it never exceeds the bound.
- ``sync``: a step averages the gradients pulled at the current version, and is applied when
  ``working workers - backup_workers`` of them have arrived; a gradient pulled at an older
  version arrives late and is dropped (Chen et al. 2016). A pull waits for the step after
  the worker's last push. Server 0 (the leader) alone decides who a step takes: a worker
  pushes to it first, and its reply, once the step is applied, says how many gradients
  the step averaged (0: this one was dropped). The worker then pushes to the other servers
  (followers) with that count, and a follower applies its step when that many arrived: every
  shard of a step averages the same workers' gradients. A dropped gradient is pushed to no
  follower; its worker hands its item back from that batch on (``WorkQueue.partial``).

A worker with no work item says IDLE and stops counting for ssp's slowest and sync's quorum
until it pushes again; a dead worker, or one that leaves (BYE with flag 1), stops counting
at once; one that joins counts from its first request, its clock level with the slowest's.
``ServerHost`` runs the threads: its listener admits each worker that connects (the job's
ranks, and workers that join later, given fresh ids by server 0); it receives each
request, calls the server (and, on server 0, the work-queue coordinator), sends the reply,
and reports a client whose connection failed as lost. A worker that stops renewing its
lease in the store (hung, not dead) for ``lease_s`` is lost the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distml.config import ParameterServerConfig
from distml.distributed.param_server.protocol import STATS, Kind, Msg
from distml.distributed.param_server.sockets import Listener, SocketChannel
from distml.distributed.param_server.sparse import TableHost
from distml.distributed.param_server.work import STOP, Coordinator

logger = logging.getLogger(__name__)


class ShardServer:
    def __init__(self, shard: nn.Parameter, optimizer: torch.optim.Optimizer, *,
                 ps: ParameterServerConfig, workers: list[int],
                 lr_at: Callable[[int], float] | None = None, limit: int | None = None,
                 version: int = 0, leader: bool = True) -> None:
        self.shard, self.optimizer, self.ps, self.leader = shard, optimizer, ps, leader
        self.lr_at, self.limit = lr_at, limit
        self.cond = threading.Condition()
        self.version, self.epoch = version, -1
        self.alive, self.idle = set(workers), set()
        self.clock = dict.fromkeys(workers, 0)
        self.lead: dict[int, int] = {}
        self.acc: torch.Tensor | None = None  # sync: the step's gradients, summed
        # sync: the step's (worker, loss, samples, item, batch); a follower's target count
        self.contributors: list[tuple[int, float, int, int, int]] = []
        self.target = 0
        self.step_size: dict[int, int] = {}  # sync leader: version -> gradients it averaged
        self.steps: list[tuple[int, ...]] = []  # sync: each step's workers
        self.applied: list[tuple[int, int, int]] = []  # (epoch, item, batch) per gradient
        # One row per applied gradient: (worker, its clock, ssp lead, staleness).
        self.updates: list[tuple[int, int, int, int]] = []
        self.losses: list[tuple[float, int, float]] = []  # per version: (loss, samples, time)
        self.dropped = 0
        self.stopped = limit is not None and version >= limit
        # Workers that joined mid-run: when, and when their first gradient was applied.
        self.joined_at: dict[int, float] = {}
        self.first_applied: dict[int, float] = {}

    # -- requests (each from its worker's thread) -------------------------------------------

    def pull(self, w: int, epoch: int, wanted: int = 0) -> tuple[Msg, torch.Tensor | None]:
        with self.cond:
            self._touch(w, epoch)
            self.cond.wait_for(lambda: self._gate_open(w, wanted))
            if w not in self.alive:
                return Msg(Kind.STOP), None
            self.lead[w] = self._lead(w)
            return (Msg(Kind.OK, version=self.version, clock=self.lead[w],
                        flag=int(self.stopped)), self.shard.detach().clone())

    def push(self, w: int, msg: Msg, grad: torch.Tensor) -> Msg:
        with self.cond:
            self._touch(w, msg.epoch)
            if w not in self.alive or self.stopped:
                return Msg(Kind.STOP, version=self.version)
            self.clock[w] += 1
            if self.ps.mode != "sync":
                self._apply(grad, [(w, msg.loss, msg.samples, msg.item, msg.clock)],
                            staleness=[(w, self.clock[w], self.lead.get(w, 0),
                                        self.version - msg.version)])
                self.cond.notify_all()
                return Msg(Kind.OK, version=self.version, flag=int(self.stopped))
            taken = self._contribute(w, msg, grad)
            self.cond.notify_all()
            if taken and self.leader:  # the count the followers wait for, once known
                self.cond.wait_for(lambda: self.version > msg.version or self.stopped
                                   or w not in self.alive)
            return Msg(Kind.OK, version=self.version, flag=int(self.stopped),
                       samples=self.step_size.get(msg.version, 0) if taken else 0)

    def set_idle(self, w: int, epoch: int) -> None:
        with self.cond:
            self._touch(w, epoch)
            self.idle.add(w)
            self._maybe_step()
            self.cond.notify_all()

    def join(self, w: int) -> None:
        """Count worker ``w`` from its first request on (standing by until then); its ssp
        clock starts level with the slowest working worker's, so it holds nobody back."""
        with self.cond:
            working = [self.clock[u] for u in self._working() if u in self.clock]
            self.clock[w] = min(working, default=0)
            self.joined_at[w] = time.monotonic()
            self.alive.add(w)
            self.idle.add(w)
            self.cond.notify_all()

    def lost(self, w: int) -> bool:
        """Stop counting worker ``w``; False if it was already lost."""
        with self.cond:
            if w not in self.alive:
                return False
            self.alive.discard(w)
            self.idle.discard(w)
            self._maybe_step(short=not self.leader)
            self.cond.notify_all()
            return True

    def snapshot(self) -> tuple[int, torch.Tensor]:
        with self.cond:
            return self.version, self.shard.detach().clone()

    # -- the rules ---------------------------------------------------------------------------

    def _touch(self, w: int, epoch: int) -> None:
        """A request of a new epoch starts it: every live worker works, clocks at zero.
        (Epochs are separated by a barrier, so nothing of the old one is still in flight.)"""
        if epoch > self.epoch:
            self.epoch, self.idle = epoch, set()
            self.clock = dict.fromkeys(self.alive, 0)
        self.idle.discard(w)

    def _working(self) -> set[int]:
        return self.alive - self.idle

    def _lead(self, w: int) -> int:
        """How far ``w`` is ahead of the slowest working worker."""
        return self.clock[w] - min(self.clock[u] for u in self._working() | {w})

    def _gate_open(self, w: int, wanted: int) -> bool:
        if self.stopped or w not in self.alive:
            return True
        if self.ps.mode == "sync":
            return self.version >= wanted
        if self.ps.mode == "ssp":
            return self._lead(w) <= self.ps.staleness
        return True

    def _contribute(self, w: int, msg: Msg, grad: torch.Tensor) -> bool:
        """sync: add a gradient to the step; False if it is late (dropped)."""
        if msg.version != self.version:  # pulled before the current step: late
            self.dropped += 1
            return False
        self.acc = grad.clone() if self.acc is None else self.acc.add_(grad)
        self.contributors.append((w, msg.loss, msg.samples, msg.item,
                                  msg.clock if self.leader else -1))
        if not self.leader:
            self.target = msg.clock  # a follower's push carries the leader's count
        self._maybe_step()
        return True

    def _maybe_step(self, *, short: bool = False) -> None:
        """sync: apply the step once the quorum of working workers has pushed (the leader),
        or as many as the leader's step took (a follower; ``short``: what it has)."""
        if self.ps.mode != "sync" or not self.contributors:
            return
        quorum = (max(1, len(self._working()) - self.ps.backup_workers) if self.leader
                  else self.target)
        n = len(self.contributors)
        if n < quorum and not short:
            return
        if n < quorum:
            logger.warning("server step %d averages %d of the %d gradients the leader's "
                           "took: a worker died between servers", self.version, n, quorum)
        self.step_size[self.version] = n
        self.step_size.pop(self.version - 16, None)  # a sync step's pushers read it at once
        self.steps.append(tuple(sorted(c[0] for c in self.contributors)))
        self._apply(self.acc.div_(n), self.contributors,
                    staleness=[(c[0], self.clock.get(c[0], 0), 0, 0)
                               for c in self.contributors])
        self.acc, self.contributors = None, []

    def _apply(self, grad: torch.Tensor, contributors: list[tuple[int, float, int, int, int]],
               *, staleness: list[tuple[int, int, int, int]]) -> None:
        self.shard.grad = grad
        if self.lr_at is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.version)
        self.optimizer.step()
        self.shard.grad = None
        samples = sum(c[2] for c in contributors)
        loss = sum(c[1] * c[2] for c in contributors) / max(samples, 1)
        self.applied.extend((self.epoch, c[3], c[4]) for c in contributors)
        for c in contributors:
            if c[0] in self.joined_at:
                self.first_applied.setdefault(c[0], time.monotonic())
        self.losses.append((loss, samples, time.perf_counter()))
        self.updates.extend(staleness)
        self.version += 1
        if self.limit is not None and self.version >= self.limit:
            self.stopped = True


class ServerHost:
    """The threads of one server: one per client (every worker, admitted by the listener
    when it connects, torchrun's ranks and workers that join later alike; and the
    ``peer_clients``, served over the process group from the start: on servers other than
    0, server 0, which evaluates and checkpoints), and a lease watch."""

    def __init__(self, server: ShardServer, channel: SocketChannel, *, workers: list[int],
                 peer_clients: list[int], coordinator: Coordinator | None,
                 save: Callable[[int], None], store: Any = None, key: str = "",
                 tables: TableHost | None = None, next_id: Callable[[], int] | None = None
                 ) -> None:
        self.server, self.channel, self.coordinator = server, channel, coordinator
        self.tables = tables  # sparse tables' rows, if the model has any
        self.workers, self.peer_clients = set(workers), peer_clients
        self.leased = list(workers)  # torchrun's ranks renew a lease in the store
        self.save, self.store, self.key = save, store, key
        self.next_id = next_id  # server 0: a fresh id for a worker that joins
        self.stats: dict[int, dict[str, float]] = {}  # worker -> its last reported stats
        self.lost_peer: str | None = None
        self.threads: dict[int, threading.Thread] = {}
        self._done = threading.Event()
        self.listener = Listener(channel, admit=self._admit, serve=self._start_client)

    @property
    def address(self) -> str:
        return self.listener.address

    def start(self) -> None:
        for c in self.peer_clients:
            self._start_client(c)
        self.listener.start()
        if self.store is not None:
            threading.Thread(target=self._watch_leases, daemon=True, name="ps-leases").start()

    def _start_client(self, c: int) -> None:
        self.threads[c] = threading.Thread(target=self._serve, args=(c,), daemon=True,
                                           name=f"ps-client-{c}")
        self.threads[c].start()

    def _admit(self, hello: Msg) -> tuple[int, Msg]:
        """A worker's HELLO: one of the job's ranks, or (id -1, on server 0) one joining,
        given the next id; on another server, a joiner with the id server 0 gave it."""
        wid = hello.item
        if wid < 0:
            if self.coordinator is None or self.next_id is None:
                return -1, Msg(Kind.STOP)
            wid = self.next_id()
            if not self.coordinator.join(wid):
                return wid, Msg(Kind.STOP)
            logger.info("worker %d joined the job", wid)
        if wid not in self.workers:
            self.workers.add(wid)
            self.server.join(wid)
        return wid, Msg(Kind.OK, item=wid, version=self.server.version)

    def join(self) -> None:
        """Wait for every live client to say BYE (dead or hung ones are not waited for),
        workers admitted meanwhile too; then stop listening."""
        while True:
            left = [t for c, t in list(self.threads.items())
                    if t.is_alive() and (c in self.server.alive or c not in self.workers)]
            if not left:
                break
            left[0].join(timeout=0.5)
        self._done.set()
        self.listener.close()
        self.channel.close()

    def lose(self, w: int, why: str) -> None:
        if self.server.lost(w):
            logger.warning("worker rank %d lost (%s); training goes on without it", w, why)
        if self.coordinator is not None:
            item = self.coordinator.lost(w)
            if item is not None:
                logger.warning("work item %d of worker rank %d re-queued", item, w)

    def _serve(self, client: int) -> None:
        while True:
            try:
                msg = self.channel.recv(client)
                if msg.kind == Kind.BYE:
                    if msg.flag and self.server.lost(client):  # scaled down: stop counting it
                        logger.info("worker %d left the job", client)
                    return
                self._answer(client, msg)
            except RuntimeError as e:  # gloo: the peer's connection dropped
                if client in self.workers:
                    self.lose(client, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                else:
                    self.lost_peer = f"server rank {client}: {e}"
                return

    def _answer(self, c: int, msg: Msg) -> None:
        s, ch = self.server, self.channel
        if msg.kind == Kind.PULL:
            ch.send(c, *s.pull(c, msg.epoch, msg.version))
        elif msg.kind == Kind.PUSH:
            grad = ch.recv_into(c, torch.empty_like(s.shard, device="cpu"))
            reply = s.push(c, msg, grad)
            if msg.flag and reply.kind == Kind.OK:
                wanted = msg.version + 1 if s.ps.mode == "sync" else 0
                answer, shard = s.pull(c, msg.epoch, wanted)
                answer.samples = reply.samples  # sync: the count of the step it joined
                ch.send(c, answer, shard)
            else:
                ch.send(c, reply)
        elif msg.kind in (Kind.ROWS, Kind.PUSH_ROWS) and self.tables is not None:
            lr_at = self.tables.lr_at or s.lr_at
            self.tables.answer(c, msg, lr_at(s.version) if lr_at else None)
        elif msg.kind == Kind.IDLE:
            s.set_idle(c, msg.epoch)
            ch.send(c, Msg(Kind.OK))
        elif msg.kind == Kind.TAKE:
            ch.send(c, self._take(c, msg))
        elif msg.kind == Kind.PEEK:
            version, shard = s.snapshot()
            ch.send(c, Msg(Kind.OK, version=version), shard)
        elif msg.kind == Kind.SAVE:
            self.save(msg.version)
            ch.send(c, Msg(Kind.OK))
        else:
            raise RuntimeError(f"unexpected message {msg}")

    def _take(self, c: int, msg: Msg) -> Msg:
        stats = self.channel.recv_into(c, torch.empty(len(STATS), dtype=torch.float64))
        self.stats[c] = dict(zip(STATS, stats.tolist(), strict=True))
        assert self.coordinator is not None, "TAKE goes to server 0"
        if self.server.stopped:  # max_steps reached: no more work for anyone
            self.coordinator.stop()
        if msg.flag == 2:  # leaving: its last item reported, nothing more for it
            self.coordinator.leave(c, None if msg.item < 0 else msg.item, undone=msg.clock)
            return Msg(Kind.STOP)
        kind, epoch, item = self.coordinator.take(c, None if msg.item < 0 else msg.item,
                                                  wait=bool(msg.flag), undone=msg.clock)
        if kind == STOP:
            return Msg(Kind.STOP)
        if item < 0:
            return Msg(Kind.NONE)
        return Msg(Kind.ITEM, epoch=epoch, item=item,
                   clock=self.coordinator.queue.resume.get(item, 0))

    def _watch_leases(self) -> None:
        """Workers add to their heartbeat key every second; one whose count has not moved
        for ``lease_s`` is declared dead (its item re-queued)."""
        lease = self.server.ps.lease_s
        seen = {w: (-1, time.monotonic()) for w in self.leased}
        while not self._done.wait(1.0):
            for w in [w for w in list(self.server.alive) if w in seen]:
                try:
                    count = self.store.add(f"{self.key}/hb/{w}", 0)
                except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                    return
                last, since = seen[w]
                if count != last:
                    seen[w] = (count, time.monotonic())
                elif time.monotonic() - since > lease:
                    self.lose(w, f"no heartbeat for {lease:g} s")
