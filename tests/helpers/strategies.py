"""A deliberately wrong strategy: gradients summed over ranks instead of averaged."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from distml.distributed.data_parallel import DDP


def _sum_hook(state, bucket):
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class SummedDDP(DDP):
    def wrap(self, model: nn.Module) -> nn.Module:
        ddp = super().wrap(model)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
