"""A click model for tabular data (DLRM-like): hashed categorical features into embedding
bags, dense features alongside, into an MLP.

Input (B, num_dense + len(cardinalities)) float: the dense columns first, then one column
per categorical feature holding its hashed id in [0, cardinality) (exact as float32 below
2^24, the largest cardinality accepted). Each categorical feature has its own table; its
bag is the row of the id (``mode`` sum or mean over a bag of one: the same; a multi-hot
feature would add ids to the bag). Output (B, num_outputs) logits.

The tables are ``bags``: by default ``nn.EmbeddingBag(sparse=True)`` holding every row (one
process trains it with a sparse optimizer; ``sparse=False``, what the zoo's ``click`` builds,
gives dense gradients for distml's other strategies and optimizers); a parameter-server
worker swaps each for a bag that holds only the rows its batch touches
(``distml.distributed.param_server.sparse``).
Built inside ``tables_elsewhere()`` (what a parameter-server job does), the bags are
``AbsentBag``s: no rank allocates a table it would only throw away.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from distml.models.mlp import MLP

MAX_ROWS = 1 << 24  # ids travel as float32 columns: exact below this
_ELSEWHERE: ContextVar[bool] = ContextVar("distml_click_tables_elsewhere", default=False)


@contextmanager
def tables_elsewhere() -> Iterator[None]:
    """Click models built inside hold no table: their rows live on a parameter server's
    row servers."""
    token = _ELSEWHERE.set(True)
    try:
        yield
    finally:
        _ELSEWHERE.reset(token)


class AbsentBag(nn.Module):
    """A table held elsewhere: no row here. Its forward gives zeros of the right shape (the
    input check's forward pass); a parameter-server rank replaces it before training."""

    def __init__(self, num_embeddings: int, dim: int, mode: str) -> None:
        super().__init__()
        self.num_embeddings, self.dim, self.mode = num_embeddings, dim, mode

    def forward(self, ids: Tensor) -> Tensor:
        return torch.zeros(ids.shape[0], self.dim)


class ClickModel(nn.Module):
    def __init__(self, *, num_dense: int, cardinalities: list[int], dim: int = 16,
                 hidden_sizes: list[int] | None = None, num_outputs: int = 1,
                 mode: str = "mean", sparse: bool = True) -> None:
        super().__init__()
        too_big = [c for c in cardinalities if not 0 < c <= MAX_ROWS]
        if too_big:
            raise ValueError(f"click model: cardinalities {too_big} out of range; a table "
                             f"holds 1 to {MAX_ROWS} rows (ids travel as float32)")
        self.num_dense, self.cardinalities, self.dim = num_dense, list(cardinalities), dim
        bag = AbsentBag if _ELSEWHERE.get() else \
            (lambda c, d, mode: nn.EmbeddingBag(c, d, mode=mode, sparse=sparse))
        self.bags = nn.ModuleList(bag(c, dim, mode) for c in cardinalities)
        self.top = MLP(in_features=num_dense + dim * len(cardinalities),
                       num_outputs=num_outputs, hidden_sizes=hidden_sizes or [64, 32])

    def ids(self, x: Tensor) -> Tensor:
        """The categorical columns as int64 ids (B, features)."""
        return x[:, self.num_dense:].long()

    def forward(self, x: Tensor) -> Tensor:
        ids = self.ids(x)
        parts = [x[:, :self.num_dense]]
        for f, bag in enumerate(self.bags):
            parts.append(bag(ids[:, f:f + 1]))
        return self.top(torch.cat(parts, dim=1))
