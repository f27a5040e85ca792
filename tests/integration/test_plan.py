"""``distml plan`` on the digits example: a ranked table of the plans that fit a memory
budget, the others rejected with the reason, and ``--check`` running one plan for real
(distml verify on two processes) beside its prediction."""

from __future__ import annotations

import json

from tests.helpers.cli import ROOT
from tests.helpers.distributed import ENV, distml


def test_plan_ranks_what_fits_and_check_measures_it(tmp_path):
    # mlp-wide (85,002 parameters, AdamW fp32): ddp holds 16 bytes a parameter per rank,
    # about 1.3 MiB; fsdp half the parameters, gradients and state, about 0.65 MiB.
    out = tmp_path / "plan.json"
    proc = distml("plan", str(ROOT / "examples" / "digits.yaml"), "--candidate", "mlp-wide",
                  "--world-size", "2", "--memory", str(1.0 / 1024), "--bandwidth", "1",
                  "--flops", "1",  # a given machine: no calibration here (the bench's)
                  "--check", "--check-only", "ddp", "--steps", "3", "--json", str(out),
                  cwd=tmp_path, env={**ENV, "COLUMNS": "200"})
    text = proc.stdout
    assert "plans for mlp-wide" in text
    assert "does not fit: ddp w2 d2" in text
    assert "> 0.000977 GiB" in text
    assert "not valid: pipeline-interleaved w2" in text  # 4 stages, 3 layers
    report = json.loads(out.read_text())
    plans = report["candidates"]["mlp-wide"]["plans"]
    fitting = [p for p in plans if p["fits"]]
    assert fitting
    assert plans[: len(fitting)] == fitting
    assert [p["step_seconds"] for p in fitting] == sorted(p["step_seconds"] for p in fitting)
    assert {"fsdp", "tensor"} <= {p["name"] for p in fitting}
    # a variant the candidate's own settings already are is not planned twice: "pipeline"
    # (its default schedule, 1f1b) stands for "pipeline-1f1b"
    names = [(p["name"], p["activation_checkpointing"]) for p in plans]
    assert ("pipeline", False) in names
    assert ("pipeline-1f1b", False) not in names
    assert ("pipeline-gpipe", False) in names
    ddp = next(p for p in plans if p["name"] == "ddp" and not p["activation_checkpointing"])
    assert not ddp["fits"]
    assert "rank 0 needs" in ddp["why_not"]
    # Traced, not assumed: 4 bytes each of parameters and gradients, 8 of AdamW's moments,
    # and a 4-byte step counter per tensor (6 tensors).
    assert ddp["memory_per_rank"][0]["params"] == 85_002 * 4
    assert ddp["memory_per_rank"][0]["optimizer"] == 85_002 * 8 + 6 * 4
    (row,) = [r for r in report["check"] if r["strategy"] == "ddp"]
    assert row["measured_bytes_per_rank"] == [85_002 * 16 + 24] * 2
    assert row["memory_error"] <= 0.10
    assert row["predicted_step_s"] > 0
    assert row["measured_step_s"] > 0
    assert "predicted vs measured" in text
