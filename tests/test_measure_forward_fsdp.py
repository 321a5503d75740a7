"""``Monitor.measure_forward`` under FSDP2 (``fully_shard``, 2 gloo ranks), on the sharded model and on the sharded
model compiled: each rank trains bit for bit as the same FSDP2 run without geomon (losses and the whole weights
gathered by torch), and logs what one process logs when it measures both halves of each global batch by the same
extra forward (σ of the sharded weights included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geomon import Monitor
from geomon.capture.extra_forward import can_force_eager
from tests.ranks import spawn
from tests.test_fsdp import SPECTRAL, _batches, _close, _full_state, _model, _shard2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_force_eager(), reason="torch.compiler.set_stance needs torch >= 2.6"),
]


def _monitor() -> Monitor:
    return Monitor(every_n_steps=1, embedding_modules=["ln_f"], spectral_modules=SPECTRAL, strict=True)


def _train(rank: int, world: int, measure: bool, compiled: bool):
    model = _shard2(_model())
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    monitor = _monitor().attach(model) if measure else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, values = [], []
    for step, (x, y) in enumerate(_batches()):
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        if monitor is not None:
            monitor.measure_forward(step, forward, x, labels=y)
        loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().clone())
        if monitor is not None:
            values.append({key: float(value) for key, value in monitor.compute(step).items()})
    return torch.stack(losses), values, _full_state(model)


def _rank_body(rank: int, world: int):
    runs = {}
    for compiled in (False, True):
        plain_losses, _, plain_state = _train(rank, world, measure=False, compiled=compiled)
        losses, values, state = _train(rank, world, measure=True, compiled=compiled)
        runs[compiled] = {"losses_equal": torch.equal(plain_losses, losses), "values": values,
                          "weights_equal": all(torch.equal(plain_state[k], state[k]) for k in plain_state)}  # fmt: skip
    return runs


def _one_process():
    """Both halves of each global batch measured in one step, then the whole batch trained on."""
    model = _model()
    monitor = _monitor().attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    values = []
    for step, (x, y) in enumerate(_batches()):
        for x_half, y_half in zip(x.chunk(2), y.chunk(2), strict=True):
            monitor.measure_forward(step, model, x_half, labels=y_half)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append({key: float(value) for key, value in monitor.compute(step).items()})
    return values


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_extra_forward_under_fsdp2_trains_as_without_it_and_logs_the_one_process_values(ranks, compiled):
    single = _one_process()
    for rank in ranks:
        run = rank[compiled]
        assert run["losses_equal"] and run["weights_equal"]
        assert len(run["values"]) == len(single)
        for step, (got, want) in enumerate(zip(run["values"], single, strict=True)):
            assert got.keys() == want.keys(), (step, sorted(got.keys() ^ want.keys()))
            for key in want:
                # σ: warm power steps on the same weights; the rest: the same rows measured in another grouping
                assert _close(got[key], want[key]), (step, key, got[key], want[key])
    keys = set(single[-1])
    for family in ("attention/entropy/blocks.1.attn", "rankme/ln_f", "nc/nc1/", "spectral/sigma/head"):
        assert any(family in key for key in keys), family


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_rank_body, tmp_path_factory.mktemp("fsdp_measure"), timeout=300)
