"""``strategy: parameter_server`` as a Strategy: the roles, the state, and a lock-step step.

Ranks 0..num_servers-1 are servers; the rest are workers. Every rank builds the same
seeded model. A server keeps only its range of the flat parameter vector (``ShardLayout``),
as the one parameter of a small module, and the optimizer over it; server 0 also keeps a
whole copy of the model, to evaluate and export. A worker keeps the whole model and no
optimizer (its ``optimizer`` is a placeholder that only carries the learning rate).

Where the Strategy contract fits: ``train_step`` is one synchronous step done in lock step
(every worker pushes its gradient, each server averages and applies them, every worker
pulls the result): what ``distml verify`` runs, and with one worker exactly what one
process computes. Where it does not: asynchronous training is not a sequence of steps that
every rank takes together, so the training loop of this strategy is its own
(``distml.training.ps_trainer``), named by its record's ``trainer`` in the strategy
table; it serves, works and coordinates with the threads of ``server`` and ``worker``.
``state_dict`` is a server's own shard (and optimizer and version), saved by each server
with torch.distributed.checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh

from distml.config import TrainSettings
from distml.distributed.param_server.layout import ShardLayout
from distml.distributed.param_server.protocol import Kind, Msg
from distml.distributed.param_server.sockets import SocketChannel
from distml.distributed.param_server.tables import Fetching, tables_of
from distml.distributed.runtime import DistEnv
from distml.distributed.strategy import Batch, LossFn, Strategy
from distml.errors import DistmlError


class Shard(nn.Module):
    """A server's range of the flat parameter vector, as one parameter (so the optimizer
    and the state-dict helpers treat it like any model)."""

    def __init__(self, flat: torch.Tensor) -> None:
        super().__init__()
        self.flat = nn.Parameter(flat)


class ParameterServer(Strategy):
    name = "parameter_server"

    def __init__(self, model: nn.Module, settings: TrainSettings, env: DistEnv, *,
                 mesh: DeviceMesh | None = None, sample: torch.Tensor | None = None) -> None:
        self.ps = settings.parallel.parameter_server
        self.servers = list(range(self.ps.num_servers))
        self.workers = list(range(self.ps.num_servers, env.world_size))
        self.is_server = env.rank in self.servers
        group = None
        if env.distributed and dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo")
        self.channel = SocketChannel(group)
        # A model's sparse tables go to the row servers, before the dense layout is cut.
        self.tables = tables_of(model, self.ps, rank=env.rank, servers=self.servers,
                                channel=self.channel, lr=settings.lr)
        self.layout = ShardLayout.of(model, self.ps.num_servers)
        self.full_model: nn.Module | None = None
        self.final: dict[str, torch.Tensor] | None = None  # what export gives, if set
        self.version = 0
        # Worker <-> server traffic goes over sockets while training (``sockets``); the
        # servers' own, and verify's lock step, over gloo on CPU (see protocol): the group
        # made above when the job's backend is another (nccl).
        super().__init__(model, settings, env, mesh=mesh, sample=sample)

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.is_server:
            return model
        params = [p for p in model.parameters() if p.requires_grad]
        index = self.env.rank
        flat = self.layout.split(self.layout.flatten(params))[index].clone()
        if index == 0:
            self.full_model = model.to("cpu")
        return Shard(flat)

    def build_optimizer(self) -> torch.optim.Optimizer:
        if self.is_server:
            return super().build_optimizer()
        # Workers step nothing; the LR schedule still needs an optimizer to set.
        return torch.optim.SGD([nn.Parameter(torch.zeros(0))], lr=self.settings.lr)

    @property
    def data_rank(self) -> int:
        return self.env.rank - len(self.servers) if not self.is_server else 0

    @property
    def data_size(self) -> int:
        return len(self.workers)

    @property
    def shard(self) -> nn.Parameter:
        assert self.is_server
        return self.model.flat

    # -- lock step (verify) ------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> float:
        if self.tables is not None:
            raise DistmlError("the lock-step parameter-server step (distml verify) does not "
                              "cover a click model's sparse tables; verify a dense model, or "
                              "train this one with distml train")
        if self.is_server:
            return self._serve_step()
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        total = sum(len(x) for x, _ in micro_batches)
        loss_sum = 0.0
        for x, y in micro_batches:
            x, y = x.to(self.env.device), y.to(self.env.device)
            with self.autocast():
                loss = loss_fn(self.model(x), y)
            (loss * (len(x) / total)).backward()
            loss_sum += loss.item() * len(x)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        grad = self.layout.flatten([p.grad for p in params])
        msgs = [Msg(Kind.PUSH, version=self.version, loss=loss_sum / total, samples=total)
                ] * len(self.servers)
        self.channel.request_all(self.servers, msgs, self.layout.split(grad))
        flat = torch.empty(self.layout.numel, dtype=self.layout.dtype)
        for s, part in zip(self.servers, self.layout.split(flat), strict=True):
            self.version = self.channel.recv(s).version
            self.channel.recv_into(s, part)
        self.layout.copy_into(flat, params)
        return loss_sum / total

    def _serve_step(self) -> float:
        """Average one gradient from every worker, apply it, send the result back."""
        acc = torch.zeros_like(self.shard, device="cpu")
        loss_sum, samples = 0.0, 0
        for w in self.workers:
            msg = self.channel.recv(w)
            acc += self.channel.recv_into(w, torch.empty_like(acc))
            loss_sum, samples = loss_sum + msg.loss * msg.samples, samples + msg.samples
        self.shard.grad = acc.div_(len(self.workers))
        self.optimizer.step()  # the lr is the schedule's (the caller steps it)
        self.shard.grad = None
        self.version += 1
        for w in self.workers:
            self.channel.send(w, Msg(Kind.OK, version=self.version), self.shard.detach())
        return loss_sum / max(samples, 1)

    # -- the whole model ---------------------------------------------------------------------

    def gather_flat(self) -> torch.Tensor | None:
        """Every server's shard, on server 0 (None elsewhere); the servers take part, the
        workers do nothing (so a dead worker cannot hold this up)."""
        if not self.is_server:
            return None
        if self.env.rank != 0:
            self.channel.send(0, Msg(Kind.OK), self.shard.detach())
            return None
        parts = [self.shard.detach().clone()]
        for s in self.servers[1:]:
            self.channel.recv(s)
            parts.append(self.channel.recv_into(s, torch.empty(self.layout.size(s))))
        return torch.cat(parts)

    def load_full(self, flat: torch.Tensor) -> nn.Module:
        """Server 0: its whole model, with these parameters."""
        assert self.full_model is not None
        params = [p for p in self.full_model.parameters() if p.requires_grad]
        self.layout.copy_into(flat, params)
        return self.full_model

    def _dense_state_dict(self) -> dict[str, torch.Tensor] | None:
        flat = self.gather_flat()
        if flat is None:
            return None
        if self.final is not None:
            return self.final
        self.load_full(flat)
        return {k: v.detach().clone() for k, v in self.full_model.state_dict().items()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model on server 0 (None elsewhere): the dense part, and the tables
        gathered from the row servers."""
        state = self._dense_state_dict()
        tables = self.tables.gather() if self.tables is not None else None
        if state is None or tables is None:
            return state
        return {**state, **tables}

    def evaluate(self, task: str, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[dict[str, float], Any]:
        """Server 0's whole model (as last loaded with ``load_full``); {} elsewhere."""
        from distml.tasks import evaluate

        if self.full_model is None:
            return {}, None
        if self.tables is not None:
            return evaluate(task, Fetching(self.full_model, self.tables.client), x, y)
        return evaluate(task, self.full_model, x, y)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.full_model.state_dict()) if self.full_model is not None else {}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.final = state

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self, *, tables: bool = True) -> dict[str, Any]:
        """A server's own state (workers have none): its shard, optimizer and version, and
        (``tables``) the rows it holds (``tables/...``: sizes only its checkpoint knows)."""
        if not self.is_server:
            return {}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rows = self.tables.state_dict() if tables and self.tables is not None else {}
        return {"model": model_sd, "optim": optim_sd,
                "version": torch.tensor(self.version, dtype=torch.int64), **rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.is_server:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            self.version = int(state["version"])

    def local_bytes(self) -> dict[str, int]:
        """A server: its shard and its optimizer state; a worker: the whole model and its
        gradients, no optimizer state."""
        out = super().local_bytes()
        if self.is_server:
            out["grads"] = out["params"]  # the gradient of the shard it applies
        else:
            out["optimizer"] = 0
        return out
