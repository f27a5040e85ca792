"""Spark as an engine: ingestion's partition work as Spark tasks over Arrow batches on
``local[2]``, byte for byte what the local executor writes. One SparkSession for the module."""

from __future__ import annotations

import json
import shutil

import pytest

from distml.data.dataset import MANIFEST
from distml.data.ingest import ingest
from distml.errors import DataError
from distml.execution import make_executor
from tests.helpers.configs import data_config

pytestmark = [pytest.mark.xdist_group("spark"),
              pytest.mark.skipif(shutil.which("java") is None,
                                 reason="Spark needs Java (17) on PATH; none here")]

SYNTHETIC = {
    "source": {"type": "synthetic:classification", "n_samples": 6_000, "n_features": 5,
               "n_classes": 3, "seed": 2},
    "rows_per_partition": 1_500,
}


@pytest.fixture(scope="module")
def spark():
    with make_executor("spark://local[2]", num_workers=2, retries=1) as ex:
        yield ex


def _outputs(root):
    manifest = json.loads((root / MANIFEST).read_text())
    return manifest["preprocessing"], {
        s: [p["sha256"] for p in v["partitions"]] for s, v in manifest["splits"].items()}


def test_spark_ingestion_writes_what_the_local_executor_writes(spark, tmp_path):
    assert spark.name == "spark"
    with make_executor("local", num_workers=2) as ex:
        ingest(data_config(**SYNTHETIC), tmp_path / "local", seed=0, executor=ex)
    ingest(data_config(**SYNTHETIC), tmp_path / "spark", seed=0, executor=spark)
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "spark")


def test_a_failing_item_on_spark_names_its_partition(spark):
    def work(i):
        if i == 2:
            raise DataError("bad rows")
        return i * 10

    with pytest.raises(DataError, match="item 2: bad rows"):
        list(spark.map(work, [0, 1, 2, 3], desc="work", describe=lambda i: f"item {i}"))
    assert list(spark.map(lambda i: i + 1, [1, 2, 3], desc="work")) == [2, 3, 4]


def test_predict_on_spark_writes_what_local_writes(spark, trained_digits, tmp_path):
    from distml.serving.predict import predict

    out = {}
    for executor in ("local", "spark://local[2]"):  # the module's session is reused
        out[executor] = tmp_path / f"{executor.split(':')[0]}.parquet"
        predict("tiny", trained_digits / "digits.parquet", out[executor],
                registry=trained_digits / "registry", executor=executor, num_workers=2,
                id_column="key")
    local, on_spark = (p.read_bytes() for p in out.values())
    assert local == on_spark


def test_torch_distributor_trains_a_ddp_candidate(spark, tmp_path, caplog):
    # barrier mode; spark-local differs only by the flag TorchDistributor is given
    from distml.workflow.pipeline import train_only
    from tests.helpers.configs import TINY, make_config

    raw = {**TINY, "output_dir": str(tmp_path / "runs"), "registry": str(tmp_path / "reg")}
    raw["train"] = {**TINY["train"], "epochs": 1, "candidates": [
        {"name": "ddp", "model": {"type": "mlp", "hidden_sizes": [16]},
         "parallel": {"strategy": "ddp", "world_size": 2, "launcher": "spark"}}]}
    caplog.set_level("INFO", logger="distml.distributed.launch")
    run, results = train_only(make_config(raw))
    (result,) = results
    assert result["world_size"] == 2
    assert (run.folder.candidate("ddp").artifact / "spec.json").is_file()
    assert "ddp: started by Spark's TorchDistributor" in caplog.text  # rank 0 said so


def test_a_spark_dataframe_is_ingested_with_a_content_version(spark, tmp_path):
    import numpy as np
    import pandas as pd

    from distml.data.frames import ingest_dataframe

    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(size=300),
                        "y": rng.integers(0, 3, 300)})
    df = spark.session.createDataFrame(pdf).repartition(3)
    first = ingest_dataframe(df, tmp_path / "one", label_column="y", staging=tmp_path / "s")
    assert sum(first.rows(s) for s in ("train", "val", "test")) == 300
    assert len(first.source["files"]) == 3
    again = ingest_dataframe(df, tmp_path / "two", label_column="y", staging=tmp_path / "s")
    assert again.version == first.version  # the same rows: the same version
    other = spark.session.createDataFrame(pdf.assign(a=pdf.a + 1)).repartition(3)
    changed = ingest_dataframe(other, tmp_path / "three", label_column="y",
                               staging=tmp_path / "s")
    assert changed.version != first.version
