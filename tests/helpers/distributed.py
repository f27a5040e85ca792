"""The environment of training workers that load test helpers, ``distml verify``, and a
resume with no step left, for the distributed-training tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers.cli import ROOT, distml

# Workers import tests.helpers; this checkout's sources come first.
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def verify(tmp_path: Path, cfg: Path, *args: str, check: bool = True):
    """``distml verify`` writing its report to a fresh JSON file: (process, report or None)."""
    out = tmp_path / f"verify-{len(list(tmp_path.glob('verify-*.json')))}.json"
    proc = distml("verify", str(cfg), "--json", str(out), *args, cwd=tmp_path, env=ENV,
                  check=check)
    return proc, json.loads(out.read_text()) if out.exists() else None


def resume_with_no_more_steps(tmp_path: Path, cfg: Path, parallel: str, candidate: str, *,
                              steps: int | None = None) -> dict:
    """Train, then resume the finished run under ``parallel`` with no step left to take:
    the resumed model must be the trained one, exactly. Returns the resumed result."""
    distml("train", str(cfg), cwd=tmp_path)
    (out,) = (tmp_path / "runs" / "tiny").glob(f"2*/candidates/{candidate}")
    trained = load_file(out / "artifact" / "model.safetensors")
    steps = steps or json.loads((out / "result.json").read_text())["steps"]
    (out / "result.json").unlink()  # as if it died after its last checkpoint
    resumed = distml("train", str(cfg), "--resume", "--set", f"train.parallel={parallel}",
                     cwd=tmp_path)
    log = resumed.stdout + resumed.stderr
    assert f"(step {steps})" in log
    assert "cannot be loaded" not in log
    again = load_file(out / "artifact" / "model.safetensors")
    assert trained.keys() == again.keys()
    differ = [k for k in trained if not torch.equal(trained[k], again[k])]
    assert not differ, f"resumed weights differ: {differ}"
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == steps
    return result
