"""A small decoder-only transformer language model over byte tokens (nanoGPT-style).

Pre-norm blocks of causal self-attention and an MLP; the output head shares the token
embedding's weights. ``blocks`` is an ``nn.ModuleList`` so that pipeline and tensor parallel
plans can address each block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        # No key bias: it adds q·b to a whole row of scores, which softmax ignores, so its
        # gradient is zero up to rounding (and Adam would amplify that noise).
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)  # its p feeds the fused attention kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # (B, T, C) -> (B, H, T, C/H); -1 lets a tensor-parallel shard hold fewer heads.
        q, k, v = (
            proj(x).view(b, t, -1, x.shape[-1] // self.num_heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout.p if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Input (B, T) int64 tokens with T <= context_length; output (B, T, vocab_size) logits."""

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        context_length: int,
        num_layers: int,
        num_heads: int,
        dim: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(context_length, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.drop(self.tok_emb(tokens) + self.pos_emb(pos))  # (B, T, C)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))  # (B, T, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.logits(x)

    def pipeline_layers(self) -> list[tuple[Any, list[str]]]:
        """(callable, the module paths it owns) in forward order: the embeddings, each
        block, the final norm and head (which shares the token embedding's weight)."""
        return [(self.embed, ["tok_emb", "pos_emb", "drop"]),
                *[(block, [f"blocks.{i}"]) for i, block in enumerate(self.blocks)],
                (self.logits, ["norm", "head"])]

    def tensor_plan(self) -> dict[str, Any]:
        """Megatron-style: per block, q, k, v split by output columns (each rank holds
        num_heads / degree heads) and the attention output by input rows; the MLP's up
        projection by columns and down projection by rows. Two all-reduces per block;
        embeddings, norms and the head stay whole."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        plan: dict[str, Any] = {}
        for i in range(len(self.blocks)):
            plan.update({f"blocks.{i}.attn.{n}": ColwiseParallel() for n in "qkv"})
            plan[f"blocks.{i}.attn.out"] = RowwiseParallel()
            plan[f"blocks.{i}.mlp.0"] = ColwiseParallel()
            plan[f"blocks.{i}.mlp.2"] = RowwiseParallel()
        return plan

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, num_tokens: int, *, greedy: bool = True
    ) -> torch.Tensor:
        """Extend (B, T0) tokens by ``num_tokens``; greedy or sampled."""
        out = prompt
        for _ in range(num_tokens):
            logits = self(out[:, -self.context_length :])[:, -1]  # (B, V)
            nxt = (
                logits.argmax(-1, keepdim=True)
                if greedy
                else torch.multinomial(logits.softmax(-1), 1)
            )
            out = torch.cat([out, nxt], dim=1)
        return out
