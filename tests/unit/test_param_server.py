"""Parameter-server parts in one process: config checks, the shard layout, the work queue and
the servers' rules (async staleness, ssp's bound, sync's quorum with backup workers)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from distml.config import ParameterServerConfig
from distml.distributed.param_server.layout import ShardLayout
from distml.distributed.param_server.protocol import Kind, Msg
from distml.distributed.param_server.server import ShardServer
from distml.distributed.param_server.work import STOP, Coordinator, WorkQueue, plan_items
from distml.errors import ConfigError
from tests.helpers.configs import make_config

PS = {"strategy": "parameter_server", "world_size": 3}


@pytest.mark.parametrize(("parallel", "train", "match"), [
    ({**PS, "parameter_server": {"num_servers": 3}}, {},
     r"num_servers=3 leaves no worker in world_size=3; use at most 2 servers"),
    ({**PS, "parameter_server": {"mode": "sync", "backup_workers": 2}}, {},
     r"backup_workers=2 must be less than the 2 worker\(s\).*use at most 1"),
    ({**PS, "parameter_server": {"mode": "async", "staleness": 1}}, {},
     r"parameter_server\.staleness applies to mode ssp, not 'async'"),
    ({**PS, "parameter_server": {"mode": "ssp", "backup_workers": 1}}, {},
     r"parameter_server\.backup_workers applies to mode sync, not 'ssp'"),
    (PS, {"grad_accum_steps": 2}, r"grad_accum_steps=2 with strategy parameter_server"),
    (PS, {"checkpoint_every_steps": 5}, r"its checkpoints are taken at the end of each epoch"),
    (PS, {"precision": "fp16"}, r"precision fp16 with strategy 'parameter_server'"),
    ({"strategy": "ddp", "world_size": 2},
     {"candidates": [{"name": "m", "model": {"type": "mlp"},
                      "parallel": {"parameter_server": {"num_servers": 2}}}]},
     r"candidate 'm': parallel\.parameter_server applies to strategy parameter_server, "
     r"not 'ddp'"),
])
def test_bad_parameter_server_settings_are_refused(tiny_raw, parallel, train, match):
    tiny_raw["train"].update(parallel=parallel, **train)
    with pytest.raises(ConfigError, match=match):
        make_config(tiny_raw)


def test_a_candidate_changing_the_mode_drops_the_other_modes_settings(tiny_raw):
    tiny_raw["train"]["parallel"] = {**PS, "parameter_server": {"mode": "ssp", "staleness": 1}}
    tiny_raw["train"]["candidates"][1]["parallel"] = {
        "parameter_server": {"mode": "sync", "backup_workers": 1}}
    cfg = make_config(tiny_raw)
    ssp, sync = (cfg.train.settings_for(c).parallel.parameter_server
                 for c in cfg.train.candidates)
    assert (ssp.mode, ssp.staleness) == ("ssp", 1)
    assert (sync.mode, sync.backup_workers, sync.staleness) == ("sync", 1, 2)
    dims = cfg.train.settings_for(cfg.train.candidates[0]).dims
    assert (dims.servers, dims.data) == (1, 2)
    assert dims.build_mesh("cpu") is None  # roles, not a mesh


def test_shards_hold_equal_bytes_and_round_trip():
    model = nn.Sequential(nn.Linear(10, 300), nn.Linear(300, 3))  # one big matrix
    layout = ShardLayout.of(model, 3)
    sizes = [layout.size(s) for s in range(3)]
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
    assert max(sizes) - min(sizes) <= 1
    params = list(model.parameters())
    flat = layout.flatten(params)
    assert torch.equal(torch.cat(layout.split(flat)), flat)
    other = nn.Sequential(nn.Linear(10, 300), nn.Linear(300, 3))
    layout.copy_into(flat, list(other.parameters()))
    for a, b in zip(params, other.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fewer than num_servers=10000"):
        ShardLayout.of(model, 10_000)


def test_items_cover_every_row_once():
    items = plan_items([10, 3, 7], 4)
    rows = [(i.partition, r) for i in items for r in range(i.start, i.stop)]
    assert sorted(rows) == [(p, r) for p, n in enumerate([10, 3, 7]) for r in range(n)]
    assert max(i.stop - i.start for i in items) == 4


def test_a_dead_workers_item_is_requeued_and_every_item_completes_once():
    coord = Coordinator(WorkQueue(5, seed=0), [1, 2])
    coord.open_epoch(0)
    _, _, a = coord.take(1, None, wait=False)
    _, _, b = coord.take(2, None, wait=False)
    assert coord.lost(2) == b  # back to the front of the queue
    assert coord.take(2, None, wait=False)[0] == STOP  # a dead worker gets no more work
    done, item = a, None
    while True:
        kind, _, item = coord.take(1, done, wait=False)
        if kind != "item":
            break
        done = item
    assert kind == "none"
    assert coord.wait_epoch_over(0) is False  # worker 1 is not standing by yet
    acc = coord.queue.accounting()
    assert sorted(i for i, _ in acc["completions"]) == list(range(5))
    assert acc["requeued"] == [[b, 2]]
    assert acc["attempts"][str(b)] == 2
    with pytest.raises(ValueError, match="reports item"):
        coord.queue.complete(1, 0)


def test_faster_workers_take_more_items():
    coord = Coordinator(WorkQueue(30, seed=0), [1, 2])
    coord.open_epoch(0)

    def work(worker: int, seconds: float) -> None:
        done = None
        while (reply := coord.take(worker, done, wait=True))[0] == "item":
            time.sleep(seconds)
            done = reply[2]

    threads = [threading.Thread(target=work, args=(1, 0.001)),
               threading.Thread(target=work, args=(2, 0.02))]
    for t in threads:
        t.start()
    assert coord.wait_epoch_over(10)
    coord.stop()
    for t in threads:
        t.join(5)
    by_worker = coord.queue.accounting()["items_by_worker"]
    assert by_worker["1"] > 2 * by_worker.get("2", 0)


def _server(mode: str, workers: list[int], **ps) -> ShardServer:
    shard = nn.Parameter(torch.zeros(4))
    return ShardServer(shard, torch.optim.SGD([shard], lr=1.0),
                       ps=ParameterServerConfig(mode=mode, **ps), workers=workers)


def _push(server: ShardServer, w: int, version: int, value: float = 1.0) -> Msg:
    return server.push(w, Msg(Kind.PUSH, version=version, loss=1.0, samples=2),
                       torch.full((4,), value))


def test_async_records_the_staleness_of_each_gradient():
    server = _server("async", [1, 2])
    server.pull(1, 0)
    server.pull(2, 0)
    _push(server, 1, 0)
    _push(server, 2, 0)  # pulled at version 0, applied at version 1
    assert [u[3] for u in server.updates] == [0, 1]
    assert torch.equal(server.shard.detach(), torch.full((4,), -2.0))


def _blocked(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    t.join(0.2)
    return t


def test_ssp_holds_a_worker_at_the_bound_until_the_slowest_catches_up():
    server = _server("ssp", [1, 2], staleness=1)
    server.pull(1, 0)
    _push(server, 1, 0)
    assert server.pull(1, 0)[0].clock == 1  # one step ahead: allowed
    _push(server, 1, 1)
    waiting = _blocked(server.pull, 1, 0)  # two ahead: waits
    assert waiting.is_alive()
    _push(server, 2, 0)  # the slowest catches up one step
    waiting.join(2)
    assert not waiting.is_alive()
    server.set_idle(2, 0)  # a worker without work does not hold the others back
    _push(server, 1, 2)
    _push(server, 1, 3)
    assert server.pull(1, 0)[0].kind == Kind.OK


def _pushing(server: ShardServer, w: int, version: int, value: float = 1.0, **fields
             ) -> tuple[threading.Thread, list[Msg]]:
    """A push in a thread (a sync leader answers it once its step is applied)."""
    out: list[Msg] = []
    t = threading.Thread(target=lambda: out.append(server.push(w, Msg(
        Kind.PUSH, version=version, loss=1.0, samples=2, **fields), torch.full((4,), value))),
        daemon=True)
    t.start()
    t.join(0.2)
    return t, out


def test_sync_steps_on_the_quorum_and_drops_the_backups_late_gradient():
    server = _server("sync", [1, 2, 3], backup_workers=1)
    first, answer = _pushing(server, 1, 0, 1.0, item=4, clock=0)
    assert first.is_alive()  # the leader answers once the step is applied: its count
    waiting = _blocked(server.pull, 1, 0, 1)  # the next step's parameters: not yet
    assert waiting.is_alive()
    _, second = _pushing(server, 2, 0, 3.0, item=5, clock=1)  # 2 of 3: the quorum
    first.join(2)
    waiting.join(2)
    assert server.version == 1
    assert answer[0].samples == second[0].samples == 2  # what the followers wait for
    assert torch.equal(server.shard.detach(), torch.full((4,), -2.0))  # the mean of 1 and 3
    assert sorted(server.applied) == [(0, 4, 0), (0, 5, 1)]
    late = _push(server, 3, 0)  # pulled at version 0: late, dropped
    assert (late.samples, server.dropped) == (0, 1)
    _pushing(server, 1, 1)
    server.lost(2)  # a dead worker no longer counts: 1 of the 2 left is the quorum
    assert server.version == 2
    assert server.steps == [(1, 2), (1,)]


def test_a_sync_follower_steps_on_the_leaders_count_not_its_own_quorum():
    follower = _server("sync", [1, 2, 3], backup_workers=1)
    follower.leader = False
    follower.push(3, Msg(Kind.PUSH, version=0, samples=2, clock=3), torch.full((4,), 1.0))
    follower.push(1, Msg(Kind.PUSH, version=0, samples=2, clock=3), torch.full((4,), 2.0))
    assert follower.version == 0  # its own quorum (2 of 3) would have stepped here
    follower.push(2, Msg(Kind.PUSH, version=0, samples=2, clock=3), torch.full((4,), 3.0))
    assert follower.version == 1
    assert torch.equal(follower.shard.detach(), torch.full((4,), -2.0))
    assert follower.steps == [(1, 2, 3)]


def test_a_dropped_gradients_item_resumes_from_that_batch_at_the_back_of_the_queue():
    coord = Coordinator(WorkQueue(3, seed=0, shuffle=False), [1, 2])
    coord.open_epoch(0)
    assert coord.take(1, None, wait=False)[2] == 0
    assert coord.take(1, 0, wait=False, undone=2)[2] == 1  # batches 0-1 applied, 2 dropped
    assert coord.take(2, None, wait=False)[2] == 2
    assert coord.take(2, 2, wait=False)[2] == 0  # item 0 again, from its batch 2
    assert coord.queue.resume == {0: 2}
    coord.take(1, 1, wait=False)
    coord.take(2, 0, wait=False)
    acc = coord.queue.accounting()
    assert sorted(i for i, _ in acc["completions"]) == [0, 1, 2]  # each once
    assert acc["dropped"] == [[0, 1, 2]]


def test_a_follower_whose_contributor_dies_between_servers_steps_with_what_it_has():
    follower = _server("sync", [1, 2, 3], backup_workers=1)
    follower.leader = False
    follower.push(1, Msg(Kind.PUSH, version=0, samples=2, clock=2), torch.full((4,), 1.0))
    assert follower.version == 0  # the leader's step took 2
    follower.lost(2)  # the other one died before reaching this server: no hang
    assert follower.version == 1
    assert follower.steps == [(1,)]
