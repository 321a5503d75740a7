"""The entropy bound under DDP: a bound holds for the global batch only where it holds on every rank, and is then
the least of the ranks' bounds (the bound of the largest input norm over the global batch); every rank logs the
same. Checked on 2 gloo ranks against a float64 reference over the whole global batch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from geomon import Monitor
from tests.ranks import spawn
from tests.test_entropy_bound_compute_time import BOUND, Model, _reference

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo"),
]

# per phase, what each rank runs: "x" its own batch, "mask" its batch under a padding-like attention mask, "nan" its
# batch with one NaN (its bound cannot be computed: that rank vetoes, and must still join the agreement), "" nothing
PHASES = [("x", "x"), ("x", "mask"), ("", "x"), ("x", "nan")]


def _batches():
    g = torch.Generator().manual_seed(3)
    # rank 1's rows are larger: the global bound is rank 1's, not rank 0's
    return [torch.randn(3, 7, 16, generator=g) * scale for scale in (0.2, 0.5)]


def _rank_body(rank, world):
    torch.manual_seed(0)
    model = Model().eval()
    monitor = Monitor(every_n_steps=1, entropy_bound=True, head=None, neural_collapse=False, strict=True)
    monitor.attach(model)
    x = _batches()[rank]
    mask = torch.zeros(7, 7, dtype=torch.bool)
    mask[:, -2:] = True  # the last two keys blocked
    logged = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, phase in enumerate(PHASES):
            with torch.no_grad(), monitor.step(step):
                if phase[rank] == "x":
                    model(x)
                elif phase[rank] == "mask":
                    model.attn(x, x, x, attn_mask=mask, need_weights=False)
                elif phase[rank] == "nan":
                    model(torch.where(torch.arange(7)[:, None] == 3, torch.nan, x))
            value = monitor.compute(step).get(BOUND)
            logged.append(None if value is None else float(value))
    return logged


def test_every_rank_logs_the_bound_of_the_global_batch(tmp_path):
    torch.manual_seed(0)
    model = Model()
    x0, x1 = _batches()
    want = [_reference(model, torch.cat([x0, x1])), None, _reference(model, x1), None]
    assert want[0] < _reference(model, x0)  # the ranks' own bounds differ: the test tells them apart
    for rank, logged in enumerate(spawn(_rank_body, tmp_path)):
        for step, (got, expected) in enumerate(zip(logged, want, strict=True)):
            if expected is None:
                assert got is None, (rank, step, got)
            else:
                assert got == pytest.approx(expected, rel=1e-9), (rank, step)
