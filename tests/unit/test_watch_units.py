"""``distml watch``'s checks before any work: the source, the landing folder, the state."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distml.errors import ConfigError, DistmlError
from distml.workflow.watch import STATE, Watcher, landed, watch_dir
from tests.helpers.configs import make_config


def _file_config(tiny_raw, tmp_path):
    pq.write_table(pa.table({"x": np.arange(10.0), "label": np.arange(10) % 2}),
                   tmp_path / "a.parquet")
    return make_config({**tiny_raw, "data": {"source": str(tmp_path / "a.parquet")}})


def test_watch_needs_a_file_source(tiny_raw, tmp_path):
    with pytest.raises(ConfigError, match="data.source must be a file source .* 'sklearn:digits'"):
        Watcher(make_config(tiny_raw), tmp_path)


def test_landed_files_are_complete_data_files_oldest_first(tmp_path):
    for i, name in enumerate(["b.csv", "a.parquet", ".c.parquet", "notes.txt", "d.pq"]):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, ns=(10**9 * (10 - i), 10**9 * (10 - i)))
    assert [f.name for f in landed(tmp_path)] == ["d.pq", "a.parquet", "b.csv"]
    with pytest.raises(DistmlError, match="--landing: .* is not a folder"):
        landed(tmp_path / "missing")


def test_nothing_landed_writes_no_state(tiny_raw, tmp_path):
    cfg = _file_config(tiny_raw, tmp_path)
    (tmp_path / "landing").mkdir()
    watcher = Watcher(cfg, tmp_path / "landing")
    assert watcher.state["history"] == [str(tmp_path / "a.parquet")]
    assert watcher.run(once=True) == []
    assert not (watch_dir(cfg) / STATE).exists()


def test_a_state_of_another_landing_folder_is_refused(tiny_raw, tmp_path):
    cfg = _file_config(tiny_raw, tmp_path)
    watch_dir(cfg).mkdir(parents=True)
    (watch_dir(cfg) / STATE).write_text(json.dumps({"landing": "/elsewhere"}))
    with pytest.raises(DistmlError, match="watches /elsewhere, not .*landing"):
        Watcher(cfg, tmp_path / "landing")
