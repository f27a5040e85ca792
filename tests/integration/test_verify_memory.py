"""What each rank holds, measured by distml verify --separate (each strategy on its own
processes) at three moments of a step, against the ZeRO paper's bytes per parameter (fp32
Adam: 4 for the parameters, 4 for the gradients, 8 for the moments)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import distml
from tests.helpers.configs import write_config


def test_verify_separate_measures_each_strategys_own_processes_and_zero_stages(
        tmp_path, tiny_raw):
    tiny_raw["train"]["candidates"] = tiny_raw["train"]["candidates"][:1]  # mlp 64-16-10
    p = 64 * 16 + 16 + 16 * 10 + 10
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    out = tmp_path / "verify.json"
    distml("verify", str(cfg), "--strategies", "zero1,fsdp-zero2", "--steps", "2",
           "--separate", "--json", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["separate_launches"]
    (run,) = (tmp_path / "runs" / "tiny").glob("2*")
    assert len(list((run / "verify" / "logs").iterdir())) == 2  # one launch per strategy
    held = {r["strategy"]: r["held_bytes_per_rank"] for r in report["results"]}
    approx = lambda x: pytest.approx(x, rel=0.02)  # noqa: E731 (Adam's step counters)
    for rank in range(2):
        # ZeRO-1: whole parameters and gradients, half the optimizer state.
        z1 = held["zero1"][rank]["after_backward"]
        assert (z1["params"], z1["grads"], z1["optimizer"]) == (approx(4 * p), approx(4 * p),
                                                                approx(4 * p))
        # fsdp without resharding after forward (ZeRO-2): between forward and backward the
        # whole parameters are gathered (besides the rank's shards); after backward only
        # the shards of parameters and gradients are left.
        z2 = held["fsdp-zero2"][rank]
        assert z2["after_forward"]["params"] == approx(4 * p + 2 * p)
        assert z2["after_forward"]["grads"] == 0
        assert z2["after_backward"]["grads"] == approx(2 * p)
        assert z2["after_backward"]["params"] == approx(2 * p)
        assert z2["after_backward"]["optimizer"] == approx(4 * p)
