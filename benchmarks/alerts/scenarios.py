"""The alert benchmark's scenarios: small character LMs on Python's documentation text, unstable and healthy.

Every scenario trains the same family of model (:class:`LM`: a GPT with optional QK-layernorm, post-LN blocks,
σReparam on its linears) with AdamW on the corpus geomon's demo uses, and is recorded once: the loss of every step
and every value the monitor computes (all probes on) at every measured step. Alert rules are then *replayed* over
the record (``replay.py``), so tuning a rule never needs a new training run.

Unstable recipes (from the literature; each is checked to diverge or spike, see ``run.py``):

- ``logit_growth``: attention-logit growth at a high learning rate without QK-layernorm (Wortsman et al., 2023,
  "Small-scale proxies for large-scale Transformer training instabilities", and Dehghani et al., 2023);
- ``post_ln_no_warmup``: post-LN blocks at a high learning rate with no warm-up (the σReparam paper's setting,
  Zhai et al., 2023);
- ``output_divergence``: a large learning rate on the output head with no z-loss (output-logit divergence,
  Wortsman et al. 2023 section 3.2; PaLM's z-loss);
- ``large_init``: a large initialisation scale with a small Adam epsilon.

Healthy counterparts: the same recipes with QK-layernorm, with σReparam, or at a sane learning rate, run long enough
for sharp heads to appear. Plus a learning-rate sweep of one model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "unstable" (spikes), "failed" (never trains), "healthy", "collapsed" (not scored) or "sweep"
    lr: float
    steps: int = 1500
    warmup: int = 0  # linear warm-up steps
    qk_norm: bool = False
    post_ln: bool = False
    sigma_reparam: bool = False
    init_std: float | None = None  # None: PyTorch's default initialisation
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    context: int = 32
    batch: int = 32
    seed: int = 0
    every: int = 10  # measure every N steps
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, qk_norm: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        head_dim = d_model // n_head
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.n_head, -1).transpose(1, 2) for y in self.qkv(x).split(d, dim=2))
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, qk_norm: bool, post_ln: bool) -> None:
        super().__init__()
        self.post_ln = post_ln
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_head, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        if self.post_ln:
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    """A small GPT: ``blocks.{i}.attn`` are the attention layers, ``ln_f`` feeds the ``head``."""

    def __init__(self, vocab: int, s: Scenario) -> None:
        super().__init__()
        self.context = s.context
        self.tok = nn.Embedding(vocab, s.d_model)
        self.pos = nn.Embedding(s.context, s.d_model)
        self.blocks = nn.ModuleList(Block(s.d_model, s.n_head, s.qk_norm, s.post_ln) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.d_model)
        self.head = nn.Linear(s.d_model, vocab, bias=False)
        for module in self.modules():
            if s.init_std is not None and isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=s.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lr_at(s: Scenario, step: int) -> float:
    return s.lr * min(1.0, (step + 1) / s.warmup) if s.warmup else s.lr


SPIKE_WINDOW, SPIKE_FACTOR = 20, 1.2


def loss_spike(losses: list[float]) -> int | None:
    """The first step whose mean loss over the last ``SPIKE_WINDOW`` steps exceeds ``SPIKE_FACTOR`` x the lowest
    earlier such mean, or whose loss is not finite; None if there is none."""
    best = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            return step
        if step + 1 < SPIKE_WINDOW:
            continue
        mean = sum(losses[step + 1 - SPIKE_WINDOW : step + 1]) / SPIKE_WINDOW
        if mean > SPIKE_FACTOR * best:
            return step
        best = min(best, mean)
    return None


BASE = Scenario("base", "healthy", lr=1e-3)

SCENARIOS = [
    # attention-logit growth: no QK-norm, Adam at 3e-2, no warm-up; spikes at steps 1349 (seed 0) and 974 (seed 2)
    # on the CPU of the 2026-12-04 records; at 1406 (seed 0) and not within 1500 steps (seed 2) on that of 12-07
    replace(BASE, name="logit_growth", kind="unstable", lr=3e-2, notes="no QK-norm, high LR, no warm-up"),
    replace(BASE, name="logit_growth_seed2", kind="unstable", lr=3e-2, seed=2, notes="the same, seed 2"),
    # recipes that never learn (loss stays near the unigram entropy): no spike to lead, but the loss is degraded
    replace(BASE, name="post_ln_high_lr", kind="failed", lr=2e-2, post_ln=True, notes="post-LN, 2e-2, no warm-up"),
    replace(
        BASE,
        name="large_init",
        kind="failed",
        lr=3e-2,
        init_std=0.5,
        adam_eps=1e-12,
        notes="init std 0.5, Adam eps 1e-12",
    ),
    # healthy counterparts, at the same learning rate where they exist
    replace(BASE, name="logit_growth_qk_norm", kind="healthy", lr=3e-2, qk_norm=True, notes="3e-2 with QK-norm"),
    replace(
        BASE,
        name="logit_growth_sigma_reparam",
        kind="healthy",
        lr=3e-2,
        sigma_reparam=True,
        notes="3e-2 with σReparam on the blocks' linears",
    ),
    # post-LN at 1e-2: every head of its first layer goes one-hot (max logit in the hundreds) while the loss keeps
    # improving (1.33 after 4000 steps, no spike): a real collapse that this small model survives. Not scored as
    # healthy or unstable; the table shows what the rules say about it.
    replace(BASE, name="post_ln_1e-2", kind="collapsed", lr=1e-2, post_ln=True, notes="post-LN at 1e-2"),
    replace(BASE, name="healthy_long", kind="healthy", lr=1e-3, steps=3000, notes="sane LR, long: sharp heads"),
    replace(
        BASE,
        name="demo",
        kind="healthy",
        lr=3e-3,
        d_model=128,
        context=64,
        steps=600,
        every=50,
        notes="geomon demo's run",
    ),
]

SWEEP = [replace(BASE, name=f"sweep_lr_{lr:g}", kind="sweep", lr=lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)]


def by_name(name: str) -> Scenario:
    for s in (*SCENARIOS, *SWEEP):
        if s.name == name:
            return s
    raise KeyError(f"no scenario {name!r}; known: {', '.join(s.name for s in (*SCENARIOS, *SWEEP))}")
