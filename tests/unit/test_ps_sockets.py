"""Workers joining a parameter-server job, in one process: the socket channel (messages and
payloads round trip; a dead peer is noticed at once), the coordinator's join and leave, and
a joiner's ssp clock, and the joins refused with a reason."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch
from torch import nn

from distml.config import ParameterServerConfig
from distml.distributed.param_server.protocol import Kind, Msg
from distml.distributed.param_server.server import ShardServer
from distml.distributed.param_server.sockets import (
    Listener,
    PeerLostError,
    SocketChannel,
    connect,
)
from distml.distributed.param_server.work import STOP, Coordinator, WorkQueue
from distml.errors import DistmlError
from distml.training.ps_join import join_job
from tests.helpers.configs import write_config


def _server(admit=None) -> tuple[SocketChannel, Listener, dict[int, threading.Event]]:  # noqa: ANN001
    """A listener on loopback giving ids from 7 on; ``served`` is set per admitted id."""
    channel, served, ids = SocketChannel(), defaultdict(threading.Event), iter(range(7, 100))

    def default(hello: Msg) -> tuple[int, Msg]:
        wid = next(ids) if hello.item < 0 else hello.item
        return wid, Msg(Kind.OK, item=wid, version=3)

    def serve(wid: int) -> None:
        served[wid].set()

    listener = Listener(channel, admit=admit or default, serve=serve, host="127.0.0.1")
    return channel, listener.start(), served


def test_socket_messages_and_payloads_round_trip_and_a_dead_peer_is_noticed():
    server, listener, served = _server()
    worker = SocketChannel()
    hello = connect(worker, [listener.address], wid=-1)
    assert (hello.kind, hello.item, hello.version) == (Kind.OK, 7, 3)  # a fresh id
    assert served[7].wait(5)
    grad = torch.randn(1000)
    ids = torch.arange(5, dtype=torch.int64)
    worker.request_all([0], [Msg(Kind.PUSH, epoch=2, item=4, clock=9, loss=0.25)], [grad])
    worker.send(0, Msg(Kind.ROWS, samples=5), ids)
    head = server.recv(7)
    assert (head.kind, head.epoch, head.item, head.clock, head.loss) == (Kind.PUSH, 2, 4, 9,
                                                                         0.25)
    assert torch.equal(server.recv_into(7, torch.empty(1000)), grad)
    assert server.recv(7).samples == 5
    assert torch.equal(server.recv_into(7, torch.empty(5, dtype=torch.int64)), ids)
    server.send(7, Msg(Kind.OK, version=11), grad[:10] * 2)  # a strided view's slice too
    assert worker.recv(0).version == 11
    assert torch.equal(worker.recv_into(0, torch.empty(10)), grad[:10] * 2)

    got: list[BaseException] = []
    blocked = threading.Thread(target=lambda: got.append(
        pytest.raises(PeerLostError, server.recv, 7).value))
    blocked.start()
    worker.close()  # the worker's process ends: the server's blocked receive fails at once
    blocked.join(5)
    assert not blocked.is_alive()
    assert isinstance(got[0], RuntimeError)  # as gloo's error was: the server's handler
    assert "closed the connection" in str(got[0])
    with pytest.raises(PeerLostError):
        server.send(7, Msg(Kind.OK), torch.zeros(1 << 20))  # no one reads: reset
    listener.close()
    server.close()


def test_a_refused_hello_is_answered_and_the_connection_closed():
    _, listener, served = _server(admit=lambda hello: (-1, Msg(Kind.STOP)))
    assert connect(SocketChannel(), [listener.address], wid=-1).kind == Kind.STOP
    assert not served[-1].is_set()
    listener.close()


def test_a_joiner_takes_items_and_its_leave_and_a_death_are_recorded():
    queue = WorkQueue(6, seed=0, shuffle=False)
    c = Coordinator(queue, [1])
    c.open_epoch(0)
    assert c.take(1, None, wait=False)[2] == 0
    assert c.join(5)  # mid-epoch
    assert c.take(5, None, wait=False)[2] == 1
    assert c.join(6)
    assert c.take(6, None, wait=False)[2] == 2
    c.leave(5, 1)  # scaled down: its item reported done, nothing more for it
    assert c.take(5, None, wait=False)[0] == STOP
    assert c.lost(6) == 2  # killed: its item re-queued at the front
    assert c.take(1, 0, wait=False)[2] == 2
    for item in (2, 3, 4):
        assert c.take(1, item, wait=False)[2] == item + 1
    c.take(1, 5, wait=False)
    assert queue.finished
    assert sorted(i for i, _ in queue.completions) == list(range(6))
    assert [w for i, w in queue.completions if i == 1] == [5]
    events = [(e["event"], e["worker"], e["workers_before"], e["workers_after"])
              for e in c.events]
    assert events == [("join", 5, [1], [1, 5]), ("join", 6, [1, 5], [1, 5, 6]),
                      ("leave", 5, [1, 5, 6], [1, 6]), ("lost", 6, [1, 6], [1])]
    c.stop()
    assert not c.join(9)  # training is over: no one joins


def test_a_joiner_counts_for_ssp_from_its_first_request_level_with_the_slowest():
    shard = nn.Parameter(torch.zeros(4))
    server = ShardServer(shard, torch.optim.SGD([shard], lr=0.1),
                         ps=ParameterServerConfig(mode="ssp", staleness=1), workers=[1, 2])
    for w, pushes in ((1, 3), (2, 5)):
        for _ in range(pushes):
            server.push(w, Msg(Kind.PUSH, epoch=0, version=server.version), torch.ones(4))
    server.join(3)
    assert server.clock[3] == 3  # level with the slowest (1): it holds no one back
    assert server._lead(2) == 2  # unchanged by the join
    server.pull(3, 0)  # its first request: it works, at its clock
    assert server._working() == {1, 2, 3}


def test_joining_a_job_that_cannot_take_workers_is_refused_saying_why(tmp_path, tiny_raw):
    tiny_raw["train"]["parallel"] = {"strategy": "ddp", "world_size": 2}
    write_config(tmp_path / "config.yaml", tiny_raw)
    with pytest.raises(DistmlError, match=r"candidate 'small' trains with train\.parallel"
                       r"\.strategy=ddp; only a parameter_server candidate takes workers"):
        join_job(tmp_path, "small", timeout_s=0)
    tiny_raw["train"]["parallel"] = {"strategy": "parameter_server", "world_size": 2}
    write_config(tmp_path / "config.yaml", tiny_raw)
    with pytest.raises(DistmlError, match=r"no parameter-server job is training in .*small "
                       r"\(no ps-join\.json after 0 s\); start the job first"):
        join_job(tmp_path, "small", timeout_s=0)
