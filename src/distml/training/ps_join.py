"""A worker that joins a running parameter-server job (``distml ps-worker RUN_DIR``).

The job's server 0 publishes, while the candidate trains, its servers' addresses and what
a worker must do alike (batch size, the data's seed) in the candidate's folder
(``CandidateDir.ps_join``). A joining worker reads the run's saved config and data, builds
the same model (its weights are the servers': it pulls them before its first gradient),
connects to every server (server 0 gives it a fresh id, never a rank's nor another
joiner's), and takes items from the work queue until the job ends. SIGTERM (or Ctrl-C) is
a clean leave: it finishes its current item, reports it and says goodbye; the servers stop
counting it (ssp's slowest, sync's quorum). Killed, it is lost like any dead worker: its
item is re-queued. Either way the job goes on.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distml.data.dataset import Manifest
from distml.data.tensors import SplitTensors
from distml.device import default_device
from distml.distributed.param_server.layout import ShardLayout
from distml.distributed.param_server.protocol import Kind
from distml.distributed.param_server.sockets import PeerLostError, SocketChannel, connect
from distml.distributed.param_server.work import ItemReader
from distml.distributed.param_server.worker import ServerLostError, Worker
from distml.errors import DistmlError
from distml.imports import load_object
from distml.models.click import ClickModel
from distml.rundir import RunDir
from distml.tasks import loss_fn
from distml.training.candidate import build_candidate_model
from distml.training.trainer import peak_memory

logger = logging.getLogger(__name__)


def wait_for_job(path: Path, timeout_s: float) -> dict[str, Any]:
    """The running job's join file, waited for up to ``timeout_s`` (the job may be starting)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise DistmlError(f"no parameter-server job is training in {path.parent} (no "
                              f"{path.name} after {timeout_s:g} s); start the job first, or "
                              "check the run folder and --candidate")
        time.sleep(0.2)
    return json.loads(path.read_text())


def join_job(run_dir: Path, candidate: str, *, timeout_s: float = 60.0,
             on_join: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Work for the job training ``candidate`` in ``run_dir`` until it ends (or SIGTERM);
    ``on_join`` is told the worker's id once admitted. Returns {"worker": its id, "left":
    whether it left before the end, **its statistics} ({"worker": None} if the job had
    ended)."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    cand = cfg.train.candidate(candidate)
    settings = cfg.train.settings_for(cand)
    if not settings.parallel.record.servers:
        raise DistmlError(f"candidate {candidate!r} trains with train.parallel.strategy="
                          f"{settings.parallel.strategy}; only a parameter_server candidate "
                          "takes workers that join")
    ps = settings.parallel.parameter_server
    info = wait_for_job(run.candidate(candidate).ps_join, timeout_s)
    manifest = Manifest.read(run.data)
    model, _ = build_candidate_model(cfg, cand, manifest, SplitTensors.load(manifest, "val").x[:2])
    if isinstance(model, ClickModel):
        raise DistmlError(f"candidate {candidate!r} has sparse tables (a click model): a worker "
                          "that joins mid-run covers dense models only; start the job with "
                          "the workers it needs (train.parallel.world_size)")
    device = default_device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    channel = SocketChannel()
    try:
        hello = connect(channel, info["servers"], wid=-1)
    except PeerLostError as e:
        channel.close()
        raise DistmlError(f"could not reach the job's servers ({e}); it may have just "
                          "ended, or this machine cannot reach their node (a job launched "
                          "without --rdzv-endpoint listens on loopback only)") from None
    if hello.kind != Kind.OK:
        channel.close()
        logger.info("the job takes no more workers (training is over)")
        return {"worker": None}
    worker_class = load_object(ps.worker, what="parameter-server worker") if ps.worker else Worker
    worker = worker_class(
        rank=hello.item, model=model.to(device), layout=ShardLayout.of(model, ps.num_servers),
        channel=channel, servers=list(range(ps.num_servers)),
        reader=ItemReader(manifest, batch_size=info["batch_size"],
                          batches_per_item=ps.batches_per_item, seed=info["seed"],
                          config=cfg.data.loader),
        loss_fn=lambda out, y: loss_fn(manifest.task, out, y), mode=ps.mode, device=device,
        autocast=lambda: torch.autocast(device.type, dtype or torch.float32,
                                        enabled=dtype is not None),
        grad_clip=settings.grad_clip, peak_memory=peak_memory)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.leaving.set())
    if on_join is not None:
        on_join(hello.item)
    try:
        stats = worker.run()
    except ServerLostError as e:
        raise DistmlError(f"{e}; the job's servers are gone (the job failed, or restarts "
                          "from its checkpoint: join it again)") from None
    finally:
        channel.close()
    return {"worker": hello.item, "left": worker.left, **stats}
