"""Storage URLs against a real S3 API server (moto's server mode on loopback): the digits
job with its source, run folder and registry on S3; serving from an S3 registry with hot
reload; a publisher killed mid-upload; wrong credentials and a missing bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits

from distml import storage
from distml.registry import Registry
from tests.helpers.artifacts import small_artifact
from tests.helpers.cli import distml
from tests.helpers.configs import TINY, write_config
from tests.helpers.s3 import environment, make_bucket, moto_server, s3_env
from tests.helpers.serving import infer_body, running_server

pytestmark = pytest.mark.xdist_group("s3")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server's endpoint, with this process's environment pointing at it (and a mirror
    cache in a temporary folder); yields the env a subprocess needs."""
    cache = tmp_path_factory.mktemp("cache")
    with moto_server() as endpoint:
        env = s3_env(endpoint, DISTML_CACHE=str(cache))
        with environment(env):
            make_bucket("data")
            make_bucket("out")
            yield env


def _put_digits(prefix: str) -> None:
    """The digits data set as two Parquet objects under s3://data/<prefix>/."""
    x, y = load_digits(return_X_y=True)
    fs = storage.filesystem("s3://data")
    for i, rows in enumerate(np.array_split(np.arange(len(y)), 2)):
        table = pa.table({**{f"p{j}": x[rows, j] for j in range(x.shape[1])}, "label": y[rows]})
        with fs.open(f"data/{prefix}/part-{i}.parquet", "wb") as f:
            pq.write_table(table, f)


def test_the_digits_job_runs_with_source_runs_and_registry_on_s3(s3, tmp_path):
    _put_digits("digits")
    raw = {**TINY, "data": {"source": "s3://data/digits/*.parquet"},
           "output_dir": "s3://out/runs", "registry": "s3://out/registry"}
    raw["train"] = {**TINY["train"], "epochs": 1, "candidates": TINY["train"]["candidates"][:1]}
    distml("run", str(write_config(tmp_path / "c.yaml", raw)), "-q", cwd=tmp_path, env=s3)

    fs = storage.filesystem("s3://out")
    runs = [p for p in fs.ls("out/runs/tiny") if p.rsplit("/", 1)[-1].startswith("2")]
    assert len(runs) == 1
    summary = json.loads(fs.cat_file(f"{runs[0]}/summary.json"))
    assert fs.exists(f"{runs[0]}/{storage.MARKER}")
    version = summary["data"]["version"]
    inputs = summary["data"]["lineage"]["inputs"]
    assert [i["path"] for i in inputs] == [f"s3://data/digits/part-{i}.parquet" for i in (0, 1)]
    assert all(i["etag"] for i in inputs)
    manifest = json.loads(fs.cat_file(f"out/runs/tiny/data-{version}/manifest.json"))
    assert manifest["version"] == version
    assert fs.exists(f"out/registry/tiny/v1/{storage.MARKER}")
    # The checkpoints went to the store through DCP's fsspec writer, each one published.
    assert fs.glob(f"{runs[0]}/candidates/small/checkpoints/step-*/{storage.MARKER}")
    config = fs.cat_file(f"{runs[0]}/config.yaml").decode()
    assert "output_dir: s3://out/runs" in config  # the URL, not the local mirror's path
    for key in (f"{runs[0]}/config.yaml", f"{runs[0]}/summary.json",
                "out/registry/tiny/audit.jsonl", "out/registry/tiny/v1/spec.json"):
        assert b"testing" not in fs.cat_file(key)  # the secret key is nowhere

    shown = distml("models", "show", "tiny", "--registry", "s3://out/registry", cwd=tmp_path,
                   env=s3).stdout
    assert version in shown
    assert "part-1.parquet" in shown
    listed = distml("data", "versions", "--output-dir", "s3://out/runs", cwd=tmp_path,
                    env=s3).stdout
    assert version in listed


def test_serve_follows_an_s3_registry(s3, tmp_path):
    reg = Registry("s3://out/reg-serve")
    _, a1 = small_artifact(tmp_path, "a1", seed=0)
    _, a2 = small_artifact(tmp_path, "a2", seed=1)
    reg.register(a1, "m")
    reg.set_alias("m", "production", 1)
    reg.register(a2, "m")
    x = np.ones((2, 3), np.float32)
    # The server has its own mirror, as on another machine: it learns of the promotion
    # from the store only.
    server_env = {**s3, "DISTML_CACHE": str(tmp_path / "server-cache")}
    with running_server("m@production", "--registry", "s3://out/reg-serve",
                        "--reload-interval", "0.5", cwd=tmp_path,
                        env=server_env) as (url, _, lines):
        r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(x))
        assert r.json()["model_version"] == "1"
        distml("models", "promote", "m", "2", "--registry", "s3://out/reg-serve",
               cwd=tmp_path, env=s3)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(x))
            if r.json()["model_version"] == "2":
                break
            time.sleep(0.2)
        assert r.json()["model_version"] == "2", "".join(lines)


def test_predict_reads_and_writes_s3(s3, tmp_path):
    from distml.serving.predict import predict

    _, artifact = small_artifact(tmp_path, "a")
    Registry("s3://out/reg-predict").register(artifact, "m")
    rows = pa.table({"a": [1.0, 2.0, 3.0], "b": [0.0, 1.0, 2.0], "c": [5.0, 4.0, 3.0]})
    with storage.filesystem("s3://data").open("data/predict-in/x.parquet", "wb") as f:
        pq.write_table(rows, f, row_group_size=2)
    done = predict("m", "s3://data/predict-in/", "s3://out/pred/out.parquet",
                   registry="s3://out/reg-predict")
    assert (done["rows"], done["parts"], done["output"]) == (3, 2, "s3://out/pred/out.parquet")
    with storage.filesystem("s3://out").open("out/pred/out.parquet", "rb") as f:
        got = pq.read_table(f)
    assert got["row_id"].to_pylist() == [0, 1, 2]
    assert set(got["label"].to_pylist()) <= {"no", "yes"}

    from distml.workflow.drift_report import read_input  # distml monitor's input

    columns, _ = read_input("s3://data/predict-in/", ["a", "c"], None)
    assert columns["c"].tolist() == [5.0, 4.0, 3.0]


def test_a_landing_prefix_is_mirrored_object_by_object(s3, tmp_path):
    from distml.workflow.watch import SUFFIXES, landed

    fs = storage.filesystem("s3://data")
    fs.pipe_file("data/landing/b.csv", b"a,label\n1,0\n")
    time.sleep(1.1)  # S3's LastModified has whole seconds
    fs.pipe_file("data/landing/a.csv", b"a,label\n2,1\n")
    fs.pipe_file("data/landing/notes.txt", b"not data")
    local = tmp_path / "landing"
    new = storage.mirror_objects("s3://data/landing/", local, suffixes=SUFFIXES)
    assert sorted(p.name for p in new) == ["a.csv", "b.csv"]
    assert [p.name for p in landed(local)] == ["b.csv", "a.csv"]  # in landing order
    fs.pipe_file("data/landing/c.csv", b"a,label\n3,0\n")
    assert [p.name for p in storage.mirror_objects("s3://data/landing", local,
                                                   suffixes=SUFFIXES)] == ["c.csv"]
    from distml.data.tables import read_table  # a CSV object read in place

    assert read_table("s3://data/landing/c.csv").to_pydict() == {"a": [3], "label": [0]}
    with pytest.raises(storage.StorageError, match="'..' are not allowed"):
        storage.local_path("s3://data/../../etc")


_PUBLISHER = """
import sys, time
from pathlib import Path
from distml import storage
def hang(key):
    print("uploaded", key, flush=True)
    time.sleep(600)
storage.publish_dir(Path(sys.argv[1]), sys.argv[2], exclusive=True, on_uploaded=hang)
"""


def _killed_mid_upload(folder, url, env) -> None:
    """Publish ``folder`` to ``url`` in a process killed (SIGKILL) after its first object."""
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(folder), url],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert proc.stdout.readline().startswith("uploaded")
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_kill_during_upload_leaves_nothing_that_loads(s3, tmp_path):
    _, artifact = small_artifact(tmp_path, "a")
    _killed_mid_upload(artifact, "s3://out/reg-kill/k/v1", s3)
    reg = Registry("s3://out/reg-kill")
    assert reg.names() == []
    with pytest.raises(Exception, match="no model 'k'"):
        reg.resolve("k")
    # the dead upload claimed v1 (nobody can tell it from a slow one): never reused
    assert reg.register(artifact, "k").version == 2

    logs = tmp_path / "run" / "logs" / "c"  # a run folder published as its run ends
    logs.mkdir(parents=True)
    for i in range(3):
        (logs / f"rank-{i}.log").write_bytes(os.urandom(1000))
    _killed_mid_upload(tmp_path / "run", "s3://out/runs-kill/run", s3)
    assert storage.read_marker("s3://out/runs-kill/run") is None
    assert storage.fetch_dir("s3://out/runs-kill/run", tmp_path / "fetched") is False
    assert not (tmp_path / "fetched").exists()


_CHECKPOINTER = """
import sys, time
import torch
from distml import storage
from distml.distributed import checkpoint
from distml.distributed.runtime import DistEnv

out = storage.local_path(sys.argv[1])  # a run's checkpoints folder under s3://
def save(step, value):
    checkpoint.save_checkpoint(out, step, sharded={"w": torch.full((4,), value)},
                               rank_state={"step": step}, extra={"e": step}, env=DistEnv(),
                               keep=2)
save(1, 1.0)
# The second save is killed after every rank wrote its objects, before the marker: the
# worst moment for a checkpoint on a store without rename.
def stall(url):
    print("writing", flush=True)
    time.sleep(600)
storage.mark_published = stall
save(2, 2.0)
"""


def test_a_kill_during_a_checkpoint_upload_leaves_the_previous_one(s3, tmp_path):
    from distml.distributed.checkpoint import checkpoint_paths, load_sharded, read_rank_state
    from distml.distributed.runtime import DistEnv

    url = "s3://out/runs/x/20260101-000000/candidates/c/checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", _CHECKPOINTER, url],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **s3})
    try:
        assert proc.stdout.readline().strip() == "writing"
        fs = storage.filesystem(url)
        assert fs.exists(url.split("://")[1] + "/step-00000002/.metadata")  # all but marked
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    (last,) = checkpoint_paths(storage.local_path(url))  # the unmarked one is not one
    assert last == f"{url}/step-00000001"
    state = load_sharded(last, {"w": torch.zeros(4)})
    assert torch.equal(state["w"], torch.full((4,), 1.0))
    assert state["extra"] == {"e": 1}
    assert read_rank_state(last, DistEnv())["step"] == 1


def test_a_missing_bucket_and_wrong_credentials_are_one_clear_line(s3, tmp_path):
    out = distml("data", "versions", "--output-dir", "s3://no-such-bucket/runs",
                 cwd=tmp_path, env=s3, check=False)
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "\n" not in line
    assert "s3://no-such-bucket/runs" in line
    assert "does not exist" in line
    with moto_server() as endpoint:  # a server that checks credentials
        env = s3_env(endpoint, DISTML_CACHE=s3["DISTML_CACHE"])
        with environment(env):
            make_bucket("locked")
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0")
        out = distml("data", "versions", "--output-dir", "s3://locked/runs", cwd=tmp_path,
                     env={**env, "AWS_ACCESS_KEY_ID": "wrong"}, check=False)
    line = out.stderr.strip()
    assert out.returncode == 2
    assert "\n" not in line
    assert "s3://locked/runs" in line
    assert "AWS_ACCESS_KEY_ID" in line
    assert "wrong" not in line.split(";")[0].replace("wrong credentials", "")


def test_a_writer_that_loses_the_claim_writes_nothing(s3, tmp_path):
    """Two exclusive publishers of one folder (two registrations of the same version
    number): the second is refused before it uploads anything, so the first's files stay
    whole; a registration that finds its number claimed takes the next."""
    _, first = small_artifact(tmp_path, "first")
    _, second = small_artifact(tmp_path, "second", seed=1)
    storage.publish_dir(first, "s3://out/reg-race/m/v1", exclusive=True)
    with pytest.raises(FileExistsError):
        storage.publish_dir(second, "s3://out/reg-race/m/v1", exclusive=True)
    assert storage.fetch_dir("s3://out/reg-race/m/v1", tmp_path / "v1")  # digests still match
    assert (tmp_path / "v1" / "model.safetensors").read_bytes() == \
        (first / "model.safetensors").read_bytes()
    storage.filesystem("s3://out").pipe_file(f"out/reg-race/m/v2/{storage.CLAIM}", b"",
                                              mode="create")  # a racer's claim, unpublished
    assert Registry("s3://out/reg-race").register(second, "m").version == 3
