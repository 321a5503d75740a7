"""Windowed attention of transformers vision models whose blocks pad their map to whole windows.

At a feature-map size that is not a whole number of windows, the blocks of Swin (``SwinLayer``), Swin V2, Donut's
Swin and MaskFormer's Swin pad their map with zero tokens on the bottom and right (``maybe_pad``) before the cyclic
shift, and VitDet's and SAM's windowed blocks (SAM's vision encoder and its copies: SAM-HQ, GOT-OCR2, DeepSeek-OCR
2, Unlimited-OCR, SLANeXt) pad theirs in ``window_partition``; all run window attention over the padded map and crop
those tokens' outputs away. Their query rows are no token's, and are left out on every path the model has (the
attention function transformers calls, eager or SDPA, and the softmax read of the classes that write their own), as
for timm's windowed families (:data:`geomon.capture.timm_vit._WINDOW_PADDING`): the session notes them at the
attention module's entry.

They are the window tokens of the attention module's input that are exactly zero: the blocks pad the output of a
LayerNorm (Swin, Donut, MaskFormer, VitDet, SAM) or the residual stream (Swin V2, post-norm), and a real token of
either is not the zero vector. SAM's ``window_size`` is fixed by the checkpoint and its map by ``image_size``: a
1024 px SAM (64 x 64 patches, windows of 14) pads every windowed block to 70 x 70, so these rows are there at the
size the model is trained at, not only at other sizes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from geomon.capture.timm_vit import _listed, zero_tokens

#: transformers attention modules, by modeling module and class (subclasses too: SAM's SDPA classes), whose block pads
#: their input windows with zero tokens: ``rows(module, args, kwargs) -> [windows, N]`` (see the module docstring)
_WINDOW_PADDING = {
    ("transformers.models.swin.modeling_swin", "SwinAttention"): zero_tokens,
    ("transformers.models.swinv2.modeling_swinv2", "Swinv2SelfAttention"): zero_tokens,
    ("transformers.models.donut.modeling_donut_swin", "DonutSwinSelfAttention"): zero_tokens,
    ("transformers.models.maskformer.modeling_maskformer_swin", "MaskFormerSwinSelfAttention"): zero_tokens,
    ("transformers.models.vitdet.modeling_vitdet", "VitDetAttention"): zero_tokens,
    ("transformers.models.sam.modeling_sam", "SamVisionAttention"): zero_tokens,
    ("transformers.models.sam_hq.modeling_sam_hq", "SamHQVisionAttention"): zero_tokens,
    ("transformers.models.got_ocr2.modeling_got_ocr2", "GotOcr2VisionAttention"): zero_tokens,
    ("transformers.models.deepseek_ocr2.modeling_deepseek_ocr2", "DeepseekOcr2SamVisionAttention"): zero_tokens,
    ("transformers.models.unlimited_ocr.modeling_unlimited_ocr", "UnlimitedOcrSamVisionAttention"): zero_tokens,
    ("transformers.models.slanext.modeling_slanext", "SLANeXtVisionAttention"): zero_tokens,
}


def window_padding_for(module: nn.Module) -> Any:
    """``rows(module, args, kwargs) -> [windows, N] | None``, the padding tokens of a windowed attention call of
    ``module``'s class (:data:`_WINDOW_PADDING`), or None for other classes (and where transformers is not loaded:
    nothing is imported here)."""
    return _listed(_WINDOW_PADDING, module)
