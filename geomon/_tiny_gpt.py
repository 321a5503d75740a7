"""A small nanoGPT-style character model and the corpus it trains on, for the demo and the tests.

The corpus is the text of Python's own documentation topics (``pydoc_data.topics``, shipped with CPython), so nothing
is downloaded. Attention goes through ``F.scaled_dot_product_attention``, as in most modern models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def load_corpus() -> str:
    """About 460 kB of English technical prose from the Python documentation, shipped with the interpreter."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data: fall back to the standard library's docstrings
        import collections
        import json
        import pathlib

        texts = [m.__doc__ or "" for m in (collections, json, pathlib, torch.nn.Module, F)]
        return "\n".join(texts) * 20
    return "\n".join(topics[key] for key in sorted(topics))


class CharTokenizer:
    """Characters to ids over the corpus's alphabet."""

    def __init__(self, text: str) -> None:
        self.alphabet = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.alphabet)}

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.alphabet)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A pre-LayerNorm decoder: ``blocks.{i}.attn`` are the attention layers, ``ln_f`` feeds the ``head``."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_layer: int = 2, n_head: int = 4, context: int = 64):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def random_batch(data: Tensor, batch: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of the corpus and their next-character targets."""
    start = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
    x = torch.stack([data[s : s + context] for s in start.tolist()])
    y = torch.stack([data[s + 1 : s + context + 1] for s in start.tolist()])
    return x, y
