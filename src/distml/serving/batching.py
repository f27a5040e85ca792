"""Dynamic batching with a bounded queue and per-request deadlines.

Requests wait in one queue; a single inference thread takes them (a request alone, nothing
queued or arriving, runs on the event loop's thread instead while such forwards take under
``INLINE_MAX_S`` on average: the hand-off would cost more than it overlaps; one that finds
the model idle too runs at once, in ``submit``, without passing through the queue, unless
another did so in the same turn of the event loop: a burst of requests read together is a
batch, not a row of lone forwards). Batching is
continuous: a request that finds the model idle goes straight to its forward pass, and the
requests that arrive while the model is busy form the next batch (up to ``max_batch_size``
rows), taken as soon as the model is free. With ``max_delay`` > 0 the batcher also waits,
up to that long after the oldest queued request arrived, for requests whose bodies are being
read (received, not yet queued); with none on their way it never waits, so a lone request
never pays the delay. After a long forward (``REBOUND_MAX_S``), requests queued during it
wait a little for the rows just answered to come back, so that a closed loop's batches stay
whole instead of alternating one row and the rest. Each request's time in the queue is
reported (``on_wait``). Results are split
back; rows are independent in eval mode, so each request gets what it would get alone. The
queue holds at most ``max_queue_rows`` rows: past that a request is refused at once
(``OverloadedError``, a 503), so latency never grows without bound. A request past its
deadline gets ``DeadlineExceededError`` (a 504), and if it has not started it is dropped from
the queue, unrun.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# A lone request's forward runs on the event loop's thread only while lone forwards take less
# than this on average: a longer one would hold up health checks, new connections and timers.
INLINE_MAX_S = 0.001
# After a forward of at least INLINE_MAX_S, when what is queued is under half the rows just
# answered, the batcher waits up to half that forward (at most this) for those rows' clients
# to send again: otherwise a closed loop of C clients settles into alternating batches of
# 1 and C - 1 (the one queued while the big batch ran goes alone), paying a whole forward
# for one row every other time. Only when something was queued during the forward: a request
# that finds the model idle and nothing queued never waits.
REBOUND_MAX_S = 0.005


class OverloadedError(Exception):
    """The queue is full."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its result was ready."""


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    deadline: float = math.inf  # time.monotonic() past which its result is of no use
    arrived: float = field(default_factory=time.monotonic)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(DeadlineExceededError())


class Batcher:
    def __init__(
        self,
        fn: Callable[[np.ndarray], dict[str, np.ndarray]],
        *,
        batching: bool = True,
        max_batch_size: int = 64,
        max_delay_s: float = 0.002,
        max_queue_rows: int = 1024,
        on_batch: Callable[[int], None] = lambda rows: None,
        on_queue: Callable[[int], None] = lambda rows: None,
        on_drop: Callable[[int], None] = lambda requests: None,
        on_wait: Callable[[float], None] = lambda seconds: None,
        arriving: Callable[[], int] = lambda: 1,
    ) -> None:
        self.fn = fn
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self.on_batch = on_batch
        self.on_queue = on_queue
        self.on_drop = on_drop  # requests dropped unrun, their deadline passed in the queue
        self.on_wait = on_wait  # seconds each request spent queued before its forward began
        self.arriving = arriving  # requests received but not yet submitted
        self.lone_forward_s = 0.0  # moving average of a lone request's forward (_timed)
        self.last = (0, 0.0)  # the last batch: (rows, seconds of its forward)
        self.queue: deque[_Pending] = deque()
        self.queued_rows = 0
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distml-infer")
        self._task: asyncio.Task | None = None
        self.busy = False  # a forward of the batcher's task is running (on its thread)
        self._turn_passed = True  # no request ran alone in this turn of the event loop

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    def full(self) -> bool:
        """No room for another request: refuse it before spending time on its body."""
        return self.queued_rows >= self.max_queue_rows and bool(self.queue)

    async def submit(self, x: np.ndarray, timeout_s: float) -> dict[str, np.ndarray]:
        """The model's outputs for ``x``; OverloadedError or DeadlineExceededError otherwise."""
        if self.queued_rows + len(x) > self.max_queue_rows and self.queue:
            raise OverloadedError
        if (self._turn_passed and not self.queue and not self.busy and not self.arriving()
                and self.lone_forward_s < INLINE_MAX_S):
            return self._alone(x, timeout_s)
        loop = asyncio.get_running_loop()
        item = _Pending(x, loop.create_future(), time.monotonic() + timeout_s)
        self.queue.append(item)
        self._queued(len(x))
        self._wake.set()
        # The deadline as a timer on the future (cheaper than wait_for and shield): past it
        # the future fails; not started, the batcher drops it; started, its result is unused.
        deadline = loop.call_later(timeout_s, _expire, item.future)
        try:
            return await item.future
        finally:
            deadline.cancel()

    def _alone(self, x: np.ndarray, timeout_s: float) -> dict[str, np.ndarray]:
        """A request that finds the model idle, nothing queued and nothing on its way: its
        short forward right here, on the loop's thread, with no hand-off to the batcher's
        task and back (two turns of the event loop) and no deadline timer."""
        # Requests that start in this same turn of the event loop (a burst, read together)
        # queue for one batch instead; the next turn is the loop's next look at its sockets.
        self._turn_passed = False
        asyncio.get_running_loop().call_soon(self._pass_turn)
        self.on_wait(0.0)
        self.on_batch(len(x))
        start = time.monotonic()
        out = self._timed(x, True)
        if time.monotonic() > start + timeout_s:
            raise DeadlineExceededError
        return out

    def _pass_turn(self) -> None:
        self._turn_passed = True

    def _queued(self, rows: int) -> None:
        self.queued_rows += rows
        self.on_queue(self.queued_rows)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if self.batching and self.max_delay_s > 0:
                await self._gather()
            batch = self._take()
            if not batch:
                continue
            now = time.monotonic()
            for p in batch:
                self.on_wait(now - p.arrived)
            x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
            self.on_batch(len(x))
            alone = len(batch) == 1 and not self.queue and not self.arriving()
            try:
                if alone and self.lone_forward_s < INLINE_MAX_S:
                    # a short forward, alone: on this thread, sparing the hand-off to the
                    # inference thread and back (nothing is waiting to be read meanwhile)
                    out = self._timed(x, alone)
                else:  # on the inference thread: the loop reads the next requests meanwhile
                    self.busy = True
                    try:
                        out = await loop.run_in_executor(self._pool, self._timed, x, alone)
                    finally:
                        self.busy = False
            except Exception as e:  # noqa: BLE001 - the requests get the error, the loop goes on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self._answer(batch, out)
            if self.batching and self.queue:  # queued during the forward: not alone
                await self._rebound()

    def _timed(self, x: np.ndarray, alone: bool) -> dict[str, np.ndarray]:
        """``fn(x)``; a lone request's forward time goes into ``lone_forward_s`` (a moving
        average), which decides whether the next lone one may run on the loop's thread."""
        start = time.perf_counter()
        out = self.fn(x)
        took = time.perf_counter() - start
        if alone:
            self.lone_forward_s += 0.2 * (took - self.lone_forward_s)
        self.last = (len(x), took)
        return out

    async def _rebound(self) -> None:
        """Wait (see REBOUND_MAX_S) for the rows of the last long forward to come back, while
        what is queued is under half of them and the batch is not full."""
        rows, took = self.last
        if took < INLINE_MAX_S or 2 * self.queued_rows >= rows:
            return
        until = time.monotonic() + min(0.5 * took, REBOUND_MAX_S)
        await self._wait(lambda: self.queued_rows < min(rows, self.max_batch_size),
                         lambda: until)

    @staticmethod
    def _answer(batch: list[_Pending], out: dict[str, np.ndarray]) -> None:
        """Each request's rows of the outputs; past its deadline (its timer had no turn yet:
        the forward ran on the loop's thread), a DeadlineExceededError."""
        start, now = 0, time.monotonic()
        for p in batch:
            stop = start + len(p.x)
            if p.future.done():
                pass
            elif now > p.deadline:
                p.future.set_exception(DeadlineExceededError())
            else:
                p.future.set_result({k: v[start:stop] for k, v in out.items()})
            start = stop

    async def _gather(self) -> None:
        """Wait for more requests until the batch is full, the oldest waited long enough, or
        no more are on their way."""
        await self._wait(
            lambda: self.queued_rows < self.max_batch_size and self.arriving() > 0,
            lambda: self.queue[0].arrived + self.max_delay_s)

    async def _wait(self, more: Callable[[], bool], until: Callable[[], float]) -> None:
        """Wake on each arrival while ``more()`` holds, until the monotonic time ``until()``."""
        while more():
            left = until() - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """Requests for one forward pass (at least one, however large); cancelled ones are
        dropped unrun."""
        batch: list[_Pending] = []
        rows = 0
        limit = self.max_batch_size if self.batching else 1
        now = time.monotonic()
        while self.queue:
            p = self.queue[0]
            if p.future.done() or now > p.deadline:  # its deadline passed while it waited
                if not p.future.done():
                    p.future.set_exception(DeadlineExceededError())
                self.queue.popleft()
                self._queued(-len(p.x))
                self.on_drop(1)
                continue
            if batch and (not self.batching or rows + len(p.x) > limit):
                break
            self.queue.popleft()
            self._queued(-len(p.x))
            batch.append(p)
            rows += len(p.x)
        return batch
