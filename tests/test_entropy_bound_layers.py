"""The entropy lower bound (Zhai et al., Theorem 3.1) is logged only where it is a bound.

Every logged ``geomon/spectral/entropy_bound/<layer>`` is checked against every attention row of the measured step,
whose entropy the test computes itself: float64 logits from the layer's own input (a forward pre-hook) and its own
weights, an explicit softmax. Layers outside the theorem (causal rows, masks and additive terms, cross-attention,
rotary embeddings) get no bound and one warning saying why.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from geomon import Monitor
from geomon.functional import GeomonWarning, entropy_lower_bound
from tests.reference import ref_entropy_lower_bound

BOUND = "geomon/spectral/entropy_bound/"


# layers under test: each returns (W_Q [H, Dh, D], b_Q [H, Dh] | None, W_K [Hk, Dh, D], b_K | None, scale) as read
# by the test from the module's own parameters (independently of geomon's reader)
class GQAttention(nn.Module):
    """Separate biased q_proj / k_proj with fewer key heads than query heads (grouped-query attention)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, *, causal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, causal
        self.q_proj = nn.Linear(dim, heads * head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        group = self.num_heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=self.causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def qk(self):
        h, hk, dh = self.num_heads, self.kv_heads, self.head_dim
        w_q, w_k = self.q_proj.weight.view(h, dh, -1), self.k_proj.weight.view(hk, dh, -1)
        return w_q, self.q_proj.bias.view(h, dh), w_k, self.k_proj.bias.view(hk, dh), dh**-0.5


class MHA(nn.Module):
    """``nn.MultiheadAttention`` as self-attention (its training path), optionally causal or padded."""

    def __init__(self, dim: int, heads: int, *, causal: bool = False, padding: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.causal, self.padding = causal, padding

    def forward(self, x):
        causal, padding = self.causal, self.padding
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if causal else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal, key_padding_mask=padding)[0]


def _timm_attention(dim: int, heads: int) -> nn.Module:
    from timm.layers import Attention

    return Attention(dim, num_heads=heads, qkv_bias=True)


def _eva_attention(dim: int, heads: int) -> nn.Module:
    from timm.models.eva import EvaAttention

    return EvaAttention(dim, num_heads=heads, qkv_bias=True, qkv_fused=True, norm_layer=nn.LayerNorm)


def _qk_of(module: nn.Module):
    if hasattr(module, "qk"):
        return module.qk()
    if isinstance(module, nn.MultiheadAttention):
        h, e = module.num_heads, module.embed_dim
        w_q, w_k, _ = module.in_proj_weight.view(3, h, e // h, e)
        b_q, b_k, _ = module.in_proj_bias.view(3, h, e // h)
        return w_q, b_q, w_k, b_k, (e // h) ** -0.5
    h, dh = module.num_heads, module.head_dim
    weight = module.qkv.weight
    w_q, w_k, _ = weight.view(3, h, dh, weight.shape[1])
    if module.qkv.bias is not None:  # timm Attention
        b_q, b_k, _ = module.qkv.bias.view(3, h, dh)
    else:  # timm EVA: q_bias, k_bias (a zero buffer) beside a bias-free qkv
        b_q, b_k = module.q_bias.view(h, dh), module.k_bias.view(h, dh)
    return w_q, b_q, w_k, b_k, float(module.scale)


class Wrapper(nn.Module):
    def __init__(self, attn: nn.Module, **call) -> None:
        super().__init__()
        self.attn, self.call = attn, call

    def forward(self, x):
        return self.attn(x, **self.call)


def ref_row_entropies(x, w_q, b_q, w_k, b_k, scale, causal=False) -> np.ndarray:
    """Entropy (nats) of every attention row [B, H, T]: float64 logits, explicit softmax."""
    x = x.detach().double().numpy()
    w_q, w_k = w_q.detach().double().numpy(), w_k.detach().double().numpy()
    b_q = np.zeros(w_q.shape[:2]) if b_q is None else b_q.detach().double().numpy()
    b_k = np.zeros(w_k.shape[:2]) if b_k is None else b_k.detach().double().numpy()
    group = w_q.shape[0] // w_k.shape[0]
    q = np.einsum("btd,hed->bhte", x, w_q) + b_q[None, :, None]
    k = np.einsum("btd,hed->bhte", x, w_k) + b_k[None, :, None]
    k = np.repeat(k, group, axis=1)
    logits = scale * np.einsum("bhie,bhje->bhij", q, k)
    if causal:
        t = logits.shape[-1]
        logits = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def ref_bound(x, w_q, b_q, w_k, scale, *, augment: bool = True) -> float:
    """Theorem 3.1 from explicit D x D logit maps in float64: with a query bias, x' = [x, 1], W_Q' = [W_Q, b_Q] and
    W_K' = [W_K, 0] (the key bias adds a per-row constant, which softmax ignores)."""
    x = x.detach().double().numpy()
    w_q, w_k = w_q.detach().double().numpy(), w_k.detach().double().numpy()
    if augment and b_q is not None:
        x = np.concatenate([x, np.ones_like(x[..., :1])], -1)
        w_q = np.concatenate([w_q, b_q.detach().double().numpy()[..., None]], -1)
        w_k = np.concatenate([w_k, np.zeros_like(w_k[..., :1])], -1)
    group = w_q.shape[0] // w_k.shape[0]
    sigma = max(np.linalg.norm(w_q[h].T @ w_k[h // group], 2) for h in range(w_q.shape[0])) * scale
    gram = max(np.linalg.norm(seq @ seq.T, 2) for seq in x)
    return ref_entropy_lower_bound(sigma * gram, x.shape[1])


def _measure(model: nn.Module, x: torch.Tensor, *, train: bool = True):
    """One measured step: the values, the inputs of every `attn` module (pre-hook) and the geomon warnings."""
    inputs = {}

    def keep(name):
        def hook(module, args):
            inputs.setdefault(name, args[0].detach())

        return hook

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in model.named_modules() if n == "attn"]
    monitor = Monitor(every_n_steps=1, entropy_bound=True, head=None, neural_collapse=False, strict=True)
    monitor.attach(model)
    model.train(train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeomonWarning)
        with monitor.step(0):
            model(x).sum().backward()
        values = monitor.compute()
    for handle in handles:
        handle.remove()
    return values, inputs, [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]


LAYOUTS = {
    "timm_qkv": lambda d, h: Wrapper(_timm_attention(d, h)),
    "eva_q_bias": lambda d, h: Wrapper(_eva_attention(d, h)),
    "mha": lambda d, h: MHA(d, h),
    "gqa_q_k_proj": lambda d, h: Wrapper(GQAttention(d, h, max(1, h // 2), d // h)),
}


def _randomise(model: nn.Module, g: torch.Generator, weight_scale: float, bias_scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = bias_scale if "bias" in name else weight_scale / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith("k_bias"):  # EVA's zero key bias
                b.copy_(torch.randn(b.shape, generator=g) * bias_scale)


def _check_layer(layout, seed, t, heads, input_scale, weight_scale, bias_scale):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LAYOUTS[layout](16, heads)
    _randomise(model, g, weight_scale, bias_scale)
    x = torch.randn(3, t, 16, generator=g) * input_scale
    values, inputs, said = _measure(model, x)
    assert [key for key in values if key.startswith(BOUND)] == [BOUND + "attn"], said  # logged: the test can fail
    bound = float(values[BOUND + "attn"])
    w_q, b_q, w_k, b_k, scale = _qk_of(model.attn)
    entropy = ref_row_entropies(inputs["attn"], w_q, b_q, w_k, b_k, scale)
    assert entropy.shape == (3, heads, t)
    assert bound <= entropy.min() + 1e-9  # below EVERY row
    assert bound == pytest.approx(ref_bound(inputs["attn"], w_q, b_q, w_k, scale), rel=1e-7, abs=1e-12)
    return bound, entropy


@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    seed=st.integers(0, 2**31 - 1),
    t=st.integers(2, 10),
    heads=st.sampled_from([1, 2, 4]),
    input_scale=st.floats(0.02, 3.0),
    weight_scale=st.floats(0.05, 8.0),
    bias_scale=st.floats(0.0, 6.0),
)
@settings(max_examples=40, deadline=None)
def test_logged_bound_is_below_every_row_of_biased_layers(layout, seed, t, heads, input_scale, weight_scale,
                                                          bias_scale):  # fmt: skip
    _check_layer(layout, seed, t, heads, input_scale, weight_scale, bias_scale)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bound_is_informative_on_small_inputs_and_holds_on_sharp_layers(layout):
    # small inputs: the bound is far from 0, so "below every row" is a real constraint
    bound, entropy = _check_layer(layout, 3, 8, 2, input_scale=0.05, weight_scale=0.5, bias_scale=0.2)
    assert bound > 0.5 * math.log(8)
    # large norms: near one-hot rows, the bound still below them (and not negative)
    bound, entropy = _check_layer(layout, 4, 8, 2, input_scale=4.0, weight_scale=8.0, bias_scale=6.0)
    assert entropy.min() < 0.2 and 0.0 <= bound <= entropy.min() + 1e-9


def test_the_query_bias_must_be_folded_in():
    # W_Q ≈ 0 and a large query bias: σ(W_Qᵀ W_K) ≈ 0, so the bias-free bound is ≈ log T, yet the rows are sharp
    # (logits b_Qᵀ W_K x_j); the logged bound folds the bias in and stays below them
    g = torch.Generator().manual_seed(0)
    model = Wrapper(_timm_attention(16, 2))
    _randomise(model, g, weight_scale=1.0, bias_scale=0.0)
    with torch.no_grad():
        model.attn.qkv.weight[:16].mul_(1e-4)
        model.attn.qkv.bias[:16].copy_(torch.randn(16, generator=g) * 8)
    x = torch.randn(2, 8, 16, generator=g)
    values, inputs, _ = _measure(model, x)
    w_q, b_q, w_k, b_k, scale = _qk_of(model.attn)
    entropy = ref_row_entropies(inputs["attn"], w_q, b_q, w_k, b_k, scale)
    naive = ref_bound(inputs["attn"], w_q, b_q, w_k, scale, augment=False)
    assert naive > entropy.min() + 0.5  # the bias-free form is not a bound here
    assert float(values[BOUND + "attn"]) <= entropy.min() + 1e-9


def _no_bound(model, x, match, *, train=True):
    values, _, said = _measure(model, x, train=train)
    assert not [key for key in values if key.startswith(BOUND)]
    mine = [m for m in said if "no entropy bound is logged for 'attn'" in m]
    assert len(mine) == 1 and match in mine[0], said  # said once, naming the layer and the reason
    return values


@pytest.mark.parametrize("seed", range(3))
def test_causal_layers_get_no_bound_and_a_warning(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 16, generator=g) * 0.1
    _no_bound(Wrapper(GQAttention(16, 4, 2, 4, causal=True)), x, "causal")
    _no_bound(MHA(16, 4, causal=True), x, "causal")


def test_masks_additive_biases_and_cross_attention_get_no_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, generator=g)
    # ALiBi-like additive position bias
    slopes = torch.arange(6.0)[None, :] - torch.arange(6.0)[:, None]
    alibi = Wrapper(GQAttention(16, 2, 2, 8), bias=-0.5 * slopes.abs())
    _no_bound(alibi, x, "mask or additive term")
    # right padding in nn.MultiheadAttention
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    _no_bound(MHA(16, 2, padding=padding), x, "mask or additive term")

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x.flip(1), x.flip(1), need_weights=False)[0]

    _no_bound(Cross(), x, "cross-attention")


def test_per_row_causal_form_holds_and_the_layer_form_does_not():
    # Row i of a causal layer sees i keys x_1..x_i: Theorem 3.1 applied to that row needs (σ_i, i) with its own
    # prefix's |X_≤i|²; the T-key value is above the first row (one key, entropy 0): why no layer value is logged
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        t, d = 10, 6
        x = torch.randn(t, d, generator=g, dtype=torch.float64) * 0.3
        w = torch.randn(d, d, generator=g, dtype=torch.float64)
        logits = x @ w @ x.T
        for i in range(1, t + 1):
            row = torch.softmax(logits[i - 1, :i], -1)
            entropy = float(-(row * row.clamp_min(1e-300).log()).sum())
            prefix = torch.linalg.matrix_norm(x[:i], 2) ** 2
            assert entropy >= float(entropy_lower_bound(torch.linalg.matrix_norm(w, 2) * prefix, i)) - 1e-12
        layer = float(entropy_lower_bound(torch.linalg.matrix_norm(w, 2) * torch.linalg.matrix_norm(x, 2) ** 2, t))
        assert layer > 0.0  # the first row's entropy


def test_gpt2_logs_no_bound_above_its_rows():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.config._attn_implementation = "eager"
    monitor = Monitor(every_n_steps=1, entropy_bound=True, head=None, neural_collapse=False, strict=True)
    monitor.attach(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeomonWarning)
        with torch.no_grad(), monitor.step(0):
            attentions = model(ids, output_attentions=True).attentions
        values = monitor.compute()
    said = [str(w.message) for w in caught]
    for layer, probs in enumerate(attentions):
        p = probs.double()
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
        name = f"transformer.h.{layer}.attn"
        assert float(values.get(BOUND + name, 0.0)) <= float(entropy.min()) + 1e-9
        assert BOUND + name not in values  # causal rows: not logged, and said once
        assert sum(f"no entropy bound is logged for {name!r}" in m and "causal" in m for m in said) == 1
        assert f"geomon/spectral/logit_sigma/{name}" in values


def test_a_mask_generated_per_key_chunk_gets_no_bound():
    # nn.MultiheadAttention with need_weights=True and its own [L, S] mask: the capture hands the mask on as a rule
    # generated per key chunk (AttentionCall.pattern), not as attn_mask; it still changes the logits
    band = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() > 2  # True = not allowed

    class Banded(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=True, attn_mask=band)[0]

    _no_bound(Banded(), torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0)), "mask or additive term")
