"""Windowed timm attention at an image size that is not a whole number of windows: each block pads its map with
zero tokens on the bottom and right, runs window attention over them and crops their outputs away. Their query rows
are padding, left out on every path (SDPA with ``fused_attn=True``, the softmax read or the recomputation with it
off), per layer and per head. Reference: each layer's own softmax input with the fused path off, over the real
tokens' rows placed from each block's input size (by the test's own code, not geomon's)."""

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from geomon.keys import ENTROPY, MAX_LOGIT, key  # noqa: E402
from tests.capture._reference import assert_layers_equal_their_scores, entropy_of, measure_once, softmax_inputs  # noqa: E402

#: family -> (timm model, its tiny config, module path of the class holding the window size, that class, layout of
#: its input: "nhwc", "nchw", or "size" (the attention module itself, given ``(x, (H, W))``), image size)
FAMILIES = {
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
             strict_img_size=False), "swin_transformer", "SwinTransformerBlock", "nhwc", (60, 76)),
    # always_partition keeps a window of 12 over the second stage's 8 x 8 map (padded to 12 x 12), where timm would
    # otherwise shrink the window to the map
    "swin_always_partition": ("swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=32, depths=(2, 2),
                              num_heads=(2, 4), window_size=12, always_partition=True, strict_img_size=False),
                              "swin_transformer", "SwinTransformerBlock", "nhwc", (64, 64)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
               window_size=8, strict_img_size=False), "swin_transformer_v2", "SwinTransformerV2Block", "nhwc",
               (60, 76)),
    "swinv2_cr": ("swinv2_cr_tiny_ns_224", dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                  window_size=7, strict_img_size=False), "swin_transformer_v2_cr", "SwinTransformerV2CrBlock", "nhwc",
                  (60, 76)),
    "davit": ("davit_tiny", dict(embed_dims=(32, 64), depths=(1, 1), num_heads=(2, 4), window_size=7), "davit",
              "SpatialBlock", "nchw", (60, 76)),
    "tiny_vit": ("tiny_vit_5m_224", dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                 window_sizes=(7, 7, 7, 7)), "tiny_vit", "TinyVitBlock", "nhwc", (60, 76)),
    "sam": ("samvit_base_patch16", dict(img_size=80, embed_dim=32, depth=2, num_heads=2, window_size=3,
            global_attn_indexes=(1,)), "vision_transformer_sam", "Block", "nhwc", (64, 80)),
    "sam2_hiera": ("sam2_hiera_tiny", dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 2), window_spec=(8, 6, 6, 3),
                   global_att_blocks=()), "hieradet_sam2", "MultiScaleBlock", "nhwc", (64, 128)),
    "twins": ("twins_svt_small", dict(embed_dims=(32, 64), depths=(1, 1), num_heads=(2, 4), mlp_ratios=(2, 2),
              sr_ratios=(2, 1), wss=(7, 7)), "twins", "LocallyGroupedAttn", "size", (60, 76)),
}  # fmt: skip


def _model(family, fused):
    name, config = FAMILIES[family][:2]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **config).eval()
    for module in model.modules():
        if isinstance(module, nn.Linear):  # maps far from uniform, so that a padding row counted would show
            nn.init.normal_(module.weight, std=0.3)
    _set_fused(model, fused)
    return model


def _set_fused(model, fused):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def _real_windows(batch, height, width, window, stride=None):
    """``[B·nW, Wh·Ww]``: True at the window tokens that are the map's own (the padding comes after any shift, at the
    bottom and right), windows row-major per image, as the blocks cut them. ``stride``: the block pools its queries
    by that much (SAM2 Hiera): the pooled windows' rows, the real ones those the block keeps when it crops its output
    to its pooled map, ``height // stride`` by ``width // stride``."""
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (1, 1) if stride is None else stride
    grid = torch.zeros(-(-height // wh) * wh // sh, -(-width // ww) * ww // sw, dtype=torch.bool)
    grid[: height // sh, : width // sw] = True
    wh, ww = wh // sh, ww // sw
    windows = grid.reshape(grid.shape[0] // wh, wh, grid.shape[1] // ww, ww).permute(0, 2, 1, 3)
    return windows.reshape(-1, wh * ww).repeat(batch, 1)


def _reference(family, model, images):
    """Per windowed attention layer: its softmax input with the fused path off, ``[B', H, N, N]``, and its real rows
    ``[B', N]`` from the block's input size."""
    _, _, path, cls, layout, _ = FAMILIES[family]
    block_class = getattr(__import__(f"timm.models.{path}", fromlist=[cls]), cls)
    real, handles = {}, []
    for name, block in model.named_modules():
        if not isinstance(block, block_class):
            continue
        window = block.ws if layout == "size" else block.window_size
        if window in (0, (0, 0)):  # SAM's and SAM2 Hiera's global blocks
            continue
        layer = name if layout == "size" else f"{name}.attn"
        stride = getattr(block, "q_stride", None)  # SAM2 Hiera's blocks that pool their queries

        def place(module, args, layer=layer, window=window, stride=stride):
            x = args[0]
            batch, (height, width) = x.shape[0], {"nhwc": x.shape[1:3], "nchw": x.shape[2:4], "size": args[-1]}[layout]
            real[layer] = _real_windows(batch, height, width, window, stride)

        handles.append(block.register_forward_pre_hook(place))
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    _set_fused(model, False)
    try:
        scores = softmax_inputs(model, images)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in fused.items():
            module.fused_attn = flag
    return {layer: (scores[layer], rows) for layer, rows in real.items()}


#: layers whose map is a whole number of windows at the family's size: SAM2 Hiera's first stage must be (its window
#: position embedding is tiled over it), and its second stage's first block keeps its window
WHOLE = {"sam2_hiera": {"blocks.0.attn", "blocks.1.attn"}}
#: families whose attention always writes its softmax (no fused path in timm): read at the softmax only
ALWAYS_WRITTEN = {"swinv2", "swinv2_cr"}
CASES = [
    pytest.param(family, fused, id=f"{family}-{'fused' if fused else 'not-fused'}")
    for family in FAMILIES
    for fused in (True, False)
    if not (fused and family in ALWAYS_WRITTEN)
]


@pytest.mark.parametrize(("family", "fused"), CASES)
def test_padded_windows_leave_out_the_padding_tokens_query_rows(family, fused):
    model = _model(family, fused)
    has_fused_path = any(hasattr(m, "fused_attn") for m in model.modules())
    assert has_fused_path == (family not in ALWAYS_WRITTEN), f"timm {timm.__version__} changed {family}'s paths"
    images = torch.randn(2, 3, *FAMILIES[family][-1], generator=torch.Generator().manual_seed(1))
    reference = _reference(family, model, images)
    whole = {layer for layer, (_, rows) in reference.items() if rows.all()}
    assert reference and whole == WHOLE.get(family, set())  # padding in every layer here but those listed
    values, details, said = measure_once(model, images)
    assert not said, said
    assert_layers_equal_their_scores(values, details, reference)


class _Layer(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "not-fused"])
def test_iformer_windowed_shma_leaves_out_the_padding_tokens_query_rows(fused):
    """iFormer's ``SHMA`` with ``window_size`` pads its own ``[B, C, H, W]`` input to whole windows (inside the
    module: its queries, out of a convolution and a batch norm, are not zero there) and crops their outputs away:
    their query rows are left out on both paths, from the size of the call. A 6 x 10 map in windows of 4."""
    from timm.models.iformer import SHMA

    torch.manual_seed(0)
    model = _Layer(SHMA(dim=16, window_size=4)).eval()
    for parameter in model.parameters():  # far from uniform maps, so that a padding row counted would show
        nn.init.normal_(parameter, std=0.4)
    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    model.attn.fused_attn = False
    (scores,) = softmax_inputs(model, x)["attn"]
    rows = _real_windows(2, 6, 10, 4)
    assert scores.shape == (2 * 2 * 3, 16, 16) and not rows.all()
    entropy = entropy_of(torch.softmax(scores, dim=-1))
    model.attn.fused_attn = fused
    values, details, said = measure_once(model, x)
    assert not said, said
    torch.testing.assert_close(details[key(ENTROPY, "attn")].double(), entropy[rows].mean()[None], rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, "attn")] == pytest.approx(float(entropy[rows].mean()), rel=1e-5)
    assert values[key(MAX_LOGIT, "attn")] == pytest.approx(float(scores.amax(-1)[rows].max()), rel=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_efficientvit_msra_windows_leave_out_the_padding_tokens_query_rows(heads):
    """EfficientViT (MSRA)'s ``LocalWindowAttention`` pads its ``[B, C, H, W]`` map with zero tokens to whole windows
    and crops their outputs away; its ``CascadedGroupAttention`` takes the windows channels first and writes its
    softmax (no fused path). With one head it is reported, the padding tokens' query rows left out; with two, one
    softmax per head in one call, it is named in a warning, not reported. A 6 x 10 map in windows of 4."""
    from timm.models.efficientvit_msra import LocalWindowAttention

    torch.manual_seed(0)
    model = _Layer(LocalWindowAttention(16, 8 // heads, heads, attn_ratio=2, resolution=7, window_resolution=4)).eval()
    for parameter in model.parameters():  # far from uniform maps, so that a padding row counted would show
        nn.init.normal_(parameter, std=0.4)
    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    values, details, said = measure_once(model, x)
    if heads > 1:
        assert len(said) == 1 and "CascadedGroupAttention" in said[0] and key(ENTROPY, "attn.attn") not in values
        return
    assert not said, said
    (scores,) = softmax_inputs(model, x)["attn.attn"]
    rows = _real_windows(2, 6, 10, 4)
    assert scores.shape == (2 * 2 * 3, 16, 16) and not rows.all()
    entropy = entropy_of(torch.softmax(scores, dim=-1))
    assert details[key(ENTROPY, "attn.attn")].shape == (1,)
    assert values[key(ENTROPY, "attn.attn")] == pytest.approx(float(entropy[rows].mean()), rel=1e-5)
    assert values[key(MAX_LOGIT, "attn.attn")] == pytest.approx(float(scores.amax(-1)[rows].max()), rel=1e-5)
