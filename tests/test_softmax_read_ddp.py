"""Attention written by hand, read at the module's own softmax, under DDP (2 gloo ranks): each rank's half of every
global batch, padded rows included, logs what one process logs on the whole batch, and training is unchanged."""

from __future__ import annotations

import pytest
import torch

from geomon import Monitor
from tests.capture.test_attention_softmax import B, D, H, N, Net
from tests.ranks import spawn

pytestmark = pytest.mark.slow

STEPS, GLOBAL = 3, 2 * B


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL, N, H * D, generator=g)
    keep = torch.ones(GLOBAL, N, dtype=torch.bool)
    keep[1::2, -2:] = False  # every other sequence right-padded, on both ranks
    return x, keep


def _model() -> Net:
    torch.manual_seed(0)
    model = Net()
    torch.nn.init.normal_(model.attn.qkv.weight, std=0.6)
    return model


def _monitor() -> Monitor:
    return Monitor(every_n_steps=1, query_rows=None, head=None, neural_collapse=False, strict=True)


def _rank_body(rank: int, world: int):
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    monitor = _monitor().attach(ddp)
    logged = []
    for step in range(STEPS):
        x, keep = (part.chunk(world)[rank] for part in _batch(step))
        with monitor.step(step):
            loss = ddp(x, keep).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged.append({key: float(value) for key, value in monitor.compute(step).items()})
    return logged, [p.detach().clone() for p in model.parameters()]


def test_two_ranks_log_what_one_process_logs_at_a_hand_written_softmax(tmp_path):
    ranks = spawn(_rank_body, tmp_path, timeout=300)
    model = _model()
    monitor = _monitor().attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, keep = _batch(step)
        with monitor.step(step):
            loss = model(x, keep).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        single = {key: float(value) for key, value in monitor.compute(step).items()}
        assert "geomon/attention/entropy/attn" in single
        for logged, _ in ranks:
            assert logged[step].keys() == single.keys()
            for key, value in single.items():
                assert logged[step][key] == pytest.approx(value, rel=1e-5, nan_ok=True), (step, key)
    for (_, weights), (_, other) in zip(ranks, ranks[1:] + ranks[:1], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(weights, other, strict=True))  # DDP kept the ranks in step
    for a, b in zip(ranks[0][1], model.parameters(), strict=True):  # the same training as one process, to rounding
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
