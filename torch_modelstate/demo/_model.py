"""The demo's model: a character-level transformer with a BatchNorm in every block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Block", "TinyLM", "build"]

WIDTH = 64
BLOCKS = 3
CONTEXT = 64


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP after a BatchNorm.

    The BatchNorm gives the model state (running statistics), so freezing shows what it
    does to state as well as to parameters.
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.BatchNorm1d(dim, momentum=0.05)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).split(dim, dim=-1)
        heads = (batch, length, self.n_heads, dim // self.n_heads)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, dim))
        h = self.norm_mlp(x.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d wants (N, C, L)
        out: Tensor = x + self.out(F.gelu(self.fc(h)))
        return out


class TinyLM(nn.Module):
    """A character-level GPT. Its head and its embedding are separate modules, as in most
    model code, until `ModelState.tie` makes them one."""

    def __init__(
        self, vocab_size: int, dim: int, n_blocks: int, n_heads: int, context: int
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)  # small: it becomes the head's too

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.head(self.norm(x))
        return logits


def build(vocab_size: int) -> TinyLM:
    """The demo's model for a vocabulary of `vocab_size` characters."""
    return TinyLM(vocab_size, dim=WIDTH, n_blocks=BLOCKS, n_heads=4, context=CONTEXT)
