"""The hand-written peer of distml's ddp: PyTorch's DDP tutorial loop, as a user would write
it, on the benchmark's model and data held in memory. Run under torchrun:

    torchrun --standalone --nproc-per-node 2 bench/raw_ddp.py --rows 27000 --epochs 3 \\
        --batch 1024 --out result.json

Each rank takes its share of every global batch of a seeded permutation (what a
DistributedSampler gives), AdamW, gradient clipping as distml's defaults do; rank 0 writes
samples/s (all ranks) per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def mlp(features: int, hidden: list[int], classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip([features, *hidden], hidden, strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden[-1], classes))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1024, help="global batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.features, generator=g)
    y = torch.randint(0, a.classes, (a.rows,), generator=g)
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(a.features, a.hidden, a.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    local = a.batch // world
    rates = []
    for epoch in range(a.epochs):
        order = torch.randperm(a.rows, generator=torch.Generator().manual_seed(epoch))
        start, samples = time.perf_counter(), 0
        for i in range(0, a.rows - a.batch + 1, a.batch):
            idx = order[i + rank * local: i + (rank + 1) * local]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            samples += a.batch
        rates.append(samples / (time.perf_counter() - start))
    if rank == 0:
        tmp = f"{a.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"samples_per_s": rates, "world_size": world}, f)
        os.replace(tmp, a.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
