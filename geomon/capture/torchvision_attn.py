"""Adapter for torchvision's hand-written window attention: Swin (``ShiftedWindowAttention``, v1),
Swin V2 (``ShiftedWindowAttentionV2``) and MaxViT (``RelativePositionalMultiHeadAttention``, window and grid).

They compute ``softmax(q·kᵀ + bias)`` with ``matmul`` / ``einsum``, never SDPA, so Q and K are recomputed at the
module's exit from its input and weights, as its forward forms them:

- **Swin** (``torchvision.models.swin_transformer.shifted_window_attention``): the ``[B, H, W, C]`` input is padded
  with zeros on the bottom and right to whole windows (the padded tokens are keys like any other: zero features,
  projected through ``qkv``), cyclically shifted by ``-shift_size`` (an axis whose window covers the whole padded
  map is not shifted), and cut into windows, which are geomon's batch (``B·nW`` of ``N = Wh·Ww`` tokens). Q and K are
  the first two thirds of ``F.linear(x, qkv.weight, qkv.bias)``, scale ``(C / heads)^-0.5``. The additive mask is the
  relative position bias (``get_relative_position_bias()``) plus, when shifted, the -100 between tokens of different
  regions of the shifted map, as torchvision adds it (-100 is above geomon's -1e4 threshold: those keys are
  counted, as they are attended). Query rows of padding tokens, whose outputs torchvision crops away, are left out
  of every mean (``query_padding``), as padding is everywhere in geomon.
- **Swin V2** adds cosine attention: ``normalize(q)·normalize(k)ᵀ · exp(min(logit_scale, log 100))``, the K third of
  the ``qkv`` bias zeroed (as torchvision does), and the bias ``16·sigmoid(cpb_mlp(...))`` (its
  ``get_relative_position_bias()``). The per-head logit scale is folded into the queries (scale 1), so the reported
  logits are the module's.
- **MaxViT**: the module receives ``[B, G, P, D]`` (windows or grid cells, already partitioned by its
  ``PartitionAttentionLayer``): Q and K are the first two chunks of ``to_qkv`` with ``B·G`` as the batch, scale
  ``scale_factor`` (torchvision's ``feat_dim^-0.5``, applied to the keys), and the relative position bias
  ``get_relative_positional_bias()`` as the additive mask.

Only these exact classes are recomputed (a subclass may compute something else: it is left to the unseen-attention
warning). Attention dropout is not applied (geomon measures the attention computed, not its dropout sample).

Cost of a recomputation: the Q and K projections (``2/3`` of the ``qkv`` GEMM), the bias (V2: its small MLP), and for
shifted Swin windows a ``B·nW·H·N·N`` float mask (the bias plus the region mask, tiled per window as torchvision adds
it); non-shifted windows and MaxViT pass the ``[1, H, N, N]`` bias, broadcast.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomon.capture._projections import projected
from geomon.capture._session import Found, bind

#: the region mask torchvision adds between tokens of different regions of a shifted window
SHIFT_MASK = -100.0


def _class(path: str, name: str) -> type | None:
    return getattr(sys.modules.get(path), name, None)  # torchvision is never imported by geomon


def _regions(padded: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Region label (0, 1, 2) along one axis of the shifted map: torchvision's slices ``[0, -window)``,
    ``[-window, -shift)``, ``[-shift, end)``, the last one that covers a position winning, as when it fills them in
    order."""
    labels = torch.zeros(padded, dtype=torch.int64, device=device)
    for label, (start, stop) in enumerate(((0, -window), (-window, -shift), (-shift, None))):
        labels[start:stop] = label
    return labels


def _windows(grid: Tensor, window: tuple[int, int]) -> Tensor:
    """``[Hp, Wp]`` → ``[nW, Wh·Ww]``: windows in row-major order, their tokens row-major, as torchvision cuts them."""
    (height, width), (wh, ww) = grid.shape, window
    out = grid.reshape(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3)
    return out.reshape((height // wh) * (width // ww), wh * ww)


def swin_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a torchvision ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` call, windows as the batch,
    with the additive bias and shift mask as the module adds them and the padding tokens' query rows left out."""
    x = bind(("x",), args, kwargs)["x"]
    batch, height, width, channels = x.shape
    heads = module.num_heads
    window = (int(module.window_size[0]), int(module.window_size[1]))
    pad_b, pad_r = (window[0] - height % window[0]) % window[0], (window[1] - width % window[1]) % window[1]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    padded = (height + pad_b, width + pad_r)
    shift = [0 if window[i] >= padded[i] else int(module.shift_size[i]) for i in range(2)]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_windows = (padded[0] // window[0]) * (padded[1] // window[1])
    n = window[0] * window[1]
    tokens = x.reshape(batch, padded[0] // window[0], window[0], padded[1] // window[1], window[1], channels)
    tokens = tokens.permute(0, 1, 3, 2, 4, 5).reshape(batch * n_windows, n, channels)

    cosine = type(module) is _class("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2")
    weight, bias = module.qkv.weight[: 2 * channels], module.qkv.bias
    if bias is not None:
        bias = bias[: 2 * channels]
        if cosine:  # V2 zeroes the K third of its bias (a clone) at every call
            bias = torch.cat((bias[:channels], torch.zeros_like(bias[channels:])))
    q, k = (
        F.linear(tokens, weight, bias).reshape(batch * n_windows, n, 2, heads, channels // heads).permute(2, 0, 3, 1, 4)
    )
    if cosine:
        logit_scale = torch.clamp(module.logit_scale, max=math.log(100.0)).exp()  # [H, 1, 1]
        q, k, scale = F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), 1.0
    else:
        scale = float((channels // heads) ** -0.5)

    additive = module.get_relative_position_bias()  # [1, H, N, N]
    if shifted:
        rows = _regions(padded[0], window[0], shift[0], x.device)
        cols = _regions(padded[1], window[1], shift[1], x.device)
        labels = _windows(rows[:, None] * 3 + cols[None, :], window)  # [nW, N]
        regions = (labels[:, None, :] != labels[:, :, None]).to(additive.dtype) * SHIFT_MASK  # [nW, N, N]
        additive = (additive + regions[:, None]).repeat(batch, 1, 1, 1)  # window w of image b is row b·nW + w
    dropped = None
    if pad_b or pad_r:  # padding tokens, moved as the module moves them: their outputs are cropped away
        pad = torch.ones(padded, dtype=torch.bool, device=x.device)
        pad[:height, :width] = False
        if shifted:
            pad = torch.roll(pad, shifts=(-shift[0], -shift[1]), dims=(0, 1))
        dropped = _windows(pad, window).repeat(batch, 1)  # [B·nW, N]
    return [Found("", q, k, additive, False, scale, False, dropped=dropped)]


def maxvit_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a torchvision MaxViT ``RelativePositionalMultiHeadAttention`` call: ``[B, G, P, D]`` input, windows
    (or grid cells) ``B·G`` as the batch, its relative position bias as the additive mask."""
    x = bind(("x",), args, kwargs)["x"]
    batch, groups, n, _ = x.shape
    heads, dim = module.n_heads, module.head_dim
    qk = projected(module.to_qkv, x, 2 * heads * dim).reshape(batch * groups, n, 2, heads, dim).permute(2, 0, 3, 1, 4)
    bias = module.get_relative_positional_bias()  # [1, H, P, P]
    return [Found("", qk[0], qk[1], bias, False, float(module.scale_factor), False)]


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``("torchvision", fallback)`` for Swin's ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` and
    MaxViT's ``RelativePositionalMultiHeadAttention`` (these exact classes); ``(None, None)`` otherwise."""
    cls = type(module)
    if not cls.__module__.startswith("torchvision."):
        return None, None
    for path, name, fallback in (
        ("torchvision.models.swin_transformer", "ShiftedWindowAttention", swin_fallback),
        ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2", swin_fallback),
        ("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention", maxvit_fallback),
    ):
        if cls is _class(path, name):
            return "torchvision", fallback
    return None, None
