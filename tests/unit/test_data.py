from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from distml.config import SOURCES, TRANSFORMS
from distml.data.dataset import MANIFEST, Manifest, load_split, read_partition
from distml.data.ingest import ingest
from distml.data.inspect import inspect
from distml.data.sources import SOURCES as SOURCE_IMPLEMENTATIONS
from distml.data.sources import Chunk, open_source
from distml.data.transforms import TRANSFORMS as TRANSFORM_IMPLEMENTATIONS
from distml.errors import DataError
from tests.helpers.configs import data_config


def _csv(path, n=200, nan_rows=(), label=lambda i: i % 3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    for r in nan_rows:
        x[r, r % 4] = np.nan
    table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "d": x[:, 3],
                      "label": [label(i) for i in range(n)]})
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, path)
    return path


def test_synthetic_classification_is_seeded_and_chunked():
    src = open_source(data_config(source={
        "type": "synthetic:classification", "n_samples": 3000, "n_features": 5, "n_classes": 4,
        "seed": 7}).source)
    chunks = src.plan_chunks(1000)
    assert [(c.start, c.stop) for c in chunks] == [(0, 1000), (1000, 2000), (2000, 3000)]
    a, b = src.load_chunk(chunks[1]), src.load_chunk(chunks[1])
    assert len(a) == 1000
    assert list(a.columns) == ["x0", "x1", "x2", "x3", "x4"]
    assert set(np.unique(a.labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(a.columns["x3"], b.columns["x3"])
    assert not np.array_equal(a.columns["x0"], src.load_chunk(chunks[0]).columns["x0"])


def test_text_windows_are_next_token_pairs(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(100)) * 3)
    src = open_source(data_config(source={"type": "text", "paths": [str(tmp_path / "*.txt")],
                                          "sequence_length": 10}).source)
    raw = src.load_chunk(Chunk(0, "text"))
    assert raw.tokens.shape == (30, 11)  # 301 bytes -> 30 windows
    np.testing.assert_array_equal(raw.tokens[1, :], np.arange(10, 21))  # stride T, width T+1


def test_stdlib_text_source_reads_python_sources():
    src = open_source(data_config(source={"type": "text", "paths": ["stdlib:json/*.py"],
                                          "sequence_length": 32}).source)
    assert len(src.load_chunk(Chunk(0, "text"))) > 100


def test_every_configurable_source_and_transform_has_an_implementation():
    assert set(SOURCE_IMPLEMENTATIONS) == set(SOURCES.names)
    assert set(TRANSFORM_IMPLEMENTATIONS) == set(TRANSFORMS.tags)


def test_a_module_class_source_takes_the_table_path(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from distml.data.sources import RawChunk, Source\n"
        "class Mine(Source):\n"
        "    def load_chunk(self, chunk):\n"
        "        return RawChunk({}, None)\n")
    spec = SimpleNamespace(type=f"{tmp_path / 'mine.py'}:Mine")
    source = open_source(spec)
    assert [c.label for c in source.plan_chunks(10)] == [spec.type]
    assert len(source.load_chunk(Chunk(0, spec.type))) == 0


def test_ingest_writes_stratified_partitions_and_manifest(tmp_path):
    data = data_config(source="sklearn:digits", rows_per_partition=500)
    m = ingest(data, tmp_path / "d", seed=0)
    assert (tmp_path / "d" / MANIFEST).is_file()
    assert sum(m.rows(s) for s in ("train", "val", "test")) == 1797
    assert len(m.splits["train"]["partitions"]) == 3  # 1257 rows / 500
    x, y = load_split(Manifest.read(tmp_path / "d"), "train")
    assert abs(len(x) - 0.7 * 1797) < 10  # exact per class, up to rounding
    assert x.shape[1] == 64
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)  # standardized on train
    # Stratified: each class's count in each split is within one row of its exact share
    # (an unstratified random split misses this for most seeds).
    totals = np.bincount(load_digits().target, minlength=10)
    for split, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = np.bincount(load_split(m, split)[1], minlength=10)
        assert np.abs(counts - fraction * totals).max() <= 1, (split, counts)
    assert m.preprocessing[0]["type"] == "standardize"
    assert len(m.preprocessing[0]["mean"]) == 64


def test_ingest_is_reused_when_complete(tmp_path):
    data = data_config(source="sklearn:digits")
    ingest(data, tmp_path / "d", seed=0)
    stamp = (tmp_path / "d" / MANIFEST).stat().st_mtime_ns
    ingest(data, tmp_path / "d", seed=0)
    assert (tmp_path / "d" / MANIFEST).stat().st_mtime_ns == stamp


def test_csv_source_with_string_labels(tmp_path):
    path = _csv(tmp_path / "t.csv", label=lambda i: ["cat", "dog"][i % 2])
    m = ingest(data_config(source=str(path)), tmp_path / "d", seed=0)
    assert m.classes == ["cat", "dog"]
    assert m.feature_names == ["a", "b", "c", "d"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"data\.source\.path: '.*nope\.csv' does not exist"):
        ingest(data_config(source=str(tmp_path / "nope.csv")), tmp_path / "d", seed=0)


def test_missing_label_column(tmp_path):
    path = _csv(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"label_column='y' is not a column .*columns: a, b"):
        ingest(data_config(source={"path": str(path), "label_column": "y"}), tmp_path / "d", seed=0)


def test_empty_data_set(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,b,label\n")
    with pytest.raises(DataError, match=r"the data set is empty: the source produced 0 rows"):
        ingest(data_config(source=str(path)), tmp_path / "d", seed=0)
    assert not (tmp_path / "d").exists()


def test_labels_outside_declared_classes(tmp_path):
    path = _csv(tmp_path / "t.csv")  # labels 0, 1, 2
    with pytest.raises(DataError, match=r"66 rows have labels outside data\.classes=\['0', '1'\]"):
        ingest(data_config(source=str(path), classes=[0, 1]), tmp_path / "d", seed=0)


def test_nan_rows_are_counted_or_dropped(tmp_path):
    path = _csv(tmp_path / "t.csv", nan_rows=(3, 10, 50))
    with pytest.raises(DataError, match=r"3 of 200 rows have NaN or infinite values .*"
                                        r"first rows: \[3, 10, 50\].*drop_invalid: true"):
        ingest(data_config(source=str(path)), tmp_path / "d", seed=0)
    m = ingest(data_config(source=str(path), drop_invalid=True), tmp_path / "d", seed=0)
    assert m.dropped_invalid_rows == 3
    assert sum(m.rows(s) for s in ("train", "val", "test")) == 197


def test_too_few_rows_to_split(tmp_path):
    path = _csv(tmp_path / "t.csv", n=3)
    with pytest.raises(DataError, match=r"3 rows are too few to split into train/val/test"):
        ingest(data_config(source=str(path)), tmp_path / "d", seed=0)


def test_truncated_partition_names_the_file(tmp_path):
    m = ingest(data_config(source="sklearn:digits"), tmp_path / "d", seed=0)
    rel = m.splits["val"]["partitions"][0]["path"]
    part = tmp_path / "d" / rel
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"partition .*{rel} is unreadable"):
        read_partition(m, rel)


def test_partitions_are_plain_parquet(tmp_path):
    m = ingest(data_config(source="sklearn:digits"), tmp_path / "d", seed=0)
    table = pq.read_table(tmp_path / "d" / m.splits["test"]["partitions"][0]["path"])
    assert table.column_names[:2] == ["row_id", "pixel_0_0"]
    assert "label" in table.column_names


def test_inspect_reports_partitions_and_column_statistics(tmp_path):
    m = ingest(data_config(source="sklearn:digits", rows_per_partition=400), tmp_path / "d", seed=0)
    info = inspect(tmp_path / "d")
    assert info["rows"] == 1797
    assert len(info["files"]) == sum(len(m.partitions(s)) for s in m.splits)
    assert info["manifest"].classes[0] == "0"
    assert info["stats"]["pixel_0_0"]["std"] == 0.0  # a constant column stays constant
    assert info["stats"]["row_id"]["max"] == 1796
    x = np.concatenate([load_split(m, s)[0] for s in ("train", "val", "test")])
    assert info["stats"]["pixel_3_4"]["mean"] == pytest.approx(x[:, 28].mean(), rel=1e-5)
    with pytest.raises(DataError, match=r"nothing-here does not exist"):
        inspect(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.parquet file"):
        inspect(tmp_path / "empty")


def test_the_matrix_form_of_column_transforms_equals_their_column_by_column_application():
    from distml.data import transforms

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    x = rng.normal(size=(5, 3)).astype(np.float32) * 10
    x[1, 0] = x[3, 2] = np.nan
    params = [
        {"type": "impute", "columns": ["a", "c"], "fill": [0.5, -2.0]},
        {"type": "clip", "columns": ["b"], "min": -3.0, "max": None},
        {"type": "minmax", "columns": ["c", "a"], "min": [-9.0, -4.0], "scale": [20.0, 7.0]},
        {"type": "standardize", "columns": None, "mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]},
    ]
    by_column = transforms.to_matrix(transforms.apply(params, {n: x[:, j] for j, n in
                                                               enumerate(names)}))
    matrix = transforms.matrix_form(params, names)
    np.testing.assert_array_equal(matrix(x), by_column)
    assert not np.isnan(by_column).any()
    assert np.isnan(x).sum() == 2  # the input is untouched
    with pytest.raises(ValueError, match=r"expected \(rows, 3\)"):
        matrix(x[:, :1])
    # a transform that changes the columns has no matrix form, nor a user's function
    assert transforms.matrix_form([{"type": "onehot", "columns": ["a"]}], names) is None
    assert transforms.matrix_form([{"type": "numpy:negative"}], names) is None
