"""The logit-map norm by warm-started power iteration against the exact σ of the explicit ``D x D`` map.

The reference forms each head's ``W_Q,hᵀ W_K,h`` in float64 and takes ``torch.linalg.matrix_norm(..., 2)``; geomon's
power path never forms it (matrix-vector products only).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon.probes.logit_map import LogitMapProbe, logit_map_sigma, logit_map_sigma_power

KEY = "geomon/spectral/logit_sigma/attn"


def exact_sigma(w_q: torch.Tensor, w_k: torch.Tensor, scale: float) -> torch.Tensor:
    """σ(W_Q,hᵀ W_K,h)·scale per query head from the explicit D x D maps, float64 (query head h reads key head
    h // (H / Hk))."""
    w_q, w_k = w_q.double(), w_k.double()
    group = w_q.shape[0] // w_k.shape[0]
    maps = torch.stack([w_q[h].T @ w_k[h // group] for h in range(w_q.shape[0])])
    return torch.linalg.matrix_norm(maps, 2) * scale


def _weights(seed: int, heads: int, kv_heads: int, dh: int, d: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, dh, d, generator=g, dtype=dtype), torch.randn(kv_heads, dh, d, generator=g, dtype=dtype))


@pytest.mark.parametrize(("heads", "kv_heads", "dh", "d"), [(4, 4, 8, 32), (6, 2, 8, 24), (2, 1, 16, 12)])
def test_cold_start_is_the_exact_sigma_and_a_singular_vector(heads, kv_heads, dh, d):
    w_q, w_k = _weights(0, heads, kv_heads, dh, d)
    sigma, u = logit_map_sigma_power(w_q, w_k, 0.3)
    expected = exact_sigma(w_q, w_k, 0.3)
    torch.testing.assert_close(sigma, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(logit_map_sigma(w_q, w_k, 0.3), expected, rtol=1e-12, atol=0)
    # u_h is a unit left singular vector: |A_hᵀ u_h| = σ_h
    group = heads // kv_heads
    norms = torch.stack([(w_k[h // group].T @ (w_q[h] @ u[h])).norm() for h in range(heads)]) * 0.3
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(heads, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_warm_start_tracks_slowly_changing_weights(seed):
    """Weights drift a little per step (as training moves them); a few power steps per compute from the previous
    vector keep σ on the exact value, without syncs (tol=None), and far better than a cold start with as many
    steps."""
    heads, kv_heads, dh, d = 6, 3, 8, 48
    w_q, w_k = _weights(seed, heads, kv_heads, dh, d)
    g = torch.Generator().manual_seed(100 + seed)
    _, u = logit_map_sigma_power(w_q, w_k, 0.25)
    worst = 0.0
    for _ in range(30):
        w_q = w_q + 3e-3 * torch.randn(w_q.shape, generator=g, dtype=torch.float64)
        w_k = w_k + 3e-3 * torch.randn(w_k.shape, generator=g, dtype=torch.float64)
        sigma, u = logit_map_sigma_power(w_q, w_k, 0.25, u, steps=4, tol=None)
        expected = exact_sigma(w_q, w_k, 0.25)
        assert bool((sigma <= expected * (1 + 1e-12)).all())  # a lower bound
        worst = max(worst, float(((expected - sigma) / expected).max()))
    assert worst < 1e-4  # top singular values within 4-7% of the next ones here: the slow case of power iteration
    # a cold vector with the same 4 steps is far off: the warm start is what makes 4 steps enough
    start = torch.nn.functional.normalize(torch.randn(heads, d, generator=g, dtype=torch.float64), dim=-1)
    cold, _ = logit_map_sigma_power(w_q, w_k, 0.25, start, steps=4, tol=None)
    assert float(((expected - cold) / expected).max()) > 100 * worst


def test_tolerance_loop_converges_after_a_large_change():
    """A weight change far from the tracked vector: further blocks run until the estimate stops moving."""
    w_q, w_k = _weights(1, 4, 4, 8, 32)
    _, u = logit_map_sigma_power(w_q, w_k, 1.0)
    w_q2, w_k2 = _weights(2, 4, 4, 8, 32)  # unrelated weights: the old vector is only a random start
    sigma, _ = logit_map_sigma_power(w_q2, w_k2, 1.0, u, steps=4, tol=1e-12, max_steps=4000)
    torch.testing.assert_close(sigma, exact_sigma(w_q2, w_k2, 1.0), rtol=1e-9, atol=0)
    one_block, _ = logit_map_sigma_power(w_q2, w_k2, 1.0, u, steps=4, tol=None)
    assert float((exact_sigma(w_q2, w_k2, 1.0) - one_block).abs().max()) > 1e-6  # the loop did the work


class Attn(nn.Module):
    """Fused qkv self-attention (timm / nanoGPT layout), grouped heads not needed here."""

    def __init__(self, d: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn()

    def forward(self, x):
        return self.attn(x)


def _expected(model: Model) -> float:
    w_q, w_k, _ = model.attn.qkv.weight.detach().double().view(3, 3, 8, 24)
    return float(exact_sigma(w_q, w_k, 1 / math.sqrt(8)).max())


def _train(model: Model, monitor: Monitor, steps: range, seed: int, rel: float = 1e-5) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = next(model.parameters()).dtype
    values = []
    for step in steps:
        with monitor.step(step):
            loss = model(torch.randn(2, 5, 24, generator=g, dtype=dtype)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(float(monitor.compute()[KEY]))
        expected = _expected(model)  # the weights after this step's update
        assert expected * (1 - rel) <= values[-1] <= expected * (1 + 1e-6)  # from below, up to float32 rounding
    return values


def test_a_tolerance_converges_each_compute_in_float64(monkeypatch):
    monkeypatch.setattr(LogitMapProbe, "power_tol", 1e-13)
    torch.manual_seed(0)
    model = Model().double()
    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False, attention=False, strict=True).attach(model)
    _train(model, monitor, range(4), seed=0, rel=1e-9)


def test_monitor_tracks_training_and_checkpoints_restore_the_vector():
    torch.manual_seed(0)
    model = Model()
    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False, attention=False, strict=True).attach(model)
    _train(model, monitor, range(3), seed=0)
    probe = monitor.plan.probes["logit_map:attn"]
    assert probe.u is not None and probe.u.shape == (3, 24)
    state, weights = monitor.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    resumed_model = Model()
    resumed_model.load_state_dict(weights)
    resumed = Monitor(every_n_steps=1, head=None, neural_collapse=False, attention=False, strict=True)
    resumed.attach(resumed_model).load_state_dict(state)
    torch.testing.assert_close(resumed.plan.probes["logit_map:attn"].u, probe.u, rtol=0, atol=0)
    # the run and its resumed copy log bit-identical values from the same weights and vector
    assert _train(model, monitor, range(3, 6), seed=1) == _train(resumed_model, resumed, range(3, 6), seed=1)


def test_exact_switch_logs_the_qr_svd_form(monkeypatch):
    calls = []
    import geomon.probes.logit_map as logit_map

    real = logit_map.logit_map_sigma
    monkeypatch.setattr(logit_map, "logit_map_sigma", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(LogitMapProbe, "method", "exact")
    torch.manual_seed(0)
    model = Model()
    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False, attention=False, strict=True).attach(model)
    values = _train(model, monitor, range(2), seed=0)
    assert len(calls) == 2 and len(values) == 2
    assert monitor.plan.probes["logit_map:attn"].u is None  # the power path never ran


class _BoolScale(nn.Module):
    """Attention-like (a fused ``qkv`` and a head count) with a boolean ``scale`` of unknown meaning."""

    def __init__(self):
        super().__init__()
        self.qkv, self.num_heads, self.scale = nn.Linear(16, 48), 2, True

    def forward(self, x):
        return self.qkv(x)


def test_openai_gpt_boolean_scale_is_read_as_the_model_applies_it():
    transformers = pytest.importorskip("transformers")
    from geomon.probes.logit_map import qk_layout

    torch.manual_seed(0)
    config = transformers.OpenAIGPTConfig(
        n_layer=1, n_embd=64, n_head=4, vocab_size=100, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0
    )
    model = transformers.OpenAIGPTModel(config)
    attn, dh = model.h[0].attn, 16
    assert attn.scale is True  # the model's switch for q·k / √Dh
    w = attn.c_attn.weight.detach().double().T  # Conv1D stores [in, out]: the rows are the queries, keys, values
    maps = torch.stack([w[h * dh : (h + 1) * dh].T @ w[64 + h * dh : 64 + (h + 1) * dh] for h in range(4)])
    unscaled = torch.linalg.matrix_norm(maps, 2)

    layout = qk_layout(attn)
    assert layout.scale == 1.0 / math.sqrt(dh)
    # the layout's scale and projections give the model's own attention probabilities
    inputs = []
    hook = attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().double()))
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        probabilities = model(ids, output_attentions=True).attentions[0].double()
    hook.remove()
    x = inputs[0]
    q = torch.einsum("btd,hed->bhte", x, layout.w_q.double()) + layout.b_q.double()[None, :, None]
    k = torch.einsum("btd,hed->bhte", x, layout.w_k.double()) + layout.b_k.double()[None, :, None]
    logits = layout.scale * q @ k.transpose(-1, -2)
    logits = logits.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(logits.softmax(-1), probabilities, atol=1e-6, rtol=0)

    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False, attention=False).attach(model)
    with monitor.step(0):
        model(ids).last_hidden_state.sum().backward()
    logged = monitor.compute()["geomon/spectral/logit_sigma/h.0.attn"]
    assert float(logged) == pytest.approx(float(unscaled.max()) / math.sqrt(dh), rel=1e-9)

    attn.scale = False  # no scaling: the logits are q·k
    assert qk_layout(attn).scale == 1.0
    torch.testing.assert_close(logit_map_sigma(*qk_layout(attn)[:3]), unscaled, rtol=1e-12, atol=0)

    reason = qk_layout(_BoolScale())
    assert isinstance(reason, str) and "'scale' attribute is a bool (True)" in reason
