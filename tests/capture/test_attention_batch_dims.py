"""SDPA calls with more than one batch dimension (windowed vision attention): folded to [batch, heads, N, Dh] by the
module's declared head count, per-head values equal to a float64 softmax of the tensors the module itself built,
and what cannot be folded (ambiguous heads, a mask that would need a copy) said once, never reported wrong.

References: the module's q/k kept by the module (hand-written layouts), or the softmax input of the same timm layer
with its fused path off (timm's Twins, NesT and Hiera windowed attention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geomon.keys import ENTROPY, MAX_LOGIT, key
from tests.capture._reference import measure_once, recorded_softmax

B, W, H, N, D = 2, 3, 4, 5, 8


class Windowed(nn.Module):
    """Attention over ``W`` windows per image, its heads at ``head_axis`` of a 5-D call (1: [B, H, W, N, D] as in
    NesT and Hiera, 2: [B, W, H, N, D] as in Twins); keeps the q/k it passed."""

    def __init__(self, head_axis: int, heads: int = H, windows: int = W) -> None:
        super().__init__()
        self.num_heads, self.windows, self.head_axis = heads, windows, head_axis
        self.qkv = nn.Linear(D * heads, 3 * D * heads)
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # x: [B, W·N, H·D]
        q, k, v = self.qkv(x).reshape(x.shape[0], self.windows, -1, 3, self.num_heads, D).permute(3, 0, 1, 4, 2, 5)
        if self.head_axis == 1:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        self.kept.append((q.detach(), k.detach(), mask))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(x.shape)


class Net(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def _per_head(scores: torch.Tensor, head_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean entropy and max logit per head of float64 softmax rows over the last dim; masked keys are -inf."""
    p = torch.softmax(scores, -1)
    entropy = -torch.special.xlogy(p, p).sum(-1).movedim(head_axis, 0).flatten(1)
    return entropy.mean(1), scores.movedim(head_axis, 0).flatten(1).amax(1)


def _assert_heads(values, details, name, entropy, max_logit):
    torch.testing.assert_close(details[key(ENTROPY, name)].double(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(details[key(MAX_LOGIT, name)].double(), max_logit, rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, name)] == pytest.approx(float(entropy.mean()), rel=1e-5)
    assert values[key(MAX_LOGIT, name)] == pytest.approx(float(max_logit.max()), rel=1e-5)


@pytest.mark.parametrize("head_axis", [1, 2], ids=["heads-first", "windows-first"])
def test_five_d_calls_give_each_head_its_own_rows(head_axis):
    torch.manual_seed(0)
    model = Net(Windowed(head_axis))
    nn.init.normal_(model.attn.qkv.weight, std=0.5)  # sharp rows: heads differ
    values, details, said = measure_once(model, torch.randn(B, W * N, H * D))
    assert not said, said
    q, k, _ = model.attn.kept[0]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    _assert_heads(values, details, "attn", *_per_head(scores, head_axis))


def test_one_head_beside_one_window_is_read_whichever_dimension_holds_it():
    """A 5-D call of one head and one window (a stage of a tiny Hiera): both dimensions have the one head's size,
    and either gives the same rows, so the call is read, not named as ambiguous."""
    torch.manual_seed(0)
    model = Net(Windowed(head_axis=1, heads=1, windows=1))
    nn.init.normal_(model.attn.qkv.weight, std=0.5)
    values, details, said = measure_once(model, torch.randn(B, N, D))
    assert not said, said
    q, k, _ = model.attn.kept[0]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    _assert_heads(values, details, "attn", *_per_head(scores, 1))


def test_a_five_d_mask_laid_out_as_the_queries_is_read_in_place():
    torch.manual_seed(1)
    model = Net(Windowed(head_axis=1))
    nn.init.normal_(model.attn.qkv.weight, std=0.5)
    allowed = torch.rand(B, 1, W, N, N) < 0.6
    allowed[..., 0] = True  # every row keeps a key
    values, details, said = measure_once(model, torch.randn(B, W * N, H * D), mask=allowed)
    assert not said, said
    q, k, _ = model.attn.kept[0]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    _assert_heads(values, details, "attn", *_per_head(scores.masked_fill(~allowed, -math.inf), 1))


@pytest.mark.parametrize(
    ("heads", "windows", "mask_shape", "said"),
    [
        (H, H, None, "2 dimensions"),  # as many windows as heads: which is which, the call cannot say
        (H, W, (1, 1, W, N, N), "without a copy"),  # per window but shared by the batch: regrouping would copy it
    ],
)
def test_what_cannot_be_folded_is_said_once_and_not_reported(heads, windows, mask_shape, said):
    model = Net(Windowed(head_axis=1, heads=heads, windows=windows))
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    values, _, messages = measure_once(model, torch.randn(B, windows * N, heads * D), mask=mask)
    assert key(ENTROPY, "attn") not in values
    assert len([m for m in messages if "'attn'" in m and said in m]) == 1, messages


def _timm_layers():
    timm = pytest.importorskip("timm")
    from timm.models import hiera, nest, twins

    torch.manual_seed(0)
    size = (4, 6)  # Twins: 2 x 3 windows of 2 x 2 tokens
    hiera_layer = hiera.MaskUnitAttention(16, 32, heads=2, q_stride=2, window_size=3, use_mask_unit_attn=True)
    return {
        # name: (layer, inputs, head axis of its attention scores), timm's own layouts
        "twins": (twins.LocallyGroupedAttn(16, num_heads=2, ws=2), (torch.randn(B, 24, 16), size), 2),
        "nest": (nest.Attention(24, num_heads=3, qkv_bias=True), (torch.randn(B, 4, 9, 24),), 1),
        "hiera": (hiera_layer, (torch.randn(B, 5 * 2 * 3, 16),), 1),  # 5 windows of 2 x 3 tokens, pooled queries
    }, timm


def _softmax_inputs(layer: nn.Module, inputs: tuple) -> torch.Tensor:
    """The scores the layer itself hands to softmax on its non-fused path."""
    seen = []
    layer.fused_attn = False
    try:
        with recorded_softmax(lambda scores, dim: seen.append(scores.detach().double())), torch.no_grad():
            layer(*inputs)
    finally:
        layer.fused_attn = True
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", ["twins", "nest", "hiera"])
def test_timm_windowed_attention_equals_its_own_softmax_per_head(name):
    layers, _ = _timm_layers()
    layer, inputs, head_axis = layers[name]
    for parameter in layer.parameters():
        nn.init.normal_(parameter, std=0.4)
    scores = _softmax_inputs(layer, inputs)
    values, details, said = measure_once(Net(layer), *inputs)
    assert not [m for m in said if "'attn'" in m and "not reported" in m], said
    _assert_heads(values, details, "attn", *_per_head(scores, head_axis))


@pytest.mark.parametrize("name", ["twins", "nest", "hiera"])
def test_timm_windowed_attention_by_hand_is_read_at_its_softmax_per_head(name):
    """The same layers with their fused path off: their 5-D scores ([B, windows, H, N, N] or [B, H, windows, N, N])
    are read at their own softmax, the heads found by the declared head count as for SDPA calls."""
    layers, _ = _timm_layers()
    layer, inputs, head_axis = layers[name]
    for parameter in layer.parameters():
        nn.init.normal_(parameter, std=0.4)
    scores = _softmax_inputs(layer, inputs)
    assert scores.ndim == 5
    layer.fused_attn = False
    values, details, said = measure_once(Net(layer), *inputs)
    assert not [m for m in said if "'attn'" in m], said
    _assert_heads(values, details, "attn", *_per_head(scores, head_axis))


@pytest.mark.parametrize("rel_pos", [True, False], ids=["rel-pos-bias", "no-bias"])
def test_heads_folded_into_the_batch_are_read_batch_major_as_at_the_softmax(rel_pos):
    """timm's SAM ViT calls SDPA with ``[B·H, N, Dh]`` (and a ``[B·H, N, N]`` relative position bias): read as
    ``[B, H, N, Dh]`` by the declared head count, batch-major, as its own ``[B·H, N, N]`` scores are read at its
    softmax on its non-fused path, so that both paths report the layer, with the same per-head values."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer_sam import Attention

    torch.manual_seed(0)
    layer = Attention(24, num_heads=3, use_rel_pos=rel_pos, input_size=(3, 4) if rel_pos else None)
    for parameter in layer.parameters():
        nn.init.normal_(parameter, std=0.4)
    inputs = (torch.randn(B, 3, 4, 24),)
    scores = _softmax_inputs(layer, inputs)
    assert scores.shape == (B * 3, 12, 12)
    expected = _per_head(scores.unflatten(0, (B, 3)), 1)
    for fused in (True, False):
        layer.fused_attn = fused
        values, details, said = measure_once(Net(layer), *inputs)
        assert not [m for m in said if "'attn'" in m], said
        _assert_heads(values, details, "attn", *expected)
