"""Windowed attention of transformers vision models whose blocks pad their map to whole windows.

At a feature-map size that is not a whole number of windows, the blocks of Swin (``SwinLayer``), Swin V2, Donut's
Swin and MaskFormer's Swin pad their map with zero tokens on the bottom and right (``maybe_pad``) before the cyclic
shift, and VitDet's and SAM's windowed blocks (SAM's vision encoder and its copies: SAM-HQ, GOT-OCR2, DeepSeek-OCR
2, Unlimited-OCR, SLANeXt) pad theirs in ``window_partition``; all run window attention over the padded map and crop
those tokens' outputs away. Their query rows are no token's, and are left out on every path the model has (the
attention function transformers calls, eager or SDPA, and the softmax read of the classes that write their own), as
for timm's windowed families (:data:`geomon.capture.timm_vit._WINDOW_PADDING`): the session notes them at the
attention module's entry.

They are placed from sizes alone, at the entry of the block (:data:`_WINDOW_BLOCKS`): where its map is not a whole
number of its windows, the bottom rows and right columns of the padded map, rolled as the Swin blocks roll it after
padding, cut into windows as the block cuts them; no value is read (a zero-initialised mask token, SimMIM's, is a
real row). Swin's and Donut's layers clamp their window to a map no larger than it (and drop the shift) in their
forward, unless told to partition always: so does the placement. SAM's ``window_size`` is fixed by the checkpoint and
its map by ``image_size``: a 1024 px SAM (64 x 64 patches, windows of 14) pads every windowed block to 70 x 70, so
these rows are there at the size the model is trained at, not only at other sizes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from geomon.capture._session import FROM_BLOCK, bind
from geomon.capture.timm_vit import WindowRows, _first_input, _listed, padded_grid

#: transformers attention modules, by modeling module and class (subclasses too: SAM's SDPA classes), that run over
#: the windows their block pads (:data:`_WINDOW_BLOCKS`): their padding rows come from the block
_WINDOW_PADDING = {
    ("transformers.models.swin.modeling_swin", "SwinAttention"): FROM_BLOCK,
    ("transformers.models.swinv2.modeling_swinv2", "Swinv2SelfAttention"): FROM_BLOCK,
    ("transformers.models.donut.modeling_donut_swin", "DonutSwinSelfAttention"): FROM_BLOCK,
    ("transformers.models.maskformer.modeling_maskformer_swin", "MaskFormerSwinSelfAttention"): FROM_BLOCK,
    ("transformers.models.vitdet.modeling_vitdet", "VitDetAttention"): FROM_BLOCK,
    ("transformers.models.sam.modeling_sam", "SamVisionAttention"): FROM_BLOCK,
    ("transformers.models.sam_hq.modeling_sam_hq", "SamHQVisionAttention"): FROM_BLOCK,
    ("transformers.models.got_ocr2.modeling_got_ocr2", "GotOcr2VisionAttention"): FROM_BLOCK,
    ("transformers.models.deepseek_ocr2.modeling_deepseek_ocr2", "DeepseekOcr2SamVisionAttention"): FROM_BLOCK,
    ("transformers.models.unlimited_ocr.modeling_unlimited_ocr", "UnlimitedOcrSamVisionAttention"): FROM_BLOCK,
    ("transformers.models.slanext.modeling_slanext", "SLANeXtVisionAttention"): FROM_BLOCK,
}


def _swin_layer(names: tuple[str, ...], clamps: bool) -> WindowRows:
    """The padding rows of a Swin-family layer call ``(hidden_states [B, H·W, C], input_dimensions (H, W), ...)``
    (parameters ``names``): it pads the ``H x W`` map on the bottom and right to whole windows, then rolls it by
    ``-shift_size``. ``clamps``: its forward first sets a window no larger than the map and no shift where the map's
    smaller side is no larger than its window (Swin, Donut), unless called with ``always_partition``."""

    def rows(layer: nn.Module, args: tuple, kwargs: dict | None = None) -> Tensor | None:
        call = bind(names, args, kwargs or {})
        x, size = call.get("hidden_states"), call.get("input_dimensions")
        if not isinstance(x, Tensor) or size is None:
            return None
        height, width = int(size[0]), int(size[1])
        window, shift = int(layer.window_size), int(layer.shift_size)
        if clamps and not call.get("always_partition") and min(height, width) <= window:
            window, shift = min(height, width), 0
        return padded_grid(x.shape[0], height, width, window, x.device, shift=shift)

    return rows


def _vit_layer(layout: str) -> WindowRows:
    """The padding rows of a VitDet or SAM windowed layer call ``hidden_states [B, C, H, W]`` ("nchw", VitDet) or
    ``[B, H, W, C]`` ("nhwc", SAM), padded on the bottom and right to whole ``window_size`` windows (0: global)."""

    def rows(layer: nn.Module, args: tuple, kwargs: dict | None = None) -> Tensor | None:
        x = _first_input(args, kwargs)
        if x is None or x.ndim != 4 or x.is_nested:
            return None
        height, width = x.shape[1:3] if layout == "nhwc" else x.shape[2:4]
        return padded_grid(x.shape[0], int(height), int(width), int(layer.window_size), x.device)

    return rows


_SWIN = ("hidden_states", "input_dimensions")
#: the layers that pad their map for the windowed attention they run (:data:`_WINDOW_PADDING`), by modeling module
#: and class: ``rows(layer, args, kwargs) -> [B · windows, Nw] | None`` at the layer's entry (see the module
#: docstring)
_WINDOW_BLOCKS: dict[tuple[str, str], WindowRows] = {
    ("transformers.models.swin.modeling_swin", "SwinLayer"): _swin_layer((*_SWIN, "always_partition"), clamps=True),
    ("transformers.models.swinv2.modeling_swinv2", "Swinv2Layer"): _swin_layer(_SWIN, clamps=False),
    ("transformers.models.donut.modeling_donut_swin", "DonutSwinLayer"): _swin_layer(
        (*_SWIN, "output_attentions", "always_partition"), clamps=True
    ),
    ("transformers.models.maskformer.modeling_maskformer_swin", "MaskFormerSwinLayer"): _swin_layer(
        _SWIN, clamps=False
    ),
    ("transformers.models.vitdet.modeling_vitdet", "VitDetLayer"): _vit_layer("nchw"),
    ("transformers.models.sam.modeling_sam", "SamVisionLayer"): _vit_layer("nhwc"),
    ("transformers.models.sam_hq.modeling_sam_hq", "SamHQVisionLayer"): _vit_layer("nhwc"),
    ("transformers.models.got_ocr2.modeling_got_ocr2", "GotOcr2VisionLayer"): _vit_layer("nhwc"),
    ("transformers.models.deepseek_ocr2.modeling_deepseek_ocr2", "DeepseekOcr2SamVisionLayer"): _vit_layer("nhwc"),
    ("transformers.models.unlimited_ocr.modeling_unlimited_ocr", "UnlimitedOcrSamVisionLayer"): _vit_layer("nhwc"),
    ("transformers.models.slanext.modeling_slanext", "SLANeXtVisionLayer"): _vit_layer("nhwc"),
}


def window_padding_for(module: nn.Module) -> Any:
    """:data:`~geomon.capture._session.FROM_BLOCK` for the windowed attention classes listed (:data:`_WINDOW_PADDING`),
    or None for other classes (and where transformers is not loaded: nothing is imported here)."""
    return _listed(_WINDOW_PADDING, module)


def window_block_for(module: nn.Module) -> WindowRows | None:
    """``rows(layer, args, kwargs) -> [windows, N] | None``, the padding rows a layer of ``module``'s class hands the
    windowed attention it runs (:data:`_WINDOW_BLOCKS`), or None for other classes."""
    return _listed(_WINDOW_BLOCKS, module)
