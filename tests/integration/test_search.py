"""Search as a stage of ``distml run``: trials in parallel on each executor engine, pruned
by Optuna through the run's storage, the best one selected and registered; a failing trial
recorded with its reason; a killed search resumed without running a finished trial again."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from distml.search.driver import INTERRUPTED
from tests.helpers.cli import distml, distml_on_ray
from tests.helpers.configs import TINY, write_config

EPOCHS = 4


def search_config(tmp_path: Path, executor: str, *, epochs: int = EPOCHS, **search: Any
                  ) -> Path:
    """One mlp candidate searched over lr (one choice too small to learn in 4 epochs: the
    pruner's to stop; the seeded sampler draws it for trials 2 and 7), width and dropout;
    8 trials, 2 at a time."""
    raw = copy.deepcopy(TINY)
    raw.update(output_dir=str(tmp_path / "runs"), registry=str(tmp_path / "registry"))
    raw["execution"] = {"executor": executor, "num_workers": 2}
    raw["monitor"] = {"system_metrics_interval_s": None}
    raw["train"].update(epochs=epochs)
    raw["train"]["candidates"] = [{"name": "small", "model": {"type": "mlp"}, "search": {
        "space": {"lr": {"choice": [0.02, 0.05, 1e-6]},
                  "model.hidden_sizes": {"choice": [[16], [32, 32]]},
                  "model.dropout": {"uniform": [0.0, 0.2]}},
        "num_trials": 8, "max_concurrent_trials": 2, "sampler": "random", "seed": 3,
        "pruner": "median", **search}}]
    return write_config(tmp_path / "search.yaml", raw)


def only_run(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "runs" / "tiny").glob("2*")
    return run


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


# (dask://local runs trials through the same Executor interface; its executor is tested by
# test_engines.py and test_ingest_parallel.py)
@pytest.mark.parametrize("executor", ["local", "ray://local"])
def test_trials_run_two_at_a_time_pruned_and_the_best_registered(tmp_path, executor):
    cfg = search_config(tmp_path, executor)
    run_cli = distml_on_ray if executor.startswith("ray") else distml
    run_cli("run", str(cfg), cwd=tmp_path)
    run = only_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    trials = summary["search"]["small"]["trials"]
    assert len(trials) == 8
    assert {t["state"] for t in trials} <= {"complete", "pruned"}
    assert any(overlap(a, b) for i, a in enumerate(trials) for b in trials[i + 1:])
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned, trials
    assert all(t["evals"] < EPOCHS for t in pruned)  # stopped before the last epoch
    assert all(t["evals"] == EPOCHS for t in trials if t["state"] == "complete")
    complete = [t for t in trials if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["value"])
    assert summary["search"]["small"]["best_trial"] == best["number"]
    assert summary["selected"] == "small"
    assert summary["candidates"][0]["val"]["accuracy"] == best["value"]
    spec = json.loads((tmp_path / "registry/tiny/v1/spec.json").read_text())
    assert spec["metrics"]["val"]["accuracy"] == best["value"]
    assert spec["candidate"] == f"small-trial-{best['number']}"
    for t in trials:  # every trial a candidate run, with its TensorBoard logs
        assert list((run / "tensorboard" / t["name"]).glob("events.*"))
    report = (run / "report.md").read_text()
    assert "## Search: small" in report
    assert (run / "search-small-history.png").is_file()


def test_failing_trials_are_recorded_with_their_reason(tmp_path):
    """A grid of 4: an image shape that does not fit the data and a learning rate whose
    loss overflows fail; the rest completes and is selected."""
    raw = copy.deepcopy(TINY)
    raw.update(output_dir=str(tmp_path / "runs"), registry=str(tmp_path / "registry"))
    raw["execution"] = {"num_workers": 1}
    raw["monitor"] = {"system_metrics_interval_s": None, "mlflow": True}
    raw["train"].update(epochs=1, optimizer="sgd", grad_clip=None)
    raw["train"]["candidates"] = [{"name": "cnn", "model": {"type": "cnn", "channels": [4]},
                                   "search": {
        "space": {"model.image_shape": {"choice": [[1, 8, 8], [2, 4, 4]]},
                  "lr": {"choice": [0.05, 1e30]}},
        "num_trials": 10, "sampler": "grid", "pruner": "none"}}]
    distml("run", str(write_config(tmp_path / "c.yaml", raw)), cwd=tmp_path)
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    trials = {(str(t["params"]["model.image_shape"]), t["params"]["lr"]): t
              for t in summary["search"]["cnn"]["trials"]}
    assert len(trials) == 4  # the grid's size, not num_trials
    assert trials[("[1, 8, 8]", 0.05)]["state"] == "complete"
    nan = trials[("[1, 8, 8]", 1e30)]
    assert nan["state"] == "fail"
    assert "TrialFailedError: the training loss is" in nan["reason"]
    assert "nan" in nan["reason"] or "inf" in nan["reason"]
    for lr in (0.05, 1e30):
        bad = trials[("[2, 4, 4]", lr)]
        assert bad["state"] == "fail"
        assert "image_shape=[2, 4, 4] holds 2*4*4=32 values" in bad["reason"]
    assert summary["selected"] == "cnn"
    # Every trial an MLflow child run of the pipeline's run, failed ones marked so.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "tags.distml.trial_state = 'failed'")
    assert [r.info.status for r in runs] == ["FAILED"]  # the NaN's (the others never built)


def _finished(storage: Path) -> dict[int, str]:
    """Trial number -> state of the trials a search's storage holds as finished."""
    if not storage.is_file():
        return {}
    summaries = optuna.get_all_study_summaries(f"sqlite:///{storage}")
    if not summaries:
        return {}
    study = optuna.load_study(study_name=summaries[0].study_name,
                              storage=f"sqlite:///{storage}")
    return {t.number: t.state.name for t in study.get_trials() if t.state.is_finished()}


def test_a_killed_search_resumes_without_running_a_finished_trial_again(tmp_path):
    # Trials of 30 epochs (a second or more each): the kill comes while some run.
    cfg = search_config(tmp_path, "local", epochs=30, pruner="none")
    proc = subprocess.Popen([sys.executable, "-m", "distml", "run", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    runs = tmp_path / "runs/tiny"
    deadline = time.monotonic() + 300
    try:  # (the study is read once the run is killed: reading it while distml creates its
        # tables could race the creation)
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(runs.glob("2*/candidates/small-trial-*/result.json"))) >= 2:
                time.sleep(0.5)  # their trials told
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # distml run and its pool's workers
        proc.wait()
    run = only_run(tmp_path)
    before = _finished(run / "search/small.db")
    assert 1 <= len(before) < 8, before
    stamps = {n: (run / f"candidates/small-trial-{n}/result.json").stat().st_mtime_ns
              for n in before}
    distml("run", str(cfg), "--resume", cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    trials = summary["search"]["small"]["trials"]
    interrupted = [t for t in trials if t["reason"] == INTERRUPTED]
    counted = [t for t in trials if t["reason"] != INTERRUPTED]
    assert len(counted) == 8
    assert {t["state"] for t in counted} == {"complete"}
    for n, state in before.items():  # reused as they were: not trained again
        assert trials[n]["state"] == state.lower()
        assert (run / f"candidates/small-trial-{n}/result.json").stat().st_mtime_ns == \
            stamps[n]
    assert len(trials) == 8 + len(interrupted)
    # The values the kill interrupted were tried again by a new trial (those drawn: a trial
    # killed while it was being asked for has some of its values only).
    for t in interrupted:
        assert any(all(c["params"][k] == v for k, v in t["params"].items())
                   for c in counted if c["number"] > max(before)), t


FACTORY = '''
import os
from torch import nn

def make(in_features, num_outputs, die=False, width=16):
    if die:  # the worker dies as an out-of-memory kill would take it
        os._exit(137)
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(),
                         nn.Linear(width, num_outputs))
'''


def test_a_trial_whose_worker_dies_fails_and_the_search_goes_on(tmp_path):
    (tmp_path / "dying.py").write_text(FACTORY)
    raw = copy.deepcopy(TINY)
    raw.update(output_dir=str(tmp_path / "runs"), registry=str(tmp_path / "registry"))
    raw["execution"] = {"num_workers": 2}
    raw["monitor"] = {"system_metrics_interval_s": None}
    raw["train"].update(epochs=1)
    raw["train"]["candidates"] = [{"name": "user", "model": {"type": "dying.py:make"},
                                   "search": {
        "space": {"model.kwargs": {"choice": [{"width": 16}, {"width": 32}, {"die": True}]},
                  "lr": {"choice": [0.01, 0.02]}},
        "num_trials": 6, "max_concurrent_trials": 2, "sampler": "grid", "pruner": "none"}}]
    distml("run", str(write_config(tmp_path / "c.yaml", raw)), cwd=tmp_path)
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    trials = summary["search"]["user"]["trials"]
    assert len(trials) == 6
    dying = [t for t in trials if t["params"]["model.kwargs"] == {"die": True}]
    assert [t["state"] for t in dying] == ["fail"] * 2
    assert all(t["reason"].startswith("the worker died") for t in dying), dying
    # A trial beside a dying one in the same local pool dies with it (at most one each: two
    # run at once); the others run in a new pool and complete.
    assert sum(t["state"] == "complete" for t in trials) >= 2, trials
    assert summary["selected"] == "user"
