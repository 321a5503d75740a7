"""Real tokens that are exactly zero in windowed attention over a map of whole windows (no padding at all): SimMIM's
mask token is zero-initialised, so at init a masked patch enters the first layer as the zero vector (transformers'
Swin: LayerNorm(0) is its zero bias; Swin V2: the residual stream itself). They are real query rows, kept: the
padding rows are placed from the block's map size and window, never from the tokens' values. Reference: each
layer's own softmax input (eager, or the fused path off), over every row."""

import pytest
import torch
from torch import nn

from tests.capture._reference import assert_layers_equal_their_scores, measure_once, softmax_inputs

#: 32 px at patches of 4 is an 8 x 8 map, windows of 4 (the second block of a stage shifted by 2), then 4 x 4
_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
             encoder_stride=8)  # fmt: skip


def _normal_weights(model):
    for module in model.modules():
        if isinstance(module, nn.Linear):  # maps far from uniform, so that a row left out would show
            nn.init.normal_(module.weight, std=0.3)


def _first_input_zeros(model, attention_class, run):
    """How many tokens of the first ``attention_class`` call's input are exactly zero (so the test is not vacuous)."""
    seen = []
    module = next(m for m in model.modules() if type(m).__name__ == attention_class)
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(int((args[0] == 0).all(-1).sum())))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def _all_rows(scores):
    """Every query row of a layer's softmax input ``[B', H, N, N]``: ``[B', N]`` all True."""
    return torch.ones(scores.shape[0], scores.shape[-2], dtype=torch.bool)


@pytest.mark.parametrize(
    ("family", "implementation"),
    [("Swin", "eager"), ("Swin", "sdpa"), ("Swinv2", "eager")],
    ids=["swin-eager", "swin-sdpa", "swinv2-eager"],
)
def test_hf_simmim_zero_mask_tokens_keep_their_rows(family, implementation):
    transformers = pytest.importorskip("transformers")

    def build(implementation):
        built = getattr(transformers, f"{family}Config")(**_SWIN)
        built._attn_implementation = implementation
        torch.manual_seed(0)
        model = getattr(transformers, f"{family}ForMaskedImageModeling")(built).eval()
        _normal_weights(model)
        return model

    eager = build("eager")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masked = torch.rand(2, 64, generator=torch.Generator().manual_seed(2)) < 0.6
    run = dict(pixel_values=images, bool_masked_pos=masked)
    attention = {"Swin": "SwinAttention", "Swinv2": "Swinv2SelfAttention"}[family]
    assert _first_input_zeros(eager, attention, lambda: eager(**run)) == int(masked.sum())
    suffix = {"Swin": ".attention", "Swinv2": ".attention.self"}[family]
    scores = softmax_inputs(eager, **run)
    reference = {
        name + suffix: (scores[name + suffix], _all_rows(scores[name + suffix][0]))
        for name, module in eager.named_modules()
        if type(module).__name__ == f"{family}Layer"
    }
    assert len(reference) == 4
    values, details, said = measure_once(build(implementation), **run)
    assert not said, said
    assert_layers_equal_their_scores(values, details, reference)


@pytest.mark.parametrize(
    ("name", "block", "fused"),
    [
        ("swin_tiny_patch4_window7_224", "SwinTransformerBlock", True),
        ("swin_tiny_patch4_window7_224", "SwinTransformerBlock", False),
        ("swinv2_tiny_window8_256", "SwinTransformerV2Block", False),
    ],
    ids=["swin-fused", "swin-not-fused", "swinv2"],
)
def test_timm_zero_patch_tokens_keep_their_rows(name, block, fused):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=32, embed_dim=16, depths=(2, 2),
                              num_heads=(2, 2), window_size=4, strict_img_size=False).eval()  # fmt: skip
    _normal_weights(model)
    masked = torch.rand(2, 8, 8, 1, generator=torch.Generator().manual_seed(2)) < 0.6
    model.patch_embed.register_forward_hook(lambda m, args, out: out.masked_fill(masked, 0.0))  # [B, H, W, C]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert _first_input_zeros(model, "WindowAttention", lambda: model(images)) == int(masked.sum())
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    scores = softmax_inputs(model, images)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    reference = {
        f"{layer}.attn": (scores[f"{layer}.attn"], _all_rows(scores[f"{layer}.attn"][0]))
        for layer, module in model.named_modules()
        if type(module).__name__ == block
    }
    assert len(reference) == 4
    values, details, said = measure_once(model, images)
    assert not said, said
    assert_layers_equal_their_scores(values, details, reference)
