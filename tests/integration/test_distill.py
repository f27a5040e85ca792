"""Distillation through the real pipeline: teachers first, a student that matches plain
training at alpha = 0, distributed students certified by verify, language models taught
online, and a student of registered teachers served over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from distml.errors import ConfigError
from distml.workflow.pipeline import run_pipeline, train_only
from tests.helpers.cli import distml
from tests.helpers.configs import make_config, small_lm_config, write_config
from tests.helpers.serving import running_server

ROOT = Path(__file__).parents[2]
SMALL = {"type": "mlp", "hidden_sizes": [16]}


def _quiet(raw: dict) -> dict:
    raw["monitor"] = {"tensorboard": False, "system_metrics_interval_s": None}
    raw["execution"] = {"num_workers": 2}
    return raw


def _weights(run_dir: Path, name: str) -> dict:
    return load_file(run_dir / "candidates" / name / "artifact" / "model.safetensors")


def test_alpha_zero_trains_bit_for_bit_like_the_student_alone(tmp_path, tiny_raw):
    (tmp_path / "nets.py").write_text(
        "import torch\n"
        "def linear(*, in_features, num_outputs):\n"
        "    return torch.nn.Linear(in_features, num_outputs)\n")
    tiny_raw["data"]["transforms"] = ["standardize"]
    tiny_raw["train"]["candidates"] = [  # students listed before their teachers
        {"name": "kd0", "model": SMALL, "distill": {"teacher": "teacher", "alpha": 0.0}},
        {"name": "kd", "model": SMALL,
         "distill": {"teacher": ["teacher", "user"], "temperature": 2}},
        {"name": "alone", "model": SMALL},
        {"name": "cnn-kd", "model": {"type": "cnn", "channels": [4], "hidden_size": 16},
         "distill": {"teacher": "teacher"}},
        {"name": "user-kd", "model": {"type": "nets.py:linear"}, "distill": {"teacher": "kd"}},
        {"name": "teacher", "model": {"type": "mlp", "hidden_sizes": [64]}},
        {"name": "user", "model": {"type": "nets.py:linear"}},
    ]
    run, summary = run_pipeline(make_config(_quiet(tiny_raw), base_dir=tmp_path))
    results = {c["name"]: c for c in summary["candidates"]}
    assert len(results) == 7  # ranked together
    assert results["user-kd"]["val"]["accuracy"] > 0.5  # a student of a student, too
    alone, kd0, kd = (_weights(run.folder.path, n) for n in ("alone", "kd0", "kd"))
    assert all((alone[k] == kd0[k]).all() for k in alone)  # exactly: the same loss and batches
    assert not all((alone[k] == kd[k]).all() for k in alone)
    rows = {r["student"]: r for r in summary["distillation"]}
    assert rows["kd"]["teachers"] == ["teacher", "user"]
    assert rows["kd"]["twin"] == "alone"
    assert rows["kd"]["teacher"]["params"] > rows["kd"]["distilled"]["params"]
    assert rows["kd"]["alone"]["params"] == rows["kd"]["distilled"]["params"]
    assert rows["kd0"]["gap_recovered"] == 0.0
    gap = rows["kd"]["teacher"]["test"] - rows["kd"]["alone"]["test"]
    want = (rows["kd"]["distilled"]["test"] - rows["kd"]["alone"]["test"]) / gap
    assert rows["kd"]["gap_recovered"] == pytest.approx(want)
    report = (run.folder.path / "report.md").read_text()
    assert "## Distillation" in report
    assert "| distilled student |" in report
    spec = json.loads((run.folder.path / "candidates/kd/artifact/spec.json").read_text())
    assert [t["ref"] for t in spec["distilled_from"]["teachers"]] == ["teacher", "user"]
    assert spec["distilled_from"]["temperature"] == 2


ORACLE = """import torch
CENTRES = (0.5, 1.5, 2.5)
class Rings(torch.nn.Module):
    # the rule itself: class k is the ring of radius k..k+1; over-confident (x 40)
    def __init__(self, *, in_features, num_outputs):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(num_outputs))  # something to train
    def forward(self, x):
        r = x.norm(dim=-1, keepdim=True)
        return -40 * (r - torch.tensor(CENTRES)) ** 2 + 0 * self.unused
"""


def _rings(path: Path, n: int = 800) -> None:
    rng = np.random.default_rng(0)
    r, angle = rng.uniform(0, 3, n), rng.uniform(0, 2 * np.pi, n)
    rows = np.column_stack([r * np.cos(angle), r * np.sin(angle), np.floor(r)])
    np.savetxt(path, rows, delimiter=",", header="a,b,label", comments="", fmt="%.5f")


def test_a_transfer_set_teaches_a_student_what_its_few_labels_cannot(tmp_path, tiny_raw):
    # 16 labelled rows of three rings: too few for a small MLP to find them; 540 unlabelled
    # rows that only the teacher (the rule) labels. The students learn the rings from the
    # teacher's answers alone (the hard term skips unlabelled rows: with label -1 in it,
    # the cross entropy would fail), stored, or online on jittered copies; the twin, from
    # the labels alone, cannot.
    (tmp_path / "oracle.py").write_text(ORACLE)
    _rings(tmp_path / "rings.csv")
    kd = {"teacher": "rule", "temperature": 2.0, "alpha": 0.9}
    small = {"type": "mlp", "hidden_sizes": [32]}
    tiny_raw["data"] = {"source": "rings.csv", "transforms": [],
                        "split": {"train": 0.02, "val": 0.1, "test": 0.2, "unlabelled": 0.68}}
    tiny_raw["train"].update(epochs=12, lr=0.02, checkpoints=False)
    tiny_raw["train"]["candidates"] = [
        {"name": "rule", "model": {"type": "oracle.py:Rings"}, "epochs": 1},
        {"name": "twin", "model": small},
        {"name": "stored", "model": small,
         "distill": {**kd, "transfer": {"labelled": True}}},
        {"name": "jittered", "model": small,
         "distill": {**kd, "transfer": {"labelled": False, "copies": 1, "noise": 0.1}}},
    ]
    run, summary = run_pipeline(make_config(_quiet(tiny_raw), base_dir=tmp_path))
    rows = {r["student"]: r for r in summary["distillation"]}
    assert rows["stored"]["teacher"]["test"] == 1.0  # the rule
    twin = rows["stored"]["alone"]["test"]
    assert twin < 0.85
    for name in ("stored", "jittered"):
        assert rows[name]["twin"] == "twin"
        assert rows[name]["distilled"]["test"] > twin + 0.1, (name, rows[name], twin)
    info = {n: json.loads((run.folder.path / f"candidates/{n}/teacher.json").read_text())
            for n in ("stored", "jittered")}
    assert info["stored"]["splits"] == ["train", "unlabelled"]
    assert Path(info["stored"]["logits_dir"]).is_dir()
    assert info["jittered"]["splits"] == ["unlabelled"]
    assert info["jittered"]["logits_dir"] is None  # copies: the teacher answers online
    manifest = json.loads((run.folder.path / "data/manifest.json").read_text())
    part = manifest["splits"]["unlabelled"]["partitions"][0]["path"]
    labels = pq.read_table(run.folder.path / "data" / part, columns=["label"])["label"]
    assert set(labels.to_pylist()) == {-1}  # ingestion dropped them


def test_a_student_matches_its_one_process_twin_under_each_strategy(tmp_path, tiny_raw):
    tiny_raw["train"]["epochs"] = 1
    tiny_raw["train"]["candidates"] = [
        {"name": "teacher", "model": {"type": "mlp", "hidden_sizes": [32]}},
        {"name": "student", "model": SMALL, "distill": {"teacher": "teacher"}},
    ]
    cfg = write_config(tmp_path / "c.yaml", _quiet(tiny_raw))
    out = tmp_path / "verify.json"
    strategies = ["ddp", "fsdp", "zero1", "tensor", "pipeline"]
    distml("verify", str(cfg), "--candidate", "student", "--strategies", ",".join(strategies),
           "--steps", "6", "--json", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert [r["strategy"] for r in report["results"]] == strategies
    for r in report["results"]:
        assert r["passed"], r
        assert r["max_rel_param_diff"] < 1e-4


def test_a_language_model_distills_online_and_under_ddp(tmp_path, tiny_raw):
    raw = _quiet(tiny_raw)
    cfg_path = small_lm_config(tmp_path, raw)  # a teacher 'gpt' on a small text file
    raw["train"].update(epochs=1, max_steps=6)
    raw["train"]["candidates"].append({
        "name": "student", "model": {"type": "transformer", "num_layers": 1, "num_heads": 2,
                                     "dim": 16},
        "distill": {"teacher": "gpt", "temperature": 2.0, "alpha": 0.5}})
    write_config(cfg_path, raw)
    _, results = train_only(make_config(raw, base_dir=tmp_path), candidate="student")
    assert [r["name"] for r in results] == ["gpt", "student"]  # the teacher first
    student = results[1]
    assert student["distill"]["teacher"] == "gpt"
    assert all(np.isfinite(student["history"]["train_loss"]))
    out = tmp_path / "verify.json"
    distml("verify", str(cfg_path), "--candidate", "student", "--strategies", "ddp",
           "--steps", "4", "--json", str(out), cwd=tmp_path)
    (r,) = json.loads(out.read_text())["results"]
    assert r["passed"], r


def test_with_a_loader_map_fn_the_teacher_answers_online_as_it_would_have_offline(tiny_raw):
    # A map function may change the rows (augmentation), so the teacher must see the rows
    # the student gets: online. With the identity, online and stored outputs agree.
    tiny_raw["train"].update(epochs=1)
    tiny_raw["train"]["candidates"] = [
        {"name": "teacher", "model": {"type": "mlp", "hidden_sizes": [32]}},
        {"name": "student", "model": SMALL, "distill": {"teacher": "teacher"}},
    ]
    offline, _ = train_only(make_config(_quiet(tiny_raw)))
    tiny_raw["data"]["loader"] = {"map_fn": "tests.helpers.maps:identity"}
    online, _ = train_only(make_config(tiny_raw))
    infos = [json.loads((r.folder.path / "candidates/student/teacher.json").read_text())
             for r in (offline, online)]
    assert infos[0]["logits_dir"] is not None
    assert infos[1]["logits_dir"] is None
    a, b = _weights(offline.folder.path, "student"), _weights(online.folder.path, "student")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_torchrun_entry_trains_teachers_first(tmp_path, tiny_raw):
    tiny_raw["train"]["epochs"] = 1
    tiny_raw["train"]["candidates"] = [
        {"name": "student", "model": SMALL, "distill": {"teacher": ["t1", "t2"]}},
        {"name": "t1", "model": {"type": "mlp", "hidden_sizes": [32]}},
        {"name": "t2", "model": {"type": "mlp", "hidden_sizes": [24]}},
    ]
    cfg = write_config(tmp_path / "c.yaml", _quiet(tiny_raw))
    subprocess.run([sys.executable, "-m", "distml.train", str(cfg), "--candidate", "student"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    (run,) = (tmp_path / "runs" / "tiny").glob("2*")
    done = {p.parent.name for p in run.glob("candidates/*/result.json")}
    assert done == {"student", "t1", "t2"}
    info = json.loads((run / "candidates/student/teacher.json").read_text())
    assert [t["ref"] for t in info["teachers"]] == ["t1", "t2"]
    assert Path(info["logits_dir"]).is_dir()


def _register(tiny_raw: dict, name: str, model: dict) -> None:
    raw = json.loads(json.dumps(tiny_raw))
    raw["name"] = name
    raw["train"]["candidates"] = [{"name": "m", "model": model}]
    run_pipeline(make_config(raw))


def test_a_student_of_registered_teachers_round_trips_through_registry_and_serve(
        tmp_path, tiny_raw):
    _quiet(tiny_raw)
    tiny_raw["train"]["epochs"] = 3
    _register(tiny_raw, "teach-a", {"type": "mlp", "hidden_sizes": [64]})
    _register(tiny_raw, "teach-b", {"type": "cnn", "channels": [4], "hidden_size": 16})
    tiny_raw["train"]["candidates"] = [{
        "name": "s", "model": SMALL,
        "distill": {"teacher": ["teach-a@production", "teach-b:1"], "temperature": 3}}]
    tiny_raw["name"] = "student"
    missing = json.loads(json.dumps(tiny_raw))
    missing["train"]["candidates"][0]["distill"]["teacher"] = ["teach-a:7"]
    with pytest.raises(ConfigError, match=r"train\.candidates\[0\]\.distill\.teacher="
                                          r"'teach-a:7': model 'teach-a' has no version 7"):
        run_pipeline(make_config(missing))
    run, summary = run_pipeline(make_config(tiny_raw))
    assert summary["registry"]["name"] == "student"
    (row,) = summary["distillation"]
    assert row["teachers"] == ["teach-a@production", "teach-b:1"]
    spec = json.loads((tmp_path / "registry/student/v1/spec.json").read_text())
    assert [(t["name"], t["version"]) for t in spec["distilled_from"]["teachers"]] == [
        ("teach-a", 1), ("teach-b", 1)]
    digits = load_digits()
    rows = digits.data[:8].astype(np.float32)
    with running_server("student@production", "--registry", str(tmp_path / "registry"),
                        cwd=tmp_path) as (url, _, _):
        reply = httpx.post(f"{url}/v2/models/student/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(rows.shape),
             "data": rows.ravel().tolist()}]}, timeout=30).json()
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert outputs["probabilities"]["shape"] == [8, 10]
    labels = outputs["label"]["data"]
    assert np.mean(np.array(labels) == digits.target[:8].astype(str)) >= 0.5
