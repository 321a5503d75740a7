"""``Monitor.measure_forward`` under DDP (2 gloo ranks): the extra eager forward of a compiled model, measured on
each rank's half of the global batch, logs what one process logs measuring both halves; and each rank trains as it
would without geomon (the same weights after the same steps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geomon import Monitor
from geomon._tiny_gpt import TinyGPT
from geomon.capture.extra_forward import can_force_eager
from tests.ranks import spawn

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_force_eager(), reason="torch.compiler.set_stance needs torch >= 2.6"),
]

VOCAB, CONTEXT, STEPS = 17, 12, 3


def _global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, CONTEXT + 1), generator=torch.Generator().manual_seed(step))


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, context=CONTEXT)


def _monitor() -> Monitor:
    return Monitor(every_n_steps=1, query_rows=None, window_rows=8 * CONTEXT * STEPS, strict=True)


def _train_on_rank(rank: int, world: int, measure: bool) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    ddp = torch.nn.parallel.DistributedDataParallel(compiled)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    monitor = _monitor().attach(ddp) if measure else None
    logged = []
    for step in range(STEPS):
        rows = _global_batch(step).chunk(world)[rank]
        x, y = rows[:, :-1], rows[:, 1:]
        if monitor is not None:
            monitor.measure_forward(step, compiled, x, labels=y)
        F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            logged.append({key: float(value) for key, value in monitor.compute(step).items()})
    return logged, [p.detach().clone() for p in model.parameters()]


def _rank_body(rank: int, world: int):
    plain = _train_on_rank(rank, world, measure=False)[1]
    logged, watched = _train_on_rank(rank, world, measure=True)
    return logged, all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True)), watched


def test_the_extra_forward_on_two_ranks_logs_what_one_process_logs_and_leaves_training_unchanged(tmp_path):
    ranks = spawn(_rank_body, tmp_path, timeout=300)
    assert all(unchanged for _, unchanged, _ in ranks)
    for a, b in zip(ranks[0][2], ranks[1][2], strict=True):
        assert torch.equal(a, b)  # DDP kept the ranks' weights equal
    # one process: the same weights at each step (taken from rank 0's run), both halves measured in one step
    model = _model()
    monitor = _monitor().attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        rows = _global_batch(step)
        for half in rows.chunk(2):
            monitor.measure_forward(step, model, half[:, :-1], labels=half[:, 1:])
        F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        single = {key: float(value) for key, value in monitor.compute(step).items()}
        for rank, (logged, _, _) in enumerate(ranks):
            assert sorted(logged[step]) == sorted(single), (rank, step)
            for key, value in single.items():
                if key.startswith(("geomon/attention/", "geomon/rankme", "geomon/nc/")):
                    assert logged[step][key] == pytest.approx(value, rel=1e-4, nan_ok=True), (rank, step, key)
    assert any(key.startswith("geomon/rankme") for key in single)  # the window closed at the last step
