"""The training loop of ``strategy: parameter_server``: servers serve, workers work, and
server 0 coordinates: it opens each epoch's work queue, follows the updates as they are
applied (the callbacks' steps), evaluates, and at the end of each epoch (every item done,
every worker standing by: nothing in flight) evaluates and checkpoints.

It has the Trainer's constructor and ``fit``; a step is one update of server 0's shard (in
async and ssp one worker's gradient, in sync one averaged step). ``elapsed_s`` in each
evaluation is the training wall time so far, without the pauses for end-of-epoch
evaluation and checkpoints.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from distml.config import TrainSettings
from distml.data.loader import PartitionLoader
from distml.distributed.param_server import checkpoint as ckpt
from distml.distributed.param_server.protocol import Kind, Msg
from distml.distributed.param_server.server import ServerHost, ShardServer
from distml.distributed.param_server.sockets import connect
from distml.distributed.param_server.strategy import ParameterServer
from distml.distributed.param_server.work import Coordinator, ItemReader, WorkQueue
from distml.distributed.param_server.worker import Worker
from distml.distributed.runtime import job_store
from distml.fsutil import write_json_atomic
from distml.imports import load_object
from distml.rundir import CandidateDir
from distml.tasks import loss_fn
from distml.training.best import BestSoFar
from distml.training.callbacks import Callback
from distml.training.ps_report import epoch_stats, ps_summary
from distml.training.telemetry.system import SystemSampler
from distml.training.trainer import TrainState, lr_lambda, peak_memory

logger = logging.getLogger(__name__)

_FITS = itertools.count()  # the same sequence on every rank: a store namespace per fit


def _digest(steps: list[tuple[int, ...]]) -> str:
    """What a sync server's steps took (each step's workers), in a few bytes."""
    return hashlib.sha256(repr(steps).encode()).hexdigest()


class PSTrainer:
    def __init__(self, strategy: ParameterServer, settings: TrainSettings, *, task: str,
                 train_loader: PartitionLoader, val_data: tuple[torch.Tensor, torch.Tensor],
                 metric: str, checkpoint_dir: Path, callbacks: Sequence[Callback] = (),
                 system: SystemSampler | None = None) -> None:
        self.strategy, self.settings, self.env = strategy, settings, strategy.env
        self.ps = settings.parallel.parameter_server
        self.task, self.val_data, self.metric = task, val_data, metric
        self.checkpoint_dir, self.callbacks, self.system = checkpoint_dir, callbacks, system
        workers = len(strategy.workers)
        self.reader = ItemReader(train_loader.manifest, batch_size=settings.batch_size // workers,
                                 batches_per_item=self.ps.batches_per_item,
                                 seed=train_loader.seed, config=train_loader.config)
        batches = sum(math.ceil((i.stop - i.start) / self.reader.batch_size)
                      for i in self.reader.items)
        self.epoch_batches = batches
        per_step = max(1, workers - self.ps.backup_workers) if self.ps.mode == "sync" else 1
        self.total_steps = settings.epochs * math.ceil(batches / per_step)
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.state = TrainState()
        self.best = BestSoFar(metric, patience=settings.early_stopping_patience)
        self.accounting: list[dict[str, Any]] = []  # the work queue's record, per epoch
        self.updates: list[list[int]] = []  # (worker, clock, lead, staleness) per gradient
        self.dropped = 0
        self.worker_stats: dict[int, dict[str, float]] = {}
        self.peaks: list[int] = []
        self.shards_agree: bool | None = None  # sync: every shard's steps took the same workers
        self.tables_summary: dict[str, Any] | None = None  # a click model's tables' rows held

    @property
    def model(self) -> torch.nn.Module:
        return self.strategy.full_model if self.strategy.full_model is not None \
            else self.strategy.model

    # -- fit -------------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> TrainState:
        key = f"ps-{next(_FITS)}"
        store = job_store()
        s = self.strategy
        if not s.is_server:
            worker_class = load_object(self.ps.worker, what="parameter-server worker") \
                if self.ps.worker else Worker
            worker = worker_class(
                rank=self.env.rank, model=s.model, layout=s.layout, channel=s.channel,
                servers=s.servers, reader=self.reader,
                loss_fn=lambda out, y: loss_fn(self.task, out, y), mode=self.ps.mode,
                device=self.env.device, autocast=s.autocast, grad_clip=self.settings.grad_clip,
                peak_memory=peak_memory, store=store, key=key,
                tables=s.tables.client if s.tables is not None else None)
            self._work(worker, store, key)
            return self.state
        if resume:
            self._restore()
        factor = lr_lambda(self.settings, self.total_steps)
        if s.tables is not None:  # the rows' lr follows the same schedule
            table_lr = self.ps.table_lr or self.settings.lr
            s.tables.host.lr_at = lambda v: table_lr * factor(v)
        server = ShardServer(s.shard, s.optimizer, ps=self.ps, workers=s.workers,
                             lr_at=lambda v: self.settings.lr * factor(v),
                             limit=self.settings.max_steps, version=s.version,
                             leader=self.env.rank == 0)
        is_main = self.env.rank == 0
        queue = WorkQueue(len(self.reader.items), seed=self.reader.seed,
                          shuffle=self.reader.config.shuffle)
        coordinator = Coordinator(queue, s.workers) if is_main else None
        ids = itertools.count(self.env.world_size)  # joiners' ids: never a rank's, never reused
        host = ServerHost(server, s.channel, workers=s.workers,
                          peer_clients=[] if is_main else [0], coordinator=coordinator,
                          save=lambda step: self._save_shard(server, step),
                          store=store, key=key,
                          tables=s.tables.host if s.tables is not None else None,
                          next_id=lambda: next(ids))
        host.start()
        store.set(f"{key}/addr/{self.env.rank}", host.address)
        if is_main:
            self._publish(store, key)
            try:
                self._coordinate(server, host, coordinator)
            finally:
                self.join_file.unlink(missing_ok=True)
            self.peaks = [peak_memory(), *[int(store.get(f"{key}/peak/{r}"))
                                           for r in s.servers[1:]]]
            if self.ps.mode == "sync":
                self.shards_agree = all(store.get(f"{key}/steps/{r}").decode()
                                        == _digest(server.steps) for r in s.servers[1:])
        else:
            host.join()
            if host.lost_peer:
                raise RuntimeError(f"lost {host.lost_peer}")
            store.set(f"{key}/steps/{self.env.rank}", _digest(server.steps))
            store.set(f"{key}/peak/{self.env.rank}", str(peak_memory()))
        self._tables_held(store, key)
        s.version = server.version
        return self.state

    def _work(self, worker: Worker, store: Any, key: str) -> None:
        """A worker rank: connect to every server (their addresses from the store), work."""
        try:
            connect(self.strategy.channel, self._addresses(store, key), wid=self.env.rank)
            worker.run()
        finally:
            self.strategy.channel.close()

    def _addresses(self, store: Any, key: str) -> list[str]:
        """Every server's listening address, as each published it in the store."""
        return [store.get(f"{key}/addr/{r}").decode() for r in self.strategy.servers]

    @property
    def join_file(self) -> Path:
        """Where a running job tells workers that join it how (``distml ps-worker``)."""
        return CandidateDir(self.checkpoint_dir.parent).ps_join

    def _publish(self, store: Any, key: str) -> None:
        """Server 0: every server's address, and what a joining worker must do alike (its
        batch size, the data's seed), in the candidate's folder."""
        self.join_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.join_file, {
            "servers": self._addresses(store, key), "batch_size": self.reader.batch_size,
            "seed": self.reader.seed})

    def _tables_held(self, store: Any, key: str) -> None:
        """Server 0: the rows (and bytes, with their optimizer state) each server holds."""
        host = self.strategy.tables.host if self.strategy.tables is not None else None
        if host is None:
            return
        mine = [sum(map(len, host.stores)), host.resident_bytes()]
        if self.env.rank != 0:
            store.set(f"{key}/held/{self.env.rank}", f"{mine[0]},{mine[1]}")
            return
        held = [mine, *[[int(v) for v in store.get(f"{key}/held/{r}").decode().split(",")]
                        for r in self.strategy.servers[1:]]]
        t = self.strategy.tables
        self.tables_summary = {
            "cardinalities": t.cardinalities, "dim": t.dim,
            "table_bytes": sum(c * t.dim * 4 for c in t.cardinalities),
            "rows_held_per_server": [h[0] for h in held],
            "bytes_held_per_server": [h[1] for h in held]}

    # -- server 0 --------------------------------------------------------------------------------

    def _coordinate(self, server: ShardServer, host: ServerHost, coordinator: Coordinator
                    ) -> None:
        self.server, self.host = server, host
        self._emitted = len(server.losses)
        for cb in self.callbacks:
            cb.on_train_start(self)
        start, paused, before = time.perf_counter(), 0.0, self.state.seconds
        self._clock = lambda: before + time.perf_counter() - start - paused
        next_eval = self._next_eval(server.version)
        stop = server.stopped
        while not stop and self.state.epoch < self.settings.epochs:
            coordinator.open_epoch(self.state.epoch)
            epoch_start, first = time.perf_counter(), (len(server.losses), len(server.updates))
            while not coordinator.wait_epoch_over(0.02):
                self._emit_steps()
                if host.lost_peer:
                    raise RuntimeError(f"lost {host.lost_peer}")
                if server.version >= next_eval:
                    stop = self._evaluate()
                    next_eval = self._next_eval(server.version)
                if server.stopped or stop:
                    break
            self._emit_steps()
            pause = time.perf_counter()
            self._end_epoch(server, coordinator, first, pause - epoch_start)
            stop = stop or server.stopped or self.state.epoch >= self.settings.epochs
            if self.settings.eval_every_steps is None or stop:
                stop = self._evaluate() or stop
            if self.settings.checkpoints:
                self._save(server)
            paused += time.perf_counter() - pause
        self.state.seconds = self._clock()
        coordinator.stop()
        host.join()
        for peer in self.strategy.servers[1:]:
            self.strategy.channel.send(peer, Msg(Kind.BYE))
        self.worker_stats = dict(host.stats)
        self._restore_best()
        for cb in self.callbacks:
            cb.on_train_end(self)

    def _restore_best(self) -> None:
        if self.settings.restore_best and self.strategy.tables is None:
            self.best.restore(self.strategy)
        elif self.settings.restore_best:
            logger.info("restore_best: a model with sparse tables ends with its last weights "
                        "(the servers keep no copy of the best rows)")

    def _next_eval(self, version: int) -> float:
        every = self.settings.eval_every_steps
        return math.inf if every is None else (version // every + 1) * every

    def _emit_steps(self) -> None:
        """The callbacks' step records, for the updates applied since the last call."""
        losses = self.server.losses
        for i in range(self._emitted, len(losses)):
            loss, samples, at = losses[i]
            seconds = at - losses[i - 1][2] if i else 0.0
            self.state.step = i + 1
            self.state.train_loss.append(loss)
            record = {"step": i + 1, "epoch": self.state.epoch, "loss": loss,
                      "lr": self.server.lr_at(i), "samples_per_s": samples / max(seconds, 1e-9),
                      "step_seconds": seconds}
            for cb in self.callbacks:
                cb.on_step_end(self, record)
        self._emitted = len(losses)

    def _end_epoch(self, server: ShardServer, coordinator: Coordinator,
                   first: tuple[int, int], seconds: float) -> None:
        """Statistics of the epoch (its updates: from ``first`` on)."""
        applied = [(i, b) for e, i, b in server.applied if e == self.state.epoch]
        self.accounting.append({**coordinator.queue.accounting(), "batches": {
            "expected": self.epoch_batches, "applied": len(applied),
            "distinct": len(set(applied))}})
        server.applied = [a for a in server.applied if a[0] > self.state.epoch]
        samples = sum(s for _, s, _ in server.losses[first[0]:])
        stats = epoch_stats(self.state.epoch, samples, seconds, self.host.stats,
                            server.updates[first[1]:], system=self.system)
        self.state.epochs.append(stats)
        self.state.epoch += 1
        for cb in self.callbacks:
            cb.on_epoch_end(self, stats)

    def _evaluate(self) -> bool:
        """Evaluate the current parameters (all shards) on val; True to stop early."""
        flat = self._current_flat()
        self.strategy.load_full(flat)
        metrics, _ = self.strategy.evaluate(self.task, *self.val_data)
        self.state.evals.append({"step": self.server.version, "elapsed_s": self._clock(),
                                 **metrics})
        stop = self.best.observe(
            self.state, metrics[self.metric], step=self.server.version,
            weights=lambda: {k: v.detach().clone()
                             for k, v in self.strategy.model_state_dict().items()})
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        return stop

    def _current_flat(self) -> torch.Tensor:
        """Server 0's shard and the others', asked for with PEEK (they serve it from their
        client thread for server 0, while training goes on)."""
        _, own = self.server.snapshot()
        parts = [own]
        ch = self.strategy.channel
        for peer in self.strategy.servers[1:]:
            ch.send(peer, Msg(Kind.PEEK))
            ch.recv(peer)
            parts.append(ch.recv_into(peer, torch.empty(self.strategy.layout.size(peer))))
        return torch.cat(parts)

    # -- checkpoints -----------------------------------------------------------------------------

    def _save(self, server: ShardServer) -> None:
        step = server.version
        ckpt.begin(self.checkpoint_dir, step)
        ch = self.strategy.channel
        for peer in self.strategy.servers[1:]:
            ch.send(peer, Msg(Kind.SAVE, version=step))
            ch.recv(peer)
        self._save_shard(server, step)
        self.state.seconds = self._clock()
        progress = {"progress": asdict(self.state), "accounting": self.accounting,
                    "updates": self.updates + [list(u) for u in server.updates],
                    "dropped": self.dropped + server.dropped, "best": self.best.weights or {}}
        path = ckpt.commit(self.checkpoint_dir, step, progress,
                           keep=self.settings.keep_checkpoints)
        logger.info("checkpoint %s", path)

    def _save_shard(self, server: ShardServer, step: int) -> None:
        with server.cond:
            self.strategy.version = server.version
            state = self.strategy.state_dict()
        ckpt.save_shard(self.checkpoint_dir, step, self.env.rank, state)

    def _restore(self) -> None:
        paths = ckpt.complete(self.checkpoint_dir)
        if not paths:
            logger.info("no checkpoint in %s; starting from scratch", self.checkpoint_dir)
            return
        path = paths[-1]
        s = self.strategy
        state = ckpt.load_shard(path, self.env.rank, len(s.servers), s.state_dict(tables=False))
        s.load_state_dict(state)
        if s.tables is not None:  # the rows this server held, as many as it had
            s.tables.load_state_dict(ckpt.load_rows(path, self.env.rank))
        if self.env.rank == 0:
            saved = ckpt.read_progress(path)
            self.state = TrainState(**saved["progress"])
            self.accounting, self.dropped = saved["accounting"], saved["dropped"]
            self.updates = saved["updates"]
            self.best.weights = saved["best"] or None
        logger.info("resumed from %s (step %d)", path, s.version)

    # -- results ---------------------------------------------------------------------------------

    def peak_memory_per_rank(self) -> list[int]:
        """Servers' peaks, then each worker's last reported one (server 0 only)."""
        workers = [int(self.worker_stats.get(w, {}).get("peak_mem_bytes", 0))
                   for w in self.strategy.workers]
        return [*self.peaks, *workers]

    def _membership(self) -> list[dict[str, Any]]:
        """Server 0's membership events; a join's with the seconds from it to the joiner's
        first gradient applied (None if it applied none)."""
        server = getattr(self, "server", None)
        if server is None:
            return []
        first = {w: round(server.first_applied[w] - t, 3) if w in server.first_applied
                 else None for w, t in server.joined_at.items()}
        return [{**e, "first_gradient_s": first.get(e["worker"])} if e["event"] == "join"
                else e for e in self.host.coordinator.events]

    def result_extras(self) -> dict[str, Any]:
        server = getattr(self, "server", None)
        updates = self.updates + [list(u) for u in (server.updates if server else [])]
        return {"parameter_server": {**ps_summary(
            self.ps, servers=self.strategy.servers, workers=self.strategy.workers,
            updates=updates, dropped=self.dropped + (server.dropped if server else 0),
            worker_stats=self.worker_stats, accounting=self.accounting,
            alive=sorted(server.alive) if server else [],
            membership=self._membership()),
            "step_workers_agree_across_shards": self.shards_agree,
            "tables": self.tables_summary}}
