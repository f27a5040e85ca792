"""The Spark launcher: a candidate's ``world_size`` training processes started by pyspark's
``TorchDistributor``, running the same entry point as torchrun (``python -m distml.train
--run-dir RUN --candidate NAME``), on CPU with gloo (on GPUs with nccl where Spark has them).

``train.parallel.launcher: spark`` runs them in barrier mode, one Spark task per process on
the cluster's executors (every executor needs distml, the run folder on a shared file system
or under a storage URL, and Java 17 where Spark runs); ``spark-local`` runs them on the
driver (TorchDistributor's local mode). The Spark master is ``execution.executor``'s when it
is a ``spark://`` one, else ``local[world_size]``; an active SparkSession is used as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from distml.errors import DistmlError

# TorchDistributor runs a script file; this one runs distml.train as ``-m`` would.
_SHIM = "import runpy\nrunpy.run_module('distml.train', run_name='__main__', alter_sys=True)\n"


def launch_on_spark(args: list[str], *, world_size: int, local_mode: bool, master: str,
                    log_dir: Path, what: str) -> None:
    """Run ``python -m distml.train *args`` on ``world_size`` processes through Spark."""
    try:
        from pyspark.ml.torch.distributor import TorchDistributor
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise DistmlError(f"train.parallel.launcher=spark needs pyspark ({e.name}); "
                          "install it with: pip install 'distml[spark]'") from None
    import torch

    if master.startswith("local"):  # local workers run this interpreter (this venv)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = SparkSession.getActiveSession() or (
        SparkSession.builder.master(master).appName("distml-train")
        .config("spark.ui.enabled", "false").getOrCreate())
    log_dir.mkdir(parents=True, exist_ok=True)
    shim = log_dir / "spark_entry.py"
    shim.write_text(_SHIM)
    distributor = TorchDistributor(num_processes=world_size, local_mode=local_mode,
                                   use_gpu=torch.cuda.is_available())
    try:
        distributor.run(str(shim), *args)
    except Exception as e:  # a failed rank: Spark's or torchrun's error, one line
        text = str(e).strip().splitlines()
        raise DistmlError(f"{what} failed on Spark ({spark.sparkContext.master}): "
                          f"{text[-1] if text else type(e).__name__}") from None
