"""``entropy_bound=True`` does no linear algebra inside the attention layer's forward (an SVD there would be a host
sync on CUDA): the inputs' spectral norm is taken at ``compute``, and still equals a float64 reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon.functional import GeomonWarning
from tests.reference import ref_entropy_lower_bound

BOUND = "geomon/spectral/entropy_bound/attn"


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _reference(model: Model, x: torch.Tensor) -> float:
    h, e = 2, 16
    w_q, w_k, _ = model.attn.in_proj_weight.detach().double().view(3, h, e // h, e)
    b_q = model.attn.in_proj_bias.detach().double().view(3, h, e // h)[0]
    w_q = torch.cat([w_q, b_q[..., None]], -1)  # the query bias folded in, x' = [x, 1]
    w_k = torch.cat([w_k, torch.zeros_like(w_k[..., :1])], -1)
    sigma = max(float(torch.linalg.matrix_norm(w_q[i].T @ w_k[i], 2)) for i in range(h)) * (e // h) ** -0.5
    xa = torch.cat([x.double(), torch.ones_like(x[..., :1], dtype=torch.float64)], -1)
    gram = max(float(torch.linalg.matrix_norm(seq, 2)) ** 2 for seq in xa)
    return float(ref_entropy_lower_bound(sigma * gram, x.shape[1]))


def test_no_linear_algebra_in_the_forward_and_the_bound_at_compute(monkeypatch):
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(3, 7, 16) * 0.3
    calls: list[str] = []
    for name in ("matrix_norm", "svdvals", "svd", "qr", "eigvalsh"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    monitor = Monitor(every_n_steps=1, entropy_bound=True, head=None, neural_collapse=False, strict=True)
    monitor.attach(model)
    with monitor.step(0):
        model(x).sum().backward()
    assert calls == []  # nothing during the measured step
    values = monitor.compute()
    assert "matrix_norm" in calls  # the inputs' norm, now
    assert float(values[BOUND]) == pytest.approx(_reference(model, x), rel=1e-9)


def test_an_input_modified_in_place_after_the_forward_gets_no_bound():
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 5, 16)
    monitor = Monitor(every_n_steps=1, entropy_bound=True, head=None, neural_collapse=False, strict=True)
    monitor.attach(model)
    with torch.no_grad(), monitor.step(0):
        model(x)
    x.mul_(10.0)  # the rows the layer attended over are gone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeomonWarning)
        values = monitor.compute()
    assert BOUND not in values
    assert any("modified in place" in str(w.message) for w in caught)
    # the next measured step, left alone, is bounded again
    with torch.no_grad(), monitor.step(1):
        model(x)
    assert float(monitor.compute()[BOUND]) == pytest.approx(_reference(model, x), rel=1e-9)
