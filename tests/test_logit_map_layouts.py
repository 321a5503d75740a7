"""Logit-map diagnostics never crash attach: layouts geomon reads exactly are measured, the rest skipped and said."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon.functional import GeomonWarning

timm = pytest.importorskip("timm")

SIGMA = "geomon/spectral/logit_sigma/"


def _train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None, **options):
    """attach + one measured training step; the values and the geomon warnings (attach's included)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeomonWarning)
        monitor = Monitor(every_n_steps=1, entropy_bound=True, neural_collapse=False, **options).attach(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with monitor.step(0):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        values = monitor.compute()
    return values, [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("eva02_tiny_patch14_224", dict(img_size=28, depth=2)),
        ("vit_small_patch16_rope_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2)),
        ("vit_small_patch16_rope_mixed_ape_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2)),
        ("vit_pe_core_tiny_patch16_384", dict(img_size=32, depth=2, ref_feat_shape=(2, 2))),
    ],
)
def test_rotary_timm_models_attach_train_and_skip_their_logit_map_with_a_warning(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    values, said = _train_step(model, x, strict=True)
    for block in range(2):
        layer = f"blocks.{block}.attn"
        assert f"geomon/attention/entropy/{layer}" in values  # the attention itself is still measured
        assert SIGMA + layer not in values  # W_Qᵀ R W_K depends on the offset: not one logit map
        assert sum(f"logit map of {layer!r} is not logged: rotary" in m for m in said) == 1


def test_eva_without_rope_reads_q_bias_beside_a_fused_qkv():
    from timm.models.eva import EvaAttention

    torch.manual_seed(0)
    attn = EvaAttention(16, num_heads=2, qkv_bias=True, qkv_fused=True, norm_layer=nn.LayerNorm)
    model = nn.Sequential()
    model.add_module("attn", attn)
    values, _ = _train_step(model, torch.randn(2, 5, 16), head=None, strict=True)
    w_q, w_k, _ = attn.qkv.weight.detach().double().view(3, 2, 8, 16)
    expected = max(float(torch.linalg.matrix_norm(w_q[h].T @ w_k[h], 2)) for h in range(2)) / math.sqrt(8)
    assert float(values[SIGMA + "attn"]) == pytest.approx(expected, rel=1e-9)
    assert "geomon/spectral/entropy_bound/attn" in values  # non-causal, no mask, q_bias folded in


class OddQKV(nn.Module):
    """Looks like attention (``qkv``, ``num_heads``) but the fused weight is not 3 x H x Dh rows."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 4
        self.qkv = nn.Linear(16, 40)
        self.proj = nn.Linear(40, 16)

    def forward(self, x):
        return self.proj(self.qkv(x))


class NoWeightQKV(nn.Module):
    """A ``qkv`` submodule without a weight of its own (a custom projection, as LeViT's ``LinearNorm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.qkv = nn.Sequential(nn.Linear(16, 48))

    def forward(self, x):
        return self.qkv(x)[..., :16]


class BrokenHeadDim(nn.Module):
    """A ``head_dim`` attribute that raises when read: the reader's failure becomes the warning's reason."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.qkv = 2, nn.Linear(16, 48)

    @property
    def head_dim(self):
        raise RuntimeError("no head_dim here")

    def forward(self, x):
        return self.qkv(x)[..., :16]


class NoHeads(nn.Module):
    """``q_proj`` / ``k_proj`` but no head count anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.q_proj(x) + self.k_proj(x)


class CosineQKV(nn.Module):
    """Swin V2's cosine attention: normalised q and k times a learned per-head logit scale."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.qkv = 2, nn.Linear(16, 48)
        self.logit_scale = nn.Parameter(torch.full((2, 1, 1), math.log(10.0)))

    def forward(self, x):
        return self.qkv(x)[..., :16]


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (OddQKV, r"fused projection's weight has shape \(40, 16\)"),
        (CosineQKV, "cosine attention"),
        (NoWeightQKV, "its query/key projection is a Sequential, not a layer with a 2-D weight"),
        (BrokenHeadDim, "reading its query/key projections failed"),
        (NoHeads, "head count is not known"),
    ],
)
def test_odd_attention_modules_are_skipped_with_one_warning(module, reason):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("odd", module())
    model.add_module("out", nn.Linear(16, 3))
    values, said = _train_step(model, torch.randn(2, 5, 16), head=None)
    mine = [m for m in said if "'odd' is skipped by the logit-map diagnostics" in m]
    assert len(mine) == 1
    assert re.search(reason, mine[0]), mine[0]
    assert not [key for key in values if key.endswith("/odd")]
