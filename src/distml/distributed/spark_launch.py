"""The Spark launcher: a candidate's ``world_size`` training processes started by pyspark's
``TorchDistributor``, running the same entry point as torchrun (``python -m distml.train
--run-dir RUN --candidate NAME``), on CPU with gloo (on GPUs with nccl where Spark has them).

``train.parallel.launcher: spark`` runs them in barrier mode, one Spark task per process on
the cluster's executors (every executor needs distml, the run folder on a shared file system
or under a storage URL, and Java 17 where Spark runs); ``spark-local`` runs them on the
driver (TorchDistributor's local mode). The Spark master is ``execution.executor``'s when it
is a ``spark://`` one, else ``local[world_size]``; an active SparkSession is used as it is,
and one made here is stopped when the training ends.

Each process runs a function (``_rank``), which TorchDistributor ships inside its Spark
tasks, so an executor needs no file from the driver.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from distml.errors import DistmlError

SPARK_LINE = "started by Spark's TorchDistributor"


def _rank(*args: str) -> str:
    """One training process, inside TorchDistributor: ``python -m distml.train *args``
    (which exits its process at the end), with the rank's environment."""
    subprocess.run([sys.executable, "-m", "distml.train", *args], check=True)
    return SPARK_LINE  # rank 0's return value comes back to the driver


def launch_on_spark(args: list[str], *, world_size: int, local_mode: bool, master: str,
                    what: str) -> str:
    """Run ``python -m distml.train *args`` on ``world_size`` processes through Spark;
    returns what rank 0 returned."""
    try:
        from pyspark.ml.torch.distributor import TorchDistributor

        from distml.execution.spark import session
    except ImportError as e:
        raise DistmlError(f"train.parallel.launcher=spark needs pyspark ({e.name}); "
                          "install it with: pip install 'distml[spark]'") from None
    import torch

    spark, owned = session(master, retries=0)
    distributor = TorchDistributor(num_processes=world_size, local_mode=local_mode,
                                   use_gpu=torch.cuda.is_available())
    try:
        returned: Any = distributor.run(_rank, *args)
    except Exception as e:  # a failed rank: Spark's or torchrun's error, one line
        text = str(e).strip().splitlines()
        raise DistmlError(f"{what} failed on Spark ({spark.sparkContext.master}): "
                          f"{text[-1] if text else type(e).__name__}") from None
    finally:
        if owned:
            spark.stop()
    return str(returned)
