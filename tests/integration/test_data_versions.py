"""Content-addressed data versions: a changed input is a new version (even with the same
size and modification time), never a stale cache hit; ``distml data versions`` and
``distml data diff`` show them."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from distml.workflow.pipeline import stage_ingest, start_run
from tests.helpers.cli import distml
from tests.helpers.configs import TINY, make_config


def _write(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pd.DataFrame({"a": rng.normal(size=60).round(3), "b": rng.normal(size=60).round(3),
                  "label": rng.integers(0, 2, 60)}).to_csv(path, index=False)


def test_an_overwrite_with_the_same_size_and_mtime_is_a_new_version(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "one.csv", 0)
    _write(src / "two.csv", 1)
    cfg = make_config({**TINY, "output_dir": str(tmp_path / "runs"),
                       "data": {"source": str(src)}})
    first = stage_ingest(start_run(cfg))

    before = os.stat(src / "two.csv")
    text = (src / "two.csv").read_text()
    changed = text.replace("0.", "1.", 1) if "0." in text else text.replace("1.", "0.", 1)
    assert len(changed) == len(text)
    assert changed != text
    (src / "two.csv").write_text(changed)
    os.utime(src / "two.csv", ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(src / "two.csv")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    second = stage_ingest(start_run(cfg))
    assert second.version != first.version
    assert second.root != first.root  # a new cache folder, not the stale one
    sums = {f["path"]: f["sha256"] for f in second.source["files"]}
    assert sums[str(src / "one.csv")] == {
        f["path"]: f["sha256"] for f in first.source["files"]}[str(src / "one.csv")]

    runs = str(tmp_path / "runs")
    listed = distml("data", "versions", "--output-dir", runs, cwd=tmp_path).stdout
    assert first.version in listed
    assert second.version in listed
    shown = distml("data", "diff", first.version[:8], second.version[:8], "--output-dir",
                   runs, cwd=tmp_path).stdout
    assert f"changed  {src / 'two.csv'}" in shown
    assert "one.csv" not in shown
