"""The batcher on a real event loop and a real inference thread; int8 serving of a real
artifact."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import threading
import time
from importlib import resources

import numpy as np
import pytest
import torch
import yaml
from fastapi.routing import APIRoute
from sklearn.datasets import load_digits

from distml.artifact import save_artifact
from distml.config import ServeConfig
from distml.data.ingest import ingest
from distml.data.tensors import SplitTensors
from distml.rundir import RunDir
from distml.serving.app import create_app
from distml.serving.batching import Batcher, DeadlineExceededError, OverloadedError
from distml.serving.endpoint import INFER_ROUTES
from distml.serving.model import load_served_model
from distml.serving.protocol import (
    NUMERIC,
    ProtocolError,
    accepted_datatypes,
    datatype_of,
    decode_json,
    decode_raw,
    encode_raw,
    json_values,
)
from distml.training.candidate import train_candidate
from tests.helpers.configs import TINY, make_config


class Model:
    """A row-wise function that records every call (rows are independent, as in eval)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[int] = []
        self.delay = delay

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(len(x))
        time.sleep(self.delay)
        return {"double": 2 * x, "sum": x.sum(1)}


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The real served model: a digits MLP trained for two epochs, as distml serve loads it."""
    tmp = tmp_path_factory.mktemp("served")
    raw = {**copy.deepcopy(TINY), "output_dir": str(tmp / "runs"),
           "registry": str(tmp / "registry")}
    cfg = make_config(raw)
    manifest = ingest(cfg.data, tmp / "data", seed=0)
    result = train_candidate(cfg, cfg.train.candidates[0], manifest,
                             val=SplitTensors.load(manifest, "val"), run=RunDir(tmp / "out"))
    return load_served_model(result["artifact"], registry=tmp)


def test_batched_results_equal_each_request_alone(served):
    rng = np.random.default_rng(0)
    rows = load_digits().data.astype(np.float32)
    inputs = [rows[rng.integers(0, len(rows), int(n))] for n in rng.integers(1, 6, 40)]
    batches: list[int] = []

    async def main():
        b = Batcher(served.infer, max_batch_size=16, max_delay_s=0.005, on_batch=batches.append,
                    arriving=lambda: 1)
        b.start()
        try:
            return await asyncio.gather(*[b.submit(x, 5) for x in inputs])
        finally:
            await b.stop()

    outs = _run(main())
    for x, out in zip(inputs, outs, strict=True):
        alone = served.infer(x)
        # A row's float32 sums run in another order when BLAS blocks a larger batch, so a
        # probability may differ in its last bits (1e-6 is ~10 float32 ulps at 1.0); the
        # labels must agree exactly.
        np.testing.assert_allclose(out["probabilities"], alone["probabilities"], rtol=0,
                                   atol=1e-6)
        np.testing.assert_array_equal(out["label"], alone["label"])
    assert sum(batches) == sum(len(x) for x in inputs)
    assert len(batches) < len(inputs)  # gathered
    assert max(batches) <= 16  # and never over the limit


def test_a_lone_request_runs_on_the_loop_only_while_its_forward_is_short():
    """Lone requests' forwards run on the event loop's thread while they are short; once a
    forward is seen to take 20 ms, the next lone ones go to the inference thread (the loop
    stays free for health checks, connections and timers)."""
    threads: list[str] = []

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        threads.append(threading.current_thread().name)
        time.sleep(0.02 if len(threads) > 2 else 0)
        return {"y": x}

    async def main():
        b = Batcher(model, arriving=lambda: 0)  # nothing else on its way: each is alone
        b.start()
        try:
            for _ in range(5):
                await b.submit(np.ones((1, 3)), 5)
        finally:
            await b.stop()

    _run(main())
    loop_thread = threading.current_thread().name
    # short: on the loop's thread (the first for sure; the next two unless this loaded
    # machine preempted a forward for 5 ms, which counts as a long forward)
    assert threads[0] == loop_thread
    assert loop_thread not in threads[4:]  # the third took 20 ms: off the loop from then on


def test_a_request_that_finds_the_model_idle_runs_at_once_without_a_turn_of_the_loop():
    """No hand-off to the batcher's task and back: the answer comes before anything else
    the loop had scheduled runs."""
    model, order = Model(), []

    async def main():
        b = Batcher(model, arriving=lambda: 0)
        b.start()
        try:
            await asyncio.sleep(0)  # the batcher's task is waiting for work
            asyncio.get_running_loop().call_soon(order.append, "scheduled before")
            await b.submit(np.ones((1, 3)), 5)
            order.append("answered")
        finally:
            await b.stop()

    _run(main())
    assert model.calls == [1]
    assert order == ["answered", "scheduled before"]


def test_requests_that_start_in_one_turn_of_the_loop_are_batched_not_run_alone():
    """A burst read together: the first runs at once, the rest form one batch (run alone
    each, a cheap model's requests would never batch under load)."""
    model = Model()

    async def main():
        b = Batcher(model, max_delay_s=0, arriving=lambda: 0)
        b.start()
        try:
            await asyncio.sleep(0)
            await asyncio.gather(*[b.submit(np.ones((1, 3)), 5) for _ in range(8)])
            await asyncio.sleep(0)  # a later turn: alone again
            await b.submit(np.ones((1, 3)), 5)
        finally:
            await b.stop()

    _run(main())
    assert model.calls == [1, 7, 1]


def test_a_closed_loop_settles_into_full_batches_not_one_and_the_rest():
    """Eight clients, each sending again once answered, to a model whose forward takes
    10 ms: the one request queued during a big batch waits (at most half a forward) for the
    big batch's clients to come back instead of running alone, so batches settle at eight
    rows rather than alternating one and seven."""
    model = Model(delay=0.01)

    async def client(b: Batcher) -> None:
        for _ in range(12):
            await b.submit(np.ones((1, 3)), 5)

    async def main():
        b = Batcher(model, max_delay_s=0, arriving=lambda: 0)
        b.start()
        try:
            first = asyncio.ensure_future(client(b))  # alone at first: the model idle
            await asyncio.sleep(0.002)
            await asyncio.gather(first, *[client(b) for _ in range(7)])
        finally:
            await b.stop()

    _run(main())
    assert model.calls[2:].count(8) >= 8, model.calls  # without the wait: 1, 7, 1, 7, ...


def test_without_batching_each_request_runs_alone():
    model = Model()

    async def main():
        b = Batcher(model, batching=False)
        b.start()
        try:
            await asyncio.gather(*[b.submit(np.ones((2, 3)), 5) for _ in range(10)])
        finally:
            await b.stop()

    _run(main())
    assert model.calls == [2] * 10


def test_full_queue_refuses_at_once_and_late_requests_are_dropped_unrun():
    model = Model(delay=0.2)
    dropped: list[int] = []

    async def main():
        b = Batcher(model, max_batch_size=4, max_delay_s=0, max_queue_rows=8,
                    on_drop=dropped.append)
        b.start()
        try:
            first = asyncio.create_task(b.submit(np.ones((4, 3)), 5))  # runs for 0.2 s
            await asyncio.sleep(0.05)
            late = [asyncio.create_task(b.submit(np.zeros((4, 3)), 0.05)) for _ in range(2)]
            await asyncio.sleep(0)
            # Refused at once: the call raises on its first step, without waiting for
            # anything, and queues nothing.
            refused = b.submit(np.ones((1, 3)), 5)
            with pytest.raises(OverloadedError):
                refused.send(None)
            assert b.queued_rows == 8
            for t in late:
                with pytest.raises(DeadlineExceededError):
                    await t
            await first
            await asyncio.sleep(0.05)
            return b.queued_rows
        finally:
            await b.stop()

    assert _run(main()) == 0
    assert model.calls == [4]  # the two that timed out in the queue never ran
    assert sum(dropped) == 2  # and the batcher says it dropped them


def test_int8_serving_logs_the_accuracy_change_and_agrees(tmp_path, tiny_raw, caplog):
    cfg = make_config(tiny_raw)
    manifest = ingest(cfg.data, tmp_path / "data", seed=0)
    val = SplitTensors.load(manifest, "val")
    result = train_candidate(cfg, cfg.train.candidates[0], manifest, val=val,
                             run=RunDir(tmp_path / "out"))
    with caplog.at_level(logging.INFO, logger="distml"):
        q = load_served_model(result["artifact"], registry=tmp_path, quantize="int8")
    f = load_served_model(result["artifact"], registry=tmp_path)
    message = next(r.getMessage() for r in caplog.records if r.name == "distml.serving.model")
    assert "validation accuracy" in message
    assert q.quantized
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in
               q.artifact.model.modules())
    raw = np.random.default_rng(0).uniform(0, 16, (200, 64)).astype(np.float32)
    agree = (q.infer(raw)["label"] == f.infer(raw)["label"]).mean()
    assert agree > 0.9


def test_an_artifact_without_its_data_still_serves_int8(tmp_path, tiny_raw, caplog):
    cfg = make_config(tiny_raw)
    manifest = ingest(cfg.data, tmp_path / "data", seed=0)
    result = train_candidate(cfg, cfg.train.candidates[0], manifest,
                             val=SplitTensors.load(manifest, "val"), run=RunDir(tmp_path / "out"))
    served = load_served_model(result["artifact"], registry=tmp_path)
    spec = {**served.spec, "data_dir": str(tmp_path / "gone")}
    save_artifact(served.artifact.model, spec, tmp_path / "moved")
    with caplog.at_level(logging.WARNING, logger="distml"):
        load_served_model(str(tmp_path / "moved"), registry=tmp_path, quantize="int8")
    assert "no validation split" in caplog.text


# -- the protocol's codecs -------------------------------------------------------------------

_VALUES = {"BOOL": [True, False, True, True], "UINT8": [0, 1, 200, 255],
           "UINT16": [0, 1, 60000, 7], "UINT32": [0, 1, 2**32 - 1, 7],
           "UINT64": [0, 1, 2**64 - 1, 7], "INT8": [-128, 0, 5, 127],
           "INT16": [-(2**15), 0, 5, 2**15 - 1], "INT32": [-(2**31), 0, 5, 2**31 - 1],
           "INT64": [-(2**63), 0, 5, 2**63 - 1], "FP16": [0.5, -2.0, 65504.0, 1e-3],
           "FP32": [0.1, -2.5, 3.4e38, 1e-30], "FP64": [0.1, -2.5, 1e300, 1e-300],
           "BYTES": ["a", "", "héllo", "x" * 300]}


@pytest.mark.parametrize("datatype", list(_VALUES))
def test_every_datatype_round_trips_through_raw_bytes_and_json(datatype):
    values = _VALUES[datatype]
    from_json = decode_json([values[:2], values[2:]], datatype, [2, 2], "t")
    assert datatype_of(from_json) == datatype
    raw = encode_raw(from_json)
    from_raw = decode_raw(raw, datatype, [2, 2], "t")
    np.testing.assert_array_equal(from_raw, from_json)
    exact = {"FP16": np.float16, "FP32": np.float32}.get(datatype)  # as the type holds them
    assert json_values(from_raw) == ([float(exact(v)) for v in values] if exact else values)
    if datatype == "BYTES":  # each element: a 4-byte little-endian length, then its bytes
        assert raw[:4] == (1).to_bytes(4, "little")
        assert len(raw) == 4 * 4 + sum(len(v.encode()) for v in values)
    else:
        assert len(raw) == 4 * NUMERIC[datatype].itemsize


@pytest.mark.parametrize(("data", "datatype", "raw", "message"), [
    ([300, 1], "UINT8", None, "out of the range of UINT8"),
    ([1.5, 1], "INT32", None, "1.5 is not a INT32 value"),
    ([True, 1], "FP32", None, "True is not a FP32 value"),
    ([[1], 2], "FP32", None, "mixes lists and values"),
    (None, "FP32", b"\0" * 7, "7 bytes of data, but shape [2] of FP32 needs 8"),
    (None, "BOOL", b"\x00\x02", "BOOL bytes must be 0 or 1"),
    (None, "BYTES", b"\x05\0\0\0ab", "declares 5 bytes; only 2 are left"),
    (None, "BYTES", b"\x01\0\0\0a\x01\0\0\0bc", "1 bytes left after the 2 BYTES"),
])
def test_wrong_tensor_data_is_a_400_naming_it(data, datatype, raw, message):
    def decode():
        if raw is None:
            return decode_json(data, datatype, [2], "inputs[0]")
        return decode_raw(raw, datatype, [2], "inputs[0]")

    with pytest.raises(ProtocolError, match=re.escape(message)) as e:
        decode()
    assert e.value.status == 400


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_the_json_fast_path_decodes_exactly_what_the_checked_path_does(datatype):
    # numpy's one-pass conversion (numbers_only: no JSON boolean in the text) against the
    # element-wise checks: the same array for numbers; for anything else the same error.
    rng = np.random.default_rng(0)
    good = [rng.normal(size=(8, 5)).tolist(), [[1, 2.5], [3, 4]], [1, 2, 3, 4],
            [[2**70, 1.0]], [[0.1, 1e-45], [3.4e38, -0.0]], []]
    for data in good:
        shape = list(np.shape(data)) if data else [0, 2]
        fast = decode_json(data, datatype, shape, "t", numbers_only=True)
        checked = decode_json(data, datatype, shape, "t")
        assert fast.dtype == checked.dtype
        assert fast.shape == checked.shape
        np.testing.assert_array_equal(fast, checked)
    bad = [([["a", 1.0]], [1, 2], "'a' is not a"), ([[None, 1.0]], [1, 2], "None is not a"),
           ([[1.0], 2.0], [2], "mixes lists and values"),
           ([[1.0, 2.0]], [1, 3], "2 elements in data"), ([{"a": 1}, 2], [2], "is not a")]
    for data, shape, message in bad:
        with pytest.raises(ProtocolError, match=re.escape(message)):
            decode_json(data, datatype, shape, "t", numbers_only=True)


def test_a_model_input_takes_the_datatypes_it_holds_exactly():
    assert accepted_datatypes("FP32") == ["BOOL", "UINT8", "UINT16", "INT8", "INT16", "FP16",
                                          "FP32"]
    assert "INT64" in accepted_datatypes("INT64")
    assert "UINT64" not in accepted_datatypes("INT64")  # 2**64 - 1 does not fit


def test_the_openapi_document_covers_every_rest_route(served):
    doc = yaml.safe_load((resources.files("distml.serving") / "openapi.yaml").read_text())
    app = create_app(served, ServeConfig())
    routes = {(m.lower(), r.path) for r in app.routes if isinstance(r, APIRoute)
              for m in r.methods}
    routes |= {("post", r.path) for r in INFER_ROUTES}  # answered before FastAPI's routing
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert routes == documented
