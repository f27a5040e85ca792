"""Elastic training on three network-namespace nodes: two jobs at once, each resized twice.

- ddp, ``--nnodes 2:3``: node-c joins mid-run (2 -> 3 ranks), then is killed (3 -> 2);
- fsdp, ``--nnodes 1:2``: node-b's agent and ranks are killed (2 -> 1), then it comes back
  (1 -> 2).

Each ends with every row of each epoch used exactly once (the ranks' per-row counts, summed
over ranks and carried across restarts in the checkpoints), every change recorded, and final
weights within verify's fp32 tolerance (1e-4, relative per tensor) of the same job run in one
go on one machine at 2 ranks. The reference is that fixed-size run: an elastic job's steps
take the same rows at every world size (a global deal by step, fixed global batch), so only
the order of the float sums differs between them, not which samples make each step; a run
"with the same world sizes at the same steps" would differ from it in that order alone too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from bench.elastic import kill_tree
from safetensors.torch import load_file

from tests.helpers.multihost.engines import node_env
from tests.helpers.multihost.jobs import CONFIG, ENV, start_agent, wait_all
from tests.helpers.multihost.netns import Cluster, Node, kill_group

pytestmark = pytest.mark.multihost

RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3"


def _config(root: Path, name: str, strategy: str, nodes: tuple[int, int]) -> Path:
    raw = json.loads(json.dumps(CONFIG))
    raw["train"].update(batch_size=48, checkpoint_every_steps=3, max_restarts=3)
    raw["data"]["loader"]["map_fn"] = "tests.helpers.slow:paced"
    raw["train"]["parallel"] = {"strategy": strategy, "world_size": 2, "num_nodes": 2,
                                "min_nodes": nodes[0], "max_nodes": nodes[1]}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "output_dir": str(root / name)}))
    return path


@pytest.fixture(scope="module")
def three() -> Iterator[Cluster]:
    with Cluster(("node-a", "node-b", "node-c")) as made:
        yield made


class Job:
    def __init__(self, root: Path, name: str, port: int, nodes: tuple[int, int],
                 strategy: str, rdzv_conf: str = RDZV_CONF) -> None:
        self.root, self.name = root, name
        _config(root, name, strategy, nodes)
        self.argv = lambda a: [
            sys.executable, "-m", "distml", "train", f"{name}.yaml", "--quiet",
            "--rdzv-endpoint", f"{a.addr}:{port}", "--nnodes", f"{nodes[0]}:{nodes[1]}",
            "--rdzv-id", name, "--rdzv-conf", rdzv_conf]
        self.port = port
        self.agents: dict[str, subprocess.Popen] = {}
        self.pace_file = root / f"{name}.pace"
        self.pace(0.3)  # slow enough for the test to act mid-run; fast once it is done

    def pace(self, seconds: float) -> None:
        """Seconds each batch takes (tests.helpers.slow:paced): slow while a node joins."""
        self.pace_file.write_text(str(seconds))

    def start(self, node: Node, master: Node) -> None:
        self.agents[node.hostname] = start_agent(
            node, self.argv(master), self.root, f"{self.name}-{node.hostname}.log",
            DISTML_TEST_PACE=str(self.pace_file))

    def folder(self) -> Path | None:
        found = sorted((self.root / self.name).glob("mh/2*/candidates/small"))
        return found[-1] if found else None

    def last(self) -> dict:
        try:
            return json.loads((self.folder() / "checkpoints/last-step.json").read_text())
        except (OSError, ValueError, TypeError):
            return {"step": 0, "world_size": 0}

    def wait_for(self, ok: Callable[[dict], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ok(self.last()):
            if time.monotonic() > deadline or all(
                    p.poll() is not None for p in self.agents.values()):
                wait_all(list(self.agents.values()), self.root, timeout=1)
                raise AssertionError(f"{self.name}: {what} did not happen")
            time.sleep(0.05)

    def result(self) -> dict:
        return json.loads((self.folder() / "result.json").read_text())


def _reference(root: Path) -> subprocess.Popen:
    """Both jobs on one machine at 2 ranks, in one go (distml's local launcher)."""
    script = " && ".join(
        f"{sys.executable} -m distml train {n}.yaml --quiet --set output_dir={root / 'one' / n}"
        for n in ("ddp", "fsdp"))
    return subprocess.Popen(["bash", "-c", script], cwd=root, env=node_env(**ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _assert_close(root: Path, job: Job) -> None:
    (ref,) = (root / "one" / job.name).glob("mh/2*/candidates/small/artifact/model.safetensors")
    a, b = load_file(ref), load_file(job.folder() / "artifact" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((b[k] - v).norm() / v.norm()) for k, v in a.items())
    assert diff < 1e-4, (job.name, diff)


def _assert_counted(job: Job, sizes: list[tuple[int, int]]) -> None:
    elastic = job.result()["elastic"]
    changes = [(c["old_world_size"], c["new_world_size"]) for c in elastic["membership_changes"]]
    assert changes == sizes, elastic["membership_changes"]
    epochs = elastic["epoch_samples"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:  # every row of the epoch, exactly once
        assert (e["min_uses"], e["max_uses"], e["unused"], e["repeated"]) == (1, 1, 0, 0), e


def test_ddp_2_3_2_and_fsdp_2_1_2_use_every_sample_once(three: Cluster, tmp_path: Path):
    a, b, c = three["node-a"], three["node-b"], three["node-c"]
    ddp = Job(tmp_path, "ddp", 29410, (2, 3), "ddp")
    # (at 1 node the job could start without node-b: it waits 8 s for more first)
    fsdp = Job(tmp_path, "fsdp", 29411, (1, 2), "fsdp", f"{RDZV_CONF},last_call_timeout=8")
    reference = _reference(tmp_path)
    try:
        for job in (ddp, fsdp):
            job.start(a, a)
            a.wait_listening(job.port)
            job.start(b, a)
        ddp.wait_for(lambda s: s["step"] >= 6, "step 6")
        ddp.pace(1.0)  # (so that the job is still running when node-c's agent is up)
        ddp.start(c, a)  # node-c joins: the ranks checkpoint, leave, re-form at 3
        fsdp.wait_for(lambda s: s["step"] >= 6 and s["world_size"] == 2, "step 6")
        fsdp.pace(1.0)
        kill_tree(fsdp.agents.pop("node-b").pid)  # node-b leaves the fsdp job: 2 -> 1
        ddp.wait_for(lambda s: s["world_size"] == 3, "3 ranks")
        ddp.pace(0.3)
        ddp.wait_for(lambda s: s["step"] >= 20, "step 20 on 3 ranks")
        c.kill_all()  # node-c is gone: 3 -> 2
        ddp.pace(0.0)
        fsdp.wait_for(lambda s: s["world_size"] == 1, "1 rank")
        fsdp.start(b, a)  # node-b is back: 1 -> 2
        fsdp.wait_for(lambda s: s["world_size"] == 2 and s["step"] > 6, "2 ranks again")
        fsdp.pace(0.0)
        wait_all([ddp.agents["node-a"], ddp.agents["node-b"], fsdp.agents["node-a"],
                  fsdp.agents["node-b"]], tmp_path)
        out, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, out
    finally:
        kill_group(reference)
    _assert_counted(ddp, [(2, 3), (3, 2)])
    _assert_counted(fsdp, [(2, 1), (1, 2)])
    # a join checkpoints at the change: no step is lost
    joins = [ddp.result()["elastic"]["membership_changes"][0],
             fsdp.result()["elastic"]["membership_changes"][1]]
    assert [j["steps_lost"] for j in joins] == [0, 0], joins
    for job in (ddp, fsdp):
        _assert_close(tmp_path, job)
