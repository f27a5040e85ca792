"""``distml monitor`` on digits: a model trained by ``distml run``, then held-out rows as they
are, with some pixel columns shifted, and with the labels' relation changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits

from distml.config import DataConfig
from distml.data import transforms
from distml.data.dataset import load_split
from distml.data.ingest import ingest
from distml.drift.columns import Gate, feature_drift
from distml.drift.reference import build_reference, read_reference
from distml.errors import ConfigError, DataError
from distml.workflow.drift_report import run_monitor
from tests.helpers.cli import distml

SHIFTED = ["pixel_2_3", "pixel_4_4", "pixel_5_5"]


def _write(path: Path, columns: list[str], x: np.ndarray, y: np.ndarray) -> Path:
    pq.write_table(pa.table({**{c: x[:, j] for j, c in enumerate(columns)}, "label": y}), path,
                   row_group_size=100)
    return path


@pytest.fixture(scope="module")
def digits(trained_digits, tmp_path_factory):
    """The session's registered digits model (a link to its registry) and files of its test
    split's raw rows: as they are, with SHIFTED columns moved up by 6 grey levels, and with
    every label moved to the next."""
    root = tmp_path_factory.mktemp("drift")
    (root / "registry").symlink_to(trained_digits / "registry")
    version = root / "registry" / "tiny" / "v1"
    spec = json.loads((version / "spec.json").read_text())
    data = Path(spec["data_dir"])
    manifest = json.loads((data / "manifest.json").read_text())
    ids = np.concatenate([pq.read_table(data / p["path"], columns=["row_id"])["row_id"]
                          .to_numpy() for p in manifest["splits"]["test"]["partitions"]])
    bunch = load_digits()
    x, y = bunch.data[ids].astype(np.float32), bunch.target[ids]
    columns = list(spec["input_columns"])
    shifted = x.copy()
    for c in SHIFTED:
        j = columns.index(c)
        shifted[:, j] = np.minimum(shifted[:, j] + 6, 16)
    files = {"same": _write(root / "same.parquet", columns, x, y),
             "shifted": _write(root / "shifted.parquet", columns, shifted, y),
             "relabelled": _write(root / "relabelled.parquet", columns, x, (y + 1) % 10)}
    return root, version, files


def _monitor(root: Path, file: Path, out: str, labels: str | None = "label") -> dict:
    return run_monitor("tiny", file, root / out, registry=root / "registry", labels=labels,
                       json_out=None, gate=Gate(), detector="adwin")


def test_the_registered_model_carries_a_small_reference(digits):
    _, version, _ = digits
    ref = read_reference(version)
    assert len(ref["columns"]) == 64
    assert ref["train_rows"] > 1000
    assert sum(ref["margin_histogram"]) == ref["held_out_rows"]
    assert (version / "reference.json").stat().st_size < 40_000


def test_the_cli_names_the_shifted_columns_and_only_those(digits):
    root, _, files = digits
    distml("monitor", "tiny", "--input", str(files["shifted"]), "--json", "shifted.json",
           "--out", "shifted-report", "--registry", "registry", cwd=root)
    report = json.loads((root / "shifted.json").read_text())
    assert sorted(report["drifted_features"]) == SHIFTED
    out = root / "shifted-report"
    assert sorted(p.name for p in out.glob("column-*.png")) == [
        f"column-{c}.png" for c in SHIFTED]
    assert (out / "stream.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert f"**3 of 64 columns** ({', '.join(sorted(SHIFTED, key=text.index))})" in text
    assert not list(root.glob(".shifted-report.tmp-*"))


def test_unchanged_rows_show_no_drift_of_any_kind(digits):
    root, _, files = digits
    report = _monitor(root, files["same"], "same-report")
    assert report["drifted_features"] == []
    assert report["concept_drift"] is False
    assert report["concept_drift_from"] == "labels"
    assert report["supervised"]["alarms"] == []
    assert report["label_free"]["alarms"] == []
    assert not list((root / "same-report").glob("column-*.png"))


def test_changed_labels_are_concept_drift_and_not_data_drift(digits):
    root, _, files = digits
    report = _monitor(root, files["relabelled"], "relabelled-report")
    assert report["concept_drift"] is True
    sup = report["supervised"]
    assert sup["alarms"]
    assert sup["error_rate"] > 0.8 > sup["reference_error_rate"]
    assert report["drifted_features"] == []


def test_without_labels_concept_drift_comes_from_margin_density(digits):
    root, _, files = digits
    report = _monitor(root, files["same"], "unlabelled-report", labels=None)
    assert report["supervised"] is None
    assert report["concept_drift_from"] == "margin density"
    assert not report["concept_drift"]


def test_a_missing_label_column_is_refused_and_nothing_is_written(digits):
    root, _, files = digits
    with pytest.raises(DataError, match="--labels 'target' is not a column of .*; it has "):
        run_monitor("tiny", files["same"], root / "bad-report", registry=root / "registry",
                    labels="target", json_out=None, gate=Gate(), detector="adwin")
    assert not (root / "bad-report").exists()
    with pytest.raises(ConfigError, match="'cusum' is not known; choose from window, adwin"):
        run_monitor("tiny", files["same"], root / "bad-report", registry=root / "registry",
                    labels=None, json_out=None, gate=Gate(), detector="cusum")


def test_a_categorical_column_is_monitored_through_onehot_and_standardize(tmp_path):
    rng = np.random.default_rng(0)

    def rows(n: int, p: list[float]) -> dict[str, np.ndarray]:
        return {"color": rng.choice(np.array(["red", "green", "blue"], dtype=object), n, p=p),
                "a": rng.normal(size=n)}

    train = rows(3000, [0.6, 0.3, 0.1])
    pq.write_table(pa.table({**train, "label": (train["a"] > 0).astype(int)}),
                   tmp_path / "t.parquet")
    data = DataConfig.model_validate({"source": str(tmp_path / "t.parquet"),
                                      "transforms": [{"type": "onehot", "columns": ["color"]},
                                                     "standardize"]})
    manifest = ingest(data, tmp_path / "data", seed=0)
    x, y = load_split(manifest, "val")
    torch.manual_seed(0)
    model = torch.nn.Linear(manifest.num_features, 2)
    val = (torch.from_numpy(x), torch.from_numpy(y))
    ref = build_reference(manifest, model, val, val)
    color = next(c for c in ref["columns"] if c["name"] == "color")
    assert color["other"] == 0
    assert sum(color["counts"]) == ref["train_rows"]
    assert color["counts"][color["categories"].index("red")] > 0.5 * ref["train_rows"]

    def drifted(new: dict[str, np.ndarray]) -> list[str]:
        cols = transforms.apply(manifest.preprocessing, new)
        results = feature_drift(ref, transforms.to_matrix(cols), manifest.feature_names)
        return [r.column for r in results if r.drifted]

    assert drifted(rows(1000, [0.6, 0.3, 0.1])) == []
    assert drifted(rows(1000, [0.2, 0.3, 0.5])) == ["color"]
    unseen = rows(1000, [0.6, 0.3, 0.1])
    unseen["color"][:200] = "purple"
    assert drifted(unseen) == ["color"]
