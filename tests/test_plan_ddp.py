"""Ranks that run different work still reduce the same probes: 2 gloo ranks equal 1 process on the same data.

The model routes its hidden states through attention blocks in an order the caller gives; per step the two ranks run
different routes on their halves of the global batch:

- step 0: rank 0 runs block ``b`` only, rank 1 ``a`` and ``b`` (with state created on first sight, rank 1 waited in
  a reduction of ``a`` that rank 0 never joined); no rank runs ``c``, which is then not logged;
- step 1: the ranks run the blocks in opposite orders (reduced by position, layer ``a`` of one rank was summed with
  layer ``c`` of the other);
- step 2: rank 0's batch is empty;
- step 3: both run every block.

Block ``a`` calls ``F.scaled_dot_product_attention`` from a module no adapter recognises, so it is found at run time
and agreed between the ranks; ``b`` and ``c`` are planned at attach. The 1-process reference runs both halves with
their routes inside the same measured step. Every rank must finish, log exactly the reference's keys, and the same
values (to float64 round-off of a different summation order).
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from geomon import Monitor
from geomon._tiny_gpt import Block
from geomon.functional import GeomonWarning
from geomon.probes.attention import AttentionProbe
from tests.ranks import spawn

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo backend"
)

VOCAB, D, T, BATCH = 23, 16, 10, 8
ROUTES = [  # (rank 0, rank 1) per step
    ("b", "ab"),
    ("cba", "abc"),
    ("", "abc"),
    ("abc", "abc"),
]
EMPTY = {(2, 0)}  # (step, rank) with an empty batch


class Mixer(nn.Module):
    """Attention written by hand: nothing marks it as attention but its call of SDPA."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.proj = heads, nn.Linear(d, 3 * d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (part.reshape(b, t, self.heads, -1).transpose(1, 2) for part in self.proj(x).chunk(3, dim=-1))
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleDict({"a": Mixer(D, 2), "b": Block(D, 4), "c": Block(D, 4)})
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx, route):
        x = self.embed(idx)
        for name in route:
            x = self.blocks[name](x)
        return self.head(self.ln_f(x))


def _global_batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (BATCH, T + 1), generator=g) for _ in ROUTES]


def _half(data, step, rank):
    rows = data.chunk(2)[rank]
    return rows[:0] if (step, rank) in EMPTY else rows


def _monitor():
    return Monitor(every_n_steps=1, embedding_modules=["ln_f", "blocks.a"], window_rows=24, strict=True)


def _as_floats(values):
    return {key: float(value) for key, value in values.items()}


def _ranks_body(rank, world):
    model = Routed().eval()
    monitor = _monitor().attach(model)
    logged = []
    for step, data in enumerate(_global_batches()):
        rows = _half(data, step, rank)
        with torch.no_grad(), monitor.step(step, labels=rows[:, 1:]):
            model(rows[:, :-1], ROUTES[step][rank])
        logged.append(_as_floats(monitor.compute(step)))
    return logged


def _single():
    model = Routed().eval()
    monitor = _monitor().attach(model)
    logged = []
    for step, data in enumerate(_global_batches()):
        for rank in (0, 1):
            rows = _half(data, step, rank)
            with torch.no_grad(), monitor.step(step, labels=rows[:, 1:]):
                model(rows[:, :-1], ROUTES[step][rank])
        logged.append(_as_floats(monitor.compute(step)))
    return logged


@pytest.mark.slow
def test_ranks_running_different_layers_log_what_one_process_logs(tmp_path):
    ranks = spawn(_ranks_body, tmp_path)
    single = _single()
    assert any(key.startswith("geomon/attention/entropy/blocks.a") for key in single[0])  # found at run time
    assert "geomon/attention/entropy/blocks.b.attn" in single[0]
    assert "geomon/attention/entropy/blocks.a" in single[0]  # run on rank 1 alone, found at run time
    assert not [key for key in single[0] if key.endswith("blocks.c")]  # no rank ran it: not logged, and not NaN
    for step, want in enumerate(single):
        for rank, logged in enumerate(ranks):
            got = logged[step]
            assert got.keys() == want.keys(), (step, rank, sorted(got.keys() ^ want.keys()))
            for key, value in want.items():
                assert math.isfinite(value) or key.startswith("geomon/alpha_req"), (step, key, value)
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, rank, key)
    windows = [step for step, want in enumerate(single) if "geomon/rankme/ln_f" in want]
    assert windows, "no RankMe window closed: the test would not check the embedding reduction"
    assert any(key.startswith("geomon/nc/nc1/") for want in single for key in want)


# -- the memory budget under agreement --------------------------------------------------------------------------------
# Two hand-written attention modules, both found at run time: rank 0 runs both, rank 1 only ``a``. The budget holds
# one of them. Every rank must keep the same one (``a``, first in id order) and drop the other, as one process does;
# counting its own not-yet-agreed probes, rank 0 once dropped ``a`` and kept ``b`` while rank 1 kept ``a``, and the
# two ranks then summed different layers into one value.
BUDGET_ROUTES = ("ab", "a")


class TwoMixers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleDict({"a": Mixer(D, 2), "b": Mixer(D, 2)})

    def forward(self, idx, route):
        x = self.embed(idx)
        for name in route:
            x = self.blocks[name](x)
        return x


def _budget_monitor():
    one_probe = AttentionProbe("a", 2).state_bytes()
    return Monitor(every_n_steps=1, head=None, memory_budget_mib=1.5 * one_probe / 2**20)


def _budget_rank(rank, world):
    model = TwoMixers().eval()
    monitor = _budget_monitor().attach(model)
    rows = _global_batches()[0].chunk(2)[rank]
    with torch.no_grad(), monitor.step(0):
        model(rows, BUDGET_ROUTES[rank])
    return _as_floats(monitor.compute(0))


@pytest.mark.slow
def test_ranks_keep_the_same_probes_under_the_memory_budget(tmp_path):
    model = TwoMixers().eval()
    monitor = _budget_monitor().attach(model)
    with pytest.warns(GeomonWarning, match="attention:blocks.b is dropped"), torch.no_grad():
        for rank in (0, 1):
            with monitor.step(0):
                model(_global_batches()[0].chunk(2)[rank], BUDGET_ROUTES[rank])
        single = _as_floats(monitor.compute(0))
    assert "geomon/attention/entropy/blocks.a" in single
    assert not [key for key in single if key.endswith("blocks.b")]
    for rank, got in enumerate(spawn(_budget_rank, tmp_path)):
        assert got.keys() == single.keys(), (rank, sorted(got.keys() ^ single.keys()))
        for key, value in single.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (rank, key)
