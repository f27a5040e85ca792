"""Hot reload on a real ``distml serve name@production``: a new version promoted while clients
send requests continuously, and the model repository routes (index, load, unload)."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from distml.artifact import load_artifact, save_artifact
from distml.registry import Registry
from tests.helpers.serving import infer_body, running_server


@pytest.fixture
def registry(trained, tmp_path):
    """A copy of the session's registry (tiny:1 in production) with tiny:2 registered, not
    promoted: v1's model with other weights, so a reload that kept v1's shows."""
    root, _ = trained
    shutil.copytree(root / "registry", tmp_path / "registry")
    reg = Registry(tmp_path / "registry")
    v1 = load_artifact(reg.get("tiny", 1).path)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in v1.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std())
    v2 = save_artifact(v1.model, v1.spec, tmp_path / "v2")
    assert reg.register(v2, "tiny").version == 2
    return reg


def _expected(registry: Registry, version: int, x: np.ndarray) -> np.ndarray:
    """Version ``version``'s class probabilities for rows ``x``, computed here."""
    return load_artifact(registry.get("tiny", version).path).predict(x)


def _clients(url: str, x: np.ndarray, stop: threading.Event, results: list) -> list:
    """Clients that send requests back to back until ``stop``; each outcome is (sent,
    received, status, model_version or error) and is checked on the test's thread."""
    def client(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(f"{url}/v2/models/tiny/infer", json=infer_body(x[i:i + 2]))
                    ok = r.status_code == 200
                    version = r.json().get("model_version") if ok else r.text
                    probs = np.asarray(r.json()["outputs"][0]["data"]).reshape(2, -1) \
                        if ok else None
                    results.append((sent, time.monotonic(), r.status_code, version, i, probs))
                except httpx.HTTPError as e:
                    results.append((sent, time.monotonic(), type(e).__name__, str(e), i, None))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    return threads


def test_promoting_a_version_switches_within_5_s_and_fails_no_request(trained, registry,
                                                                       tmp_path):
    _, x = trained
    with running_server("tiny@production", "--registry", str(registry.root),
                        cwd=tmp_path) as (url, _, lines):
        results: list = []
        stop = threading.Event()
        threads = _clients(url, x, stop, results)
        try:
            time.sleep(1.5)
            moved = time.monotonic()
            registry.set_alias("tiny", "production", 2)
            deadline = moved + 15
            while time.monotonic() < deadline and not any(r[3] == "2" for r in results):
                time.sleep(0.05)
            time.sleep(1)  # and some more traffic on the new version
        finally:
            stop.set()
            for t in threads:
                t.join()
        meta = httpx.get(f"{url}/v2/models/tiny").json()
        metrics = httpx.get(f"{url}/metrics").text
    failed = [r for r in results if r[2] != 200]
    assert not failed, failed[:3]
    assert {r[3] for r in results} == {"1", "2"}
    # Each answer is its version's model's: the new weights answer after the switch.
    expected = {v: _expected(registry, v, x[:4]) for v in (1, 2)}
    assert np.abs(expected[1] - expected[2]).max() > 0.1  # the versions really differ
    for *_, version, i, probs in results:
        np.testing.assert_allclose(probs, expected[int(version)][i:i + 2], rtol=1e-4,
                                   atol=1e-5)
    switched = min(r[1] for r in results if r[3] == "2")
    assert switched - moved < 5, f"the new version answered {switched - moved:.1f} s after the move"
    # Once a client saw the new version, no request sent after that got the old one.
    assert not [r for r in results if r[0] > switched and r[3] == "1"]
    assert sum(1 for r in results if r[0] < moved) > 10  # traffic did flow before the move
    assert meta["versions"] == ["2"]
    assert 'distml_model_info{model="tiny",quantized="false",version="2"} 1.0' in metrics
    assert 'distml_model_info{model="tiny",quantized="false",version="1"} 0.0' in metrics
    assert "now serving tiny:2 (was 1)" in "".join(lines)


@pytest.mark.parametrize("replicas", [1, 2])
def test_repository_routes_unload_load_and_index(trained, registry, tmp_path, replicas):
    _, x = trained
    with running_server("tiny@production", "--registry", str(registry.root), "--replicas",
                        str(replicas), cwd=tmp_path) as (url, _, _), \
            httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v2/repository/index").json() == [
            {"name": "tiny", "version": "1", "state": "READY"}]
        assert c.post("/v2/repository/models/tiny/unload").status_code == 200
        for _ in range(2 * replicas):  # every replica unloaded it
            r = c.post("/v2/models/tiny/infer", json=infer_body(x[:1]))
            assert r.status_code == 404
            assert "is unloaded" in r.json()["error"]
        assert c.get("/v2/models/tiny/ready").status_code == 404
        assert c.post("/v2/repository/index", json={"ready": True}).json() == []
        assert c.post("/v2/repository/index").json()[0]["state"] == "UNAVAILABLE"
        registry.set_alias("tiny", "production", 2)
        loaded = c.post("/v2/repository/models/tiny/load")
        assert loaded.json() == {"name": "tiny", "version": "2", "state": "READY"}
        for _ in range(2 * replicas):
            r = c.post("/v2/models/tiny/infer", json=infer_body(x[:1]))
            assert r.status_code == 200
            assert r.json()["model_version"] == "2"
        assert c.get("/v2/models/tiny").json()["versions"] == ["2"]
        assert c.post("/v2/repository/models/other/load").status_code == 404
