"""Parallel ingestion on real engines: a process pool and a Dask LocalCluster."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distml.config import DataConfig
from distml.data import transforms
from distml.data.dataset import MANIFEST, load_split
from distml.data.ingest import ingest
from distml.data.preprocess import prepare
from distml.data.sources import open_source
from distml.errors import DataError
from distml.execution import WorkItemError, make_executor
from tests.helpers.configs import data_config

SYNTHETIC = {
    "source": {"type": "synthetic:classification", "n_samples": 20_000, "n_features": 6,
               "n_classes": 3, "seed": 1},
    "rows_per_partition": 3_000,
}


def _outputs(root):
    manifest = json.loads((root / MANIFEST).read_text())
    checksums = {s: [p["sha256"] for p in v["partitions"]] for s, v in manifest["splits"].items()}
    return manifest["preprocessing"], checksums


def test_process_pool_writes_what_one_process_writes(tmp_path):
    serial = ingest(data_config(**SYNTHETIC), tmp_path / "serial", seed=0)
    with make_executor("local", num_workers=2) as ex:
        pooled = ingest(data_config(**SYNTHETIC), tmp_path / "pool", seed=0, executor=ex)
    assert _outputs(tmp_path / "serial") == _outputs(tmp_path / "pool")
    assert len(serial.partitions("train")) == 7  # 20,000 rows in chunks of 3,000
    assert pooled.rows("train") + pooled.rows("val") + pooled.rows("test") == 20_000


def test_dask_local_cluster_gives_the_same_output_as_local(tmp_path):
    with make_executor("local", num_workers=2) as ex:
        ingest(data_config(**SYNTHETIC), tmp_path / "local", seed=0, executor=ex)
    with make_executor("dask://local", num_workers=2) as ex:
        assert ex.name == "dask"
        ingest(data_config(**SYNTHETIC), tmp_path / "dask", seed=0, executor=ex)
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "dask")


def test_merged_statistics_equal_whole_table_statistics(tmp_path):
    data = data_config(**SYNTHETIC, transforms=["standardize", "minmax"])
    m = ingest(data, tmp_path / "d", seed=0)
    # The training rows before any transform, recomputed from the source.
    train = {}
    for chunk in open_source(data.source).plan_chunks(data.rows_per_partition):
        p = prepare(data, 0, chunk)
        for k, v in p.columns.items():
            train.setdefault(k, []).append(v[p.split == 0])
    x = np.column_stack([np.concatenate(train[k]) for k in train]).astype(np.float64)
    std = m.preprocessing[0]
    np.testing.assert_allclose(std["mean"], x.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std["std"], x.std(axis=0), rtol=1e-9)
    z = (x.astype(np.float32) - np.float32(std["mean"])) / np.float32(std["std"])
    mm = m.preprocessing[1]
    np.testing.assert_allclose(mm["min"], z.min(axis=0), rtol=1e-6)
    stored, _ = load_split(m, "train")
    assert stored.min() == pytest.approx(0.0, abs=1e-6)
    assert stored.max() == pytest.approx(1.0, abs=1e-6)


def test_a_failing_transform_names_its_partition_and_leaves_no_manifest(tmp_path):
    for i in range(3):
        a = np.arange(100, dtype=np.float64) + (1000 if i == 1 else 0)
        pq.write_table(pa.table({"a": a, "label": np.arange(100) % 2}),
                       tmp_path / f"part-{i}.parquet")
    (tmp_path / "boom.py").write_text(
        "def transform(cols):\n"
        "    if (cols['a'] > 500).any():\n"
        "        raise ValueError('value out of range')\n"
        "    return cols\n")
    data = DataConfig.model_validate(
        {"source": str(tmp_path), "transforms": [f"{tmp_path / 'boom.py'}:transform"]},
        context={"base_dir": tmp_path})
    with make_executor("local", num_workers=2, retries=1) as ex, pytest.raises(
        WorkItemError, match=r"transform \+ write: partition 1 \(.*part-1\.parquet\) failed "
                             r"after 2 attempts: ValueError: value out of range"):
        ingest(data, tmp_path / "out", seed=0, executor=ex)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob(MANIFEST))


def test_a_flaky_item_succeeds_on_retry(tmp_path):
    (tmp_path / "flaky.py").write_text(
        "from pathlib import Path\n"
        f"MARK = Path({str(tmp_path)!r}) / 'tried'\n"
        "def transform(cols):\n"
        "    if not MARK.exists():\n"
        "        MARK.touch()\n"
        "        raise OSError('transient')\n"
        "    return cols\n")
    data = data_config(**SYNTHETIC, transforms=[{"type": f"{tmp_path / 'flaky.py'}:transform"}])
    with make_executor("local", num_workers=1, retries=1) as ex:
        m = ingest(data, tmp_path / "out", seed=0, executor=ex)
    assert (tmp_path / "tried").exists()
    assert m.rows("train") > 0


def test_truncated_source_parquet_names_the_file(tmp_path):
    pq.write_table(pa.table({"a": np.arange(50.0), "label": np.arange(50) % 2}),
                   tmp_path / "good.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"a": np.arange(50.0), "label": np.arange(50) % 2}), bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=r"cannot read .*bad\.parquet \(truncated or corrupt"):
        ingest(DataConfig.model_validate({"source": str(tmp_path)}), tmp_path / "o", seed=0)


def test_onehot_impute_and_clip_chain(tmp_path):
    color = np.array(["red", "green", "blue", "green"] * 50, dtype=object)
    a = np.linspace(-10, 10, 200)
    a[::7] = np.nan
    pq.write_table(pa.table({"color": color, "a": a, "label": np.arange(200) % 2}),
                   tmp_path / "t.parquet")
    data = DataConfig.model_validate({
        "source": str(tmp_path / "t.parquet"),
        "transforms": [{"type": "onehot", "columns": ["color"]}, {"type": "impute"},
                       {"type": "clip", "min": -5, "max": 5}, "standardize"],
    })
    with make_executor("local", num_workers=2) as ex:
        m = ingest(data, tmp_path / "o", seed=0, executor=ex)
    assert m.feature_names == ["color=blue", "color=green", "color=red", "a"]
    assert m.input_columns == {"color": "categorical", "a": "numeric"}
    x, _ = load_split(m, "train")
    assert np.isfinite(x).all()
    # Re-applying the stored parameters to raw rows reproduces what was written.
    raw = {"color": np.array(["green", "purple"], dtype=object), "a": np.array([np.nan, 99.0])}
    out = transforms.to_matrix(transforms.apply(m.preprocessing, raw))
    assert out.shape == (2, 4)
    assert out[1, :3].tolist() == pytest.approx(
        list((np.zeros(3) - m.preprocessing[3]["mean"][:3]) / m.preprocessing[3]["std"][:3]))


def test_categorical_columns_need_onehot(tmp_path):
    pq.write_table(pa.table({"color": ["a", "b"] * 20, "label": [0, 1] * 20}),
                   tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"feature columns \['color'\] are not numeric; one-hot"):
        ingest(DataConfig.model_validate({"source": str(tmp_path)}), tmp_path / "o", seed=0)


def test_unknown_engine_and_missing_extra(monkeypatch):
    with pytest.raises(Exception, match=r"is not an executor; use local, dask://local"):
        make_executor("flink://x")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "distml.execution.ray", raising=False)  # (re)imported
    with pytest.raises(Exception, match=r"needs Ray, which is not installed .*distml\[ray\]"):
        make_executor("ray://local")


def test_ray_gives_the_same_output_as_local(tmp_path, tiny_raw):
    # Through the CLI, as a user runs it: Ray's driver owns its process (its shutdown would
    # take a pytest process down with it).
    from tests.helpers.cli import distml_on_ray
    from tests.helpers.configs import write_config

    tiny_raw["data"] = dict(SYNTHETIC)
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    for executor in ("local", "ray://local"):
        distml_on_ray("ingest", str(cfg), "--set", f"execution.executor={executor}",
               "--set", f"output_dir={tmp_path / executor.replace(':', '').replace('/', '')}",
               cwd=tmp_path)
    (local,) = (tmp_path / "local" / "tiny").glob("data-*")
    (ray,) = (tmp_path / "raylocal" / "tiny").glob("data-*")
    assert _outputs(local) == _outputs(ray)
