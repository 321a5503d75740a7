"""Windowed attention of transformers vision models at a map size that is not a whole number of windows: each block
pads its map with zero tokens on the bottom and right (before Swin's cyclic shift), runs window attention over them
and crops their outputs away. Their query rows are padding, left out on every path the model has (the eager
attention function or the softmax a class writes itself, and SDPA), per layer and per head. Reference: each layer's
own softmax input with the eager implementation, over the real tokens' rows placed from each block's input size
and its window and shift (by the test's own code, not geomon's)."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tests.capture._reference import assert_layers_equal_their_scores, measure_once, softmax_inputs  # noqa: E402

_SWIN = dict(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=7)
_SAM = dict(image_size=80, patch_size=16, hidden_size=32, output_channels=16, num_hidden_layers=2,
            num_attention_heads=2, window_size=3, global_attn_indexes=[1], mlp_dim=64)  # fmt: skip
#: family -> (config class, model class (name in transformers, or "module:Class"), tiny config, block class, its
#: attention module whose softmax is read, layout of the block's input ("swin": ``(x [B, H·W, C], (H, W))``,
#: "nhwc", "nchw"), image size: 60 x 76 px is 15 x 19 patches of 4, padded to 21 x 21 (then 8 x 10 to 14 x 14); SAM's
#: and VitDet's 80 px are 5 x 5 patches of 16, padded to 6 x 6 by windows of 3, at the size the model is built for)
FAMILIES = {
    "swin": ("SwinConfig", "SwinModel", _SWIN, "SwinLayer", "attention", "swin", (60, 76)),
    "swinv2": ("Swinv2Config", "Swinv2Model", _SWIN, "Swinv2Layer", "attention.self", "swin", (60, 76)),
    "donut_swin": ("DonutSwinConfig", "DonutSwinModel", _SWIN, "DonutSwinLayer", "attention.self", "swin", (60, 76)),
    "maskformer_swin": ("MaskFormerSwinConfig", "MaskFormerSwinModel", _SWIN, "MaskFormerSwinLayer",
                        "attention.self", "swin", (60, 76)),
    "vitdet": ("VitDetConfig", "VitDetModel", dict(image_size=80, pretrain_image_size=80, patch_size=16, hidden_size=32,
               num_hidden_layers=2, num_attention_heads=2, window_size=3, window_block_indices=[0],
               use_relative_position_embeddings=True), "VitDetLayer", "attention", "nchw", (80, 80)),
    "sam": ("SamVisionConfig", "SamVisionModel", _SAM, "SamVisionLayer", "attn", "nhwc", (80, 80)),
    "sam_hq": ("SamHQVisionConfig", "SamHQVisionModel", _SAM, "SamHQVisionLayer", "attn", "nhwc", (80, 80)),
    "got_ocr2": ("GotOcr2VisionConfig", "got_ocr2.modeling_got_ocr2:GotOcr2VisionEncoder", _SAM, "GotOcr2VisionLayer",
                 "attn", "nhwc", (80, 80)),
    "deepseek_ocr2": ("DeepseekOcr2SamVisionConfig",
                      "deepseek_ocr2.modeling_deepseek_ocr2:DeepseekOcr2SamVisionEncoder", _SAM,
                      "DeepseekOcr2SamVisionLayer", "attn", "nhwc", (80, 80)),
    "unlimited_ocr": ("UnlimitedOcrSamVisionConfig",
                      "unlimited_ocr.modeling_unlimited_ocr:UnlimitedOcrSamVisionEncoder", _SAM,
                      "UnlimitedOcrSamVisionLayer", "attn", "nhwc", (80, 80)),
    "slanext": ("SLANeXtVisionConfig", "slanext.modeling_slanext:SLANeXtVisionEncoder", _SAM, "SLANeXtVisionLayer",
                "attn", "nhwc", (80, 80)),
}  # fmt: skip
#: the families with an SDPA path in this transformers (the others refuse ``attn_implementation="sdpa"``)
WITH_SDPA = {"swin", "sam", "sam_hq", "deepseek_ocr2", "unlimited_ocr"}


def _model_class(family):
    name = FAMILIES[family][1]
    if ":" not in name:
        return getattr(transformers, name)
    path, cls = name.split(":")
    return getattr(__import__(f"transformers.models.{path}", fromlist=[cls]), cls)


def _model(family, implementation):
    config_name, _, config = FAMILIES[family][:3]
    built = getattr(transformers, config_name)(**config)
    built._attn_implementation = implementation
    torch.manual_seed(0)
    model = _model_class(family)(built).eval()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):  # maps far from uniform, so that a padding row counted shows
            nn.init.normal_(module.weight, std=0.3)
    for name, parameter in model.named_parameters():
        if "rel_pos" in name or "pos_embed" in name or "position_embeddings" in name:  # SAM's are zeros
            nn.init.normal_(parameter, std=0.3)
    return model


def _real_windows(batch, height, width, window, shift=0):
    """``[B·nW, ws²]``: True at the window tokens that are the map's own: the map padded at the bottom and right,
    then rolled back by the shift (transformers' Swin pads before its cyclic shift), windows row-major per image."""
    grid = torch.zeros(-(-height // window) * window, -(-width // window) * window, dtype=torch.bool)
    grid[:height, :width] = True
    grid = torch.roll(grid, shifts=(-shift, -shift), dims=(0, 1))
    windows = grid.reshape(grid.shape[0] // window, window, grid.shape[1] // window, window).permute(0, 2, 1, 3)
    return windows.reshape(-1, window * window).repeat(batch, 1)


def _reference(family, model, images):
    """Per windowed attention layer: its eager softmax input, and its real rows ``[B', N]`` from the block's input
    size, window and shift (read after the block ran: Swin clamps them to a small map in its forward)."""
    _, _, _, block_class, attention, layout, _ = FAMILIES[family]
    real, handles = {}, []

    def place(block, args, kwargs, output, name):
        x = args[0] if args else kwargs["hidden_states"]
        window, shift = int(block.window_size), int(getattr(block, "shift_size", 0))
        if window == 0:  # a global block
            return
        height, width = {"swin": args[1] if len(args) > 1 else kwargs.get("input_dimensions"),
                         "nhwc": x.shape[1:3], "nchw": x.shape[2:4]}[layout]  # fmt: skip
        real[f"{name}.{attention}"] = _real_windows(x.shape[0], height, width, window, shift)

    for name, block in model.named_modules():
        if type(block).__name__ == block_class:
            hook = lambda *call, name=name: place(*call, name=name)  # noqa: E731
            handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        scores = softmax_inputs(model, images)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (scores[layer], rows) for layer, rows in real.items()}


CASES = [
    pytest.param(family, implementation, id=f"{family}-{implementation}")
    for family in FAMILIES
    for implementation in ("eager", "sdpa")
    if implementation == "eager" or family in WITH_SDPA
]


@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_padded_windows_leave_out_the_padding_tokens_query_rows(family, implementation):
    if not hasattr(transformers, FAMILIES[family][0]):
        pytest.skip(f"transformers {transformers.__version__} has no {FAMILIES[family][0]}")
    assert _model_class(family)._supports_sdpa == (family in WITH_SDPA), f"{family}'s paths changed"
    images = torch.randn(2, 3, *FAMILIES[family][-1], generator=torch.Generator().manual_seed(1))
    reference = _reference(family, _model(family, "eager"), images)
    assert reference and all(not rows.all() for _, (_, rows) in reference.items())  # padding in every layer here
    values, details, said = measure_once(_model(family, implementation), images)
    assert not said, said
    assert_layers_equal_their_scores(values, details, reference)
