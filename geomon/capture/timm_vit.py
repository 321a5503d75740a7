"""Adapter for timm's attention layers (``timm.layers.attention.Attention``, used by ``vision_transformer``, and
``AttentionRope``).

With ``fused_attn=True`` (timm's default on recent torch) the layer calls ``F.scaled_dot_product_attention`` and
the SDPA wrapper sees it. With ``fused_attn=False`` it computes ``(q * scale) @ kᵀ`` itself; then Q and K are
recomputed at the layer's exit from its input: ``qkv`` (its output in the call, read back, or computed again: see
:mod:`geomon.capture._projections`), ``q_norm`` / ``k_norm`` (QK-norm), and for
``AttentionRope`` the rotary embedding passed to the call (prefix tokens left unrotated), with ``num_kv_heads`` key
heads (grouped-query; timm's ``repeat_interleave`` matches geomon's "query head h reads key head h // G").
Masks are already in SDPA semantics in timm (boolean True = may attend, float added); ``is_causal`` wins over a mask,
as in timm. EVA's ``EvaAttention`` is recomputed likewise (its ``q_bias`` / ``k_bias`` added, or separate ``q_proj`` /
``k_proj``). Swin's ``WindowAttention`` (non-fused unless ``TIMM_FUSED_ATTN=2``) is recomputed from ``qkv`` per window
(windows are the batch), with its relative position bias plus the shifted windows' 0 / -100 mask as the additive
mask, exactly what it adds; the query rows of the tokens its block pads the map with to whole windows are left
out, on its SDPA path (``fused_attn=True``) too: the session places them from the block's map size and window at the
block's entry (:data:`_WINDOW_BLOCKS`), notes them at the module's entry and leaves them out of the SDPA call made
inside it, as it does for the padded windows of Swin V2, Swin V2 CR, DaViT, TinyViT, SAM, SAM2 Hiera, EfficientViT
(MSRA), Twins and iFormer's windowed ``SHMA``, on their SDPA path and where they are read at their softmax.
ConViT's ``MHSA`` (plain softmax attention written by hand) is recomputed from ``qkv``.
ConViT's ``GPSA`` mixes a content softmax and a positional softmax through a sigmoid gate, which is not the softmax of
one set of logits: it is listed and named in a warning when it runs, never reported. Other timm attention classes (with
a ``fused_attn`` flag) are seen on their SDPA path only, and named in a warning when they run without it.

Cost of a recomputation: the Q and K projections, ``2·B·N·E·(2·attn_dim)`` FLOPs, plus QK-norm / rotary.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from geomon.capture._projections import projected
from geomon.capture._session import FROM_BLOCK, Found, bind

T = TypeVar("T")
#: ``rows(module, args, kwargs) -> [windows, N] | None``: True at the window tokens of a call that are padding
WindowRows = Callable[[nn.Module, tuple, "dict | None"], "Tensor | None"]


def _classes() -> tuple[type | None, type | None]:
    module = sys.modules.get("timm.layers.attention")  # timm is never imported by geomon
    if module is None:
        return None, None
    return getattr(module, "Attention", None), getattr(module, "AttentionRope", None)


def _qk_width(module: nn.Module) -> int:
    """The Q and K features of a fused ``qkv`` (two thirds of its output): from the layer's ``out_features``, or,
    for a wrapper without one (a LoRA adapter), from the heads and the scale (``head_dim ** -0.5``, as timm sets it)."""
    features = getattr(module.qkv, "out_features", None)
    if isinstance(features, int):
        return 2 * (features // 3)
    return 2 * module.num_heads * round(float(module.scale) ** -2)


def _mask(attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor | None, bool]:
    return (None, True) if is_causal else (attn_mask, False)


def attention_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a ``timm.layers.attention.Attention`` call that did not use SDPA."""
    call = bind(("x", "attn_mask", "is_causal"), args, kwargs)
    x = call["x"]
    batch, n, _ = x.shape
    heads, dim = module.num_heads, module.head_dim
    qk = projected(module.qkv, x, 2 * heads * dim).reshape(batch, n, 2, heads, dim).permute(2, 0, 3, 1, 4)
    q, k = module.q_norm.forward(qk[0]), module.k_norm.forward(qk[1])
    mask, causal = _mask(call.get("attn_mask"), bool(call.get("is_causal", False)))
    return [Found("", q, k, mask, causal, float(module.scale))]


def rope_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a ``timm.layers.attention.AttentionRope`` call that did not use SDPA (rotary applied as timm does)."""
    call = bind(("x", "rope", "attn_mask", "is_causal"), args, kwargs)
    x = call["x"]
    batch, n, _ = x.shape
    heads, dim = module.num_heads, module.head_dim
    if module.qkv is not None:
        qk = projected(module.qkv, x, 2 * heads * dim).reshape(batch, n, 2, heads, dim).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
    else:
        q = projected(module.q_proj, x).reshape(batch, n, heads, dim).transpose(1, 2)
        k = projected(module.k_proj, x).reshape(batch, n, module.num_kv_heads, dim).transpose(1, 2)
    dtype = q.dtype
    q, k = module.q_norm.forward(q), module.k_norm.forward(k)
    rope = call.get("rope")
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        prefix = module.num_prefix_tokens
        half = getattr(module, "rotate_half", False)
        q, k = (
            torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2).to(dtype)
            for t in (q, k)
        )
    mask, causal = _mask(call.get("attn_mask"), bool(call.get("is_causal", False)))
    return [Found("", q, k, mask, causal, float(module.scale))]


def swin_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a Swin ``WindowAttention`` call that did not use SDPA, with its relative position bias and the shifted
    windows' mask (0 / -100, added as Swin adds it) as the additive mask; windows are the batch.

    The query rows of the tokens its block pads the map with are left out by the session (:func:`window_block_for`,
    placed at the block's entry, noted at the module's)."""
    call = bind(("x", "mask"), args, kwargs)
    x, mask = call["x"], call.get("mask")
    windows, n, _ = x.shape
    heads = module.num_heads
    width = _qk_width(module)
    qk = projected(module.qkv, x, width).reshape(windows, n, 2, heads, -1).permute(2, 0, 3, 1, 4)
    bias = module._get_rel_pos_bias()  # [1, H, N, N]
    if mask is not None:  # [num_win, N, N], window w of every image: x is [B * num_win, N, C]
        bias = (bias.unsqueeze(1) + mask[None, :, None]).reshape(-1, heads, n, n)
        bias = bias.repeat(windows // bias.shape[0], 1, 1, 1) if bias.shape[0] != windows else bias
    return [Found("", qk[0], qk[1], bias, False, float(module.scale), False)]


def eva_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a timm ``EvaAttention`` call that did not use SDPA: its ``qkv`` (with the ``q_bias`` / ``k_bias`` it
    adds) or ``q_proj`` / ``k_proj``, QK-norm, rotary with prefix tokens unrotated; mask and causal flag as timm's
    ``resolve_self_attn_mask`` (causal wins)."""
    call = bind(("x", "rope", "attn_mask", "is_causal"), args, kwargs)
    x = call["x"]
    batch, n, _ = x.shape
    heads = module.num_heads
    if module.qkv is not None:
        width = _qk_width(module)
        qk = projected(module.qkv, x, width)
        if module.q_bias is not None:
            qk = qk + torch.cat((module.q_bias, module.k_bias))
        q, k = qk.reshape(batch, n, 2, heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q = projected(module.q_proj, x).reshape(batch, n, heads, -1).transpose(1, 2)
        k = projected(module.k_proj, x).reshape(batch, n, heads, -1).transpose(1, 2)
    dtype = q.dtype
    q, k = module.q_norm.forward(q), module.k_norm.forward(k)
    rope = call.get("rope")
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        prefix, half = module.num_prefix_tokens, getattr(module, "rotate_half", False)
        q, k = (
            torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2).to(dtype)
            for t in (q, k)
        )
    mask, causal = _mask(call.get("attn_mask"), bool(call.get("is_causal", False)))
    return [Found("", q, k, mask, causal, float(module.scale))]


def mhsa_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a ConViT ``MHSA`` call (``softmax(scale · q·kᵀ)``, no mask, computed by hand): the Q and K rows of
    ``qkv``."""
    x = bind(("x",), args, kwargs)["x"]
    batch, n, width = x.shape
    heads = module.num_heads
    qk = projected(module.qkv, x, 2 * width).reshape(batch, n, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    return [Found("", qk[0], qk[1], None, False, float(module.scale), False)]


#: timm attention whose probabilities are not ``softmax(scale · q·kᵀ + additive terms)``: listed, never reported
_NOT_MODELLED = {
    ("timm.models.convit", "GPSA"): "timm:GPSA, gated positional self-attention (a sigmoid-gated mix of a content "
    "softmax and a positional softmax, renormalised), not modelled",
}  # fmt: skip


#: timm attention that is softmax attention, but not over tokens: what its values mean, said once when it is reported
NOTES = {
    ("timm.models.xcit", "XCA"): "cross-covariance attention (XCiT): its softmax runs over the head's channels, so "
    "its rows and keys are the Dh channels, not tokens, and its entropy and max logit are those of that channel "
    "attention (normalised entropy: over log Dh)",
    ("timm.layers.diff_attention", "DiffAttention"): "differential attention ((softmax_1 - λ·softmax_2)·V per "
    "head): each of its heads pools the entropy and max logit of its two component softmaxes; the difference is not "
    "a distribution and has no entropy",
}  # fmt: skip

#: timm attention that computes two component softmaxes per head by design (one SDPA call each on its fused path;
#: one softmax over ``[B, 2H, N, N]``, head ``h``'s components at ``2h`` and ``2h + 1``, on the other)
_COMPONENTS = {("timm.layers.diff_attention", "DiffAttention"): 2}

#: timm attention that is single-head by design and declares no head count: its scores ``[B, Nq, Nk]`` are one head
#: (its fused path, where it has one, calls SDPA with ``[B, 1, N, Dh]``)
_SINGLE_HEAD = {("timm.models.iformer", "SHMA"): 1, ("timm.models.shvit", "SHSA"): 1}

#: timm attention whose softmax scores have the heads folded into their first dimension, batch-major, beside other
#: leading dimensions: HaloAttn's ``[B·H, blocks, Nq, Nk]`` (blocks of queries, each over its haloed window of keys)
_FOLDED_HEADS = {("timm.layers.halo_attn", "HaloAttn"): True}


def heads_for(module: nn.Module) -> int | None:
    """The head count of a timm attention class that declares none (:data:`_SINGLE_HEAD`), else None."""
    return _listed(_SINGLE_HEAD, module)


def folds_heads(module: nn.Module) -> bool:
    """Whether ``module`` is a timm attention class whose scores fold the heads into the first dimension."""
    return bool(_listed(_FOLDED_HEADS, module))


def components_for(module: nn.Module) -> int | None:
    """Component softmaxes per head of a timm attention class that has several (:data:`_COMPONENTS`), else None."""
    return _listed(_COMPONENTS, module)


def note_for(module: nn.Module) -> str | None:
    """What :data:`NOTES` says of ``module``'s class, if anything."""
    return _listed(NOTES, module)


def _listed(table: dict[tuple[str, str], T], module: nn.Module) -> T | None:
    """The entry of ``table`` (keyed by a timm module path and class name) for ``module``'s class, if any."""
    for (path, name), entry in table.items():
        cls = _model_class(path, name)
        if cls is not None and isinstance(module, cls):
            return entry
    return None


def _model_class(path: str, name: str) -> type | None:
    return getattr(sys.modules.get(path), name, None)


#: names the first argument of windowed attention modules has, where a call passes it by keyword
_INPUT_NAMES = ("x", "hidden_states", "hidden_state")


def _first_input(args: tuple, kwargs: dict | None) -> Tensor | None:
    """The call's input, passed first or by one of :data:`_INPUT_NAMES`."""
    x = args[0] if args else next((kwargs[n] for n in _INPUT_NAMES if kwargs and n in kwargs), None)
    return x if isinstance(x, Tensor) else None


def padded_grid(
    batch: int,
    height: int,
    width: int,
    window: int | tuple[int, int],
    device: torch.device,
    shift: int | tuple[int, int] = 0,
    stride: tuple[int, int] | None = None,
) -> Tensor | None:
    """``[batch · windows, Nw]``: True at the window tokens that are padding where a block pads its ``height x width``
    map on the bottom and right to whole ``window`` windows (an int, or ``(Wh, Ww)``); None where it does not pad
    (a whole number of windows). From sizes alone, host ints: no read of the map, no sync.

    ``shift``: the block rolls the padded map by ``-shift`` before cutting windows (transformers' Swin family pads,
    then rolls, so the padding moves with the roll; timm's Swin rolls, then pads, and passes no shift). ``stride``:
    the block's attention pools its queries by that much (SAM2 Hiera): the rows are the pooled windows' queries, the
    padding those outside the ``height // Sh x width // Sw`` pooled map the block crops its output to. Windows
    row-major per image, tokens row-major in each, as the blocks cut them."""
    wh, ww = (window, window) if isinstance(window, int) else (int(window[0]), int(window[1]))
    if wh <= 0 or ww <= 0 or (height % wh == 0 and width % ww == 0):
        return None
    sh, sw = (1, 1) if stride is None else (int(stride[0]), int(stride[1]))
    rows, cols = -(-height // wh), -(-width // ww)
    wh, ww = wh // sh, ww // sw
    grid = torch.ones(rows * wh, cols * ww, dtype=torch.bool, device=device)
    grid[: height // sh, : width // sw] = False
    shifts = (shift, shift) if isinstance(shift, int) else (int(shift[0]), int(shift[1]))
    if any(shifts):
        grid = torch.roll(grid, shifts=(-shifts[0], -shifts[1]), dims=(0, 1))
    windows = grid.reshape(rows, wh, cols, ww).transpose(1, 2).reshape(1, rows * cols, wh * ww)
    return windows.expand(batch, -1, -1).reshape(-1, wh * ww)


def _map(args: tuple, kwargs: dict | None, layout: str) -> tuple[Tensor, int, int] | None:
    """``(x, H, W)`` of a block call whose map ``x`` (passed first or by keyword) is ``[B, H, W, C]`` ("nhwc") or
    ``[B, C, H, W]`` ("nchw"); None for another input."""
    x = _first_input(args, kwargs)
    if x is None or x.ndim != 4 or x.is_nested:
        return None
    height, width = x.shape[1:3] if layout == "nhwc" else x.shape[2:4]
    return x, int(height), int(width)


def _block_padding(layout: str, window: Callable[[nn.Module], Any]) -> WindowRows:
    """The padding rows of a block that pads its map (``layout``: its input's) to whole ``window(block)`` windows on
    the bottom and right and hands them to its attention unshifted (timm rolls before it pads)."""

    def rows(block: nn.Module, args: tuple, kwargs: dict | None = None) -> Tensor | None:
        found = _map(args, kwargs, layout)
        if found is None:
            return None
        x, height, width = found
        return padded_grid(x.shape[0], height, width, window(block), x.device)

    return rows


def hiera_padding(block: nn.Module, args: tuple, kwargs: dict | None = None) -> Tensor | None:
    """The padding rows of a SAM2 Hiera ``MultiScaleBlock`` call ``x [B, H, W, C]``: windowed, it pads its map to
    whole windows; where it pools its queries (``q_stride``, a stage's first block) the rows are the pooled queries,
    the padding those the block crops away with its output (outside ``H // Sh x W // Sw``: each pools some padding)."""
    found = _map(args, kwargs, "nhwc")
    if found is None or not getattr(block, "is_windowed", False):
        return None
    x, height, width = found
    return padded_grid(x.shape[0], height, width, block.window_size, x.device, stride=block.q_stride)


def grouped_padding(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Tensor | None:
    """``[B · windows, ws²]``: the padding tokens of a Twins ``LocallyGroupedAttn`` call ``(x [B, H·W, C], (H,
    W))``, which pads the map to whole ``ws x ws`` windows on the bottom and right itself; None where it does not
    pad. From the call's size alone (no read of ``x``)."""
    call = bind(("x", "size"), args, kwargs or {})
    x, size = call.get("x"), call.get("size")
    if not isinstance(x, Tensor) or size is None:
        return None
    (height, width), ws = size, module.ws
    return padded_grid(x.shape[0], int(height), int(width), ws, x.device)


def shma_padding(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Tensor | None:
    """``[B · windows, ws²]``: the padding tokens of a windowed iFormer ``SHMA`` call ``x [B, C, H, W]``, which pads
    its map to whole ``window_size`` windows on the bottom and right itself (its queries, out of a convolution and
    a batch norm, are not zero there) and crops their outputs away; None where it is global or does not pad. From
    the call's size alone."""
    x, ws = _first_input(args, kwargs), getattr(module, "window_size", 0)
    if not ws or x is None or x.ndim != 4:
        return None
    height, width = x.shape[-2:]
    return padded_grid(x.shape[0], height, width, ws, x.device)


#: windowed attention whose map is padded on the bottom and right to whole windows at a size that is not a whole
#: number of them, the padding tokens' outputs cropped away: their query rows are padding, left out on every path
#: (SDPA, the softmax read, the fallback), from what the session notes at the module's entry. The blocks of Swin, Swin
#: V2, Swin V2 CR, DaViT, TinyViT, SAM, SAM2 Hiera (whose stage's first block pools the queries, and the padding rows
#: with them) and EfficientViT (MSRA) (whose ``CascadedGroupAttention`` takes the windows channels first: reported
#: where it has one head, with more its softmaxes are named in a warning) pad the map: their rows are placed by the
#: enclosing block (:data:`_WINDOW_BLOCKS`, :data:`FROM_BLOCK`) from its map size and window. Twins'
#: ``LocallyGroupedAttn`` and iFormer's windowed ``SHMA`` pad inside the module, as the size of their call says.
#: None of them reads a value: a real token that is exactly zero (a zero-initialised mask token) is a real row.
_WINDOW_PADDING: dict[tuple[str, str], WindowRows | str] = {
    ("timm.models.swin_transformer", "WindowAttention"): FROM_BLOCK,
    ("timm.models.swin_transformer_v2", "WindowAttention"): FROM_BLOCK,
    ("timm.models.swin_transformer_v2_cr", "WindowMultiHeadAttention"): FROM_BLOCK,
    ("timm.models.davit", "WindowAttention"): FROM_BLOCK,
    ("timm.models.tiny_vit", "Attention"): FROM_BLOCK,
    ("timm.models.vision_transformer_sam", "Attention"): FROM_BLOCK,
    ("timm.models.hieradet_sam2", "MultiScaleAttention"): FROM_BLOCK,
    ("timm.models.efficientvit_msra", "CascadedGroupAttention"): FROM_BLOCK,
    ("timm.models.twins", "LocallyGroupedAttn"): grouped_padding,
    ("timm.models.iformer", "SHMA"): shma_padding,
}

#: the blocks that pad their map for the windowed attention they run (:data:`_WINDOW_PADDING`), by class:
#: ``rows(block, args, kwargs) -> [B · windows, Nw] | None`` from the block's input size and window at its entry
#: (:func:`padded_grid`). timm's Swin blocks roll before they pad, so the padding is at the bottom and right of the
#: windows they cut whatever the shift; SAM's window size 0 is a global block.
_WINDOW_BLOCKS: dict[tuple[str, str], WindowRows] = {
    ("timm.models.swin_transformer", "SwinTransformerBlock"): _block_padding("nhwc", lambda b: b.window_size),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"): _block_padding("nhwc", lambda b: b.window_size),
    ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock"): _block_padding("nhwc", lambda b: b.window_size),
    ("timm.models.davit", "SpatialBlock"): _block_padding("nchw", lambda b: b.window_size),
    ("timm.models.tiny_vit", "TinyVitBlock"): _block_padding("nhwc", lambda b: b.window_size),
    ("timm.models.vision_transformer_sam", "Block"): _block_padding("nhwc", lambda b: b.window_size),
    ("timm.models.hieradet_sam2", "MultiScaleBlock"): hiera_padding,
    ("timm.models.efficientvit_msra", "LocalWindowAttention"): _block_padding("nchw", lambda b: b.attn.resolution),
}


def window_padding_for(module: nn.Module) -> Any:
    """``rows(module, args, kwargs) -> [windows, N] | None``, the padding tokens of a windowed attention call of
    ``module``'s class (:data:`_WINDOW_PADDING`), :data:`FROM_BLOCK` where its block places them, or None for other
    classes."""
    return _listed(_WINDOW_PADDING, module)


def window_block_for(module: nn.Module) -> WindowRows | None:
    """``rows(block, args, kwargs) -> [windows, N] | None``, the padding rows a block of ``module``'s class hands
    the windowed attention it runs (:data:`_WINDOW_BLOCKS`), or None for other classes."""
    return _listed(_WINDOW_BLOCKS, module)


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)``: "timm" for the classes handled (ViT ``Attention``, ``AttentionRope``, EVA's
    ``EvaAttention``, Swin's ``WindowAttention``, ConViT's ``MHSA``), a kind naming why for attention that is not
    softmax attention (ConViT's ``GPSA``: no fallback, so it is named in a warning when it runs), "timm:sdpa-only"
    for other timm attention."""
    attention, rope = _classes()
    if rope is not None and isinstance(module, rope):
        return "timm", rope_fallback
    if attention is not None and isinstance(module, attention):
        return "timm", attention_fallback
    eva = _model_class("timm.models.eva", "EvaAttention")
    if eva is not None and isinstance(module, eva):
        return "timm", eva_fallback
    swin = _model_class("timm.models.swin_transformer", "WindowAttention")
    if swin is not None and type(module) is swin:
        return "timm", swin_fallback
    convit = _model_class("timm.models.convit", "MHSA")
    if convit is not None and type(module) is convit:
        return "timm", mhsa_fallback
    kind = _listed(_NOT_MODELLED, module)
    if kind is not None:
        return kind, None  # expected: named in the unseen-attention warning when it runs
    if type(module).__module__.startswith("timm.") and hasattr(module, "fused_attn"):
        return "timm:sdpa-only", None
    return None, None
