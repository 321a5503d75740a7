"""capture_attention on timm Swin (``WindowAttention``: relative position bias, shifted-window mask, non-fused by
default) and EVA (``EvaAttention``: q/k biases, rotary with a class token, fused and not). References: the Swin
layer's own softmax (its ``softmax`` child: the logits it receives and the probabilities it returns), and for EVA
what SDPA receives on the fused path of the same weights."""

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm.models.eva import EvaAttention  # noqa: E402
from timm.models.swin_transformer import WindowAttention  # noqa: E402

from geomon.capture import capture_attention, find_attention_modules  # noqa: E402
from tests.capture._reference import assert_clean, assert_rows_close, collect, entropy_of, rows_of  # noqa: E402


def _swin():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        num_classes=5,
    ).eval()
    for module in model.modules():  # a trained-size bias, so that a dropped bias would show
        if isinstance(module, WindowAttention):
            torch.nn.init.normal_(module.relative_position_bias_table, std=2.0)
    return model


def _images(batch=2, size=56):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _own_softmax(model):
    """Each WindowAttention's softmax input (logits with bias and mask) and output, by ordinary hooks."""
    seen = {}
    handles = [
        m.softmax.register_forward_hook(lambda mod, a, out, n=n: seen.update({n: (a[0], out)}))
        for n, m in model.named_modules()
        if isinstance(m, WindowAttention)
    ]
    with torch.no_grad():
        model(_images())
    for handle in handles:
        handle.remove()
    return seen


def test_swin_window_attention_equals_its_own_softmax():
    model = _swin()
    names = [f"layers.{i}.blocks.{j}.attn" for i in range(2) for j in range(2)]
    assert find_attention_modules(model) == dict.fromkeys(names, "timm")
    assert model.layers[0].blocks[1].attn_mask is not None  # the shifted block's mask is exercised
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(_images()))
    assert [c.module for c in calls] == names
    own = _own_softmax(model)
    for call in calls:
        logits, probabilities = own[call.module]
        entropy, max_logit, _ = rows_of(call)
        assert_rows_close(entropy, entropy_of(probabilities))
        assert_rows_close(max_logit, logits.amax(-1))
    assert_clean(model)


def test_swin_fused_path_reports_what_sdpa_receives_equal_to_the_eager_path():
    model = _swin()
    with torch.no_grad():
        eager, _ = collect(model, lambda: model(_images()))
        for module in model.modules():
            if isinstance(module, WindowAttention):
                module.fused_attn = True
        fused, _ = collect(model, lambda: model(_images()))
    assert [c.module for c in fused] == [c.module for c in eager]
    for a, b in zip(fused, eager, strict=True):
        for x, y in zip(rows_of(a), rows_of(b), strict=True):
            assert_rows_close(x, y)


def test_swin_training_is_bit_identical_with_capture_on():
    def run(capture):
        model = _swin().train()
        images = _images()
        torch.manual_seed(3)
        if capture:
            with capture_attention(model, lambda call: rows_of(call), strict=True):
                out = model(images)
        else:
            out = model(images)
        out.sum().backward()
        return out.detach(), [p.grad for p in model.parameters()], torch.rand(2)

    (a, grads_a, rng_a), (b, grads_b, rng_b) = run(False), run(True)
    assert torch.equal(a, b) and torch.equal(rng_a, rng_b)
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))


def test_swin_padded_windows_leave_out_the_padding_tokens_query_rows():
    """At a size that is not a whole number of windows (60 x 76 images: 15 x 19 patches in 7 x 7 windows), each
    block pads its map with zero tokens on the bottom and right, after its shift, and crops their outputs away:
    their query rows are padding, left out as torchvision Swin's are, and the real rows equal the layer's own
    softmax, per head. Reference: each layer's softmax input, and the real rows placed from the block's input size."""
    from timm.models.swin_transformer import SwinTransformerBlock

    from geomon.keys import ENTROPY, MAX_LOGIT, key
    from tests.capture._reference import measure_once

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, embed_dim=32,
                              depths=(2, 2), num_heads=(2, 4), strict_img_size=False, num_classes=5).eval()  # fmt: skip
    for module in model.modules():
        if isinstance(module, nn.Linear):  # maps far from uniform, so that a padding row counted would show
            nn.init.normal_(module.weight, std=0.3)
    images = torch.randn(2, 3, 60, 76, generator=torch.Generator().manual_seed(1))
    logits, real = {}, {}

    def place(block, name):
        def hook(module, args):
            batch, height, width, _ = args[0].shape
            wh, ww = block.window_size
            grid = torch.zeros(-(-height // wh) * wh, -(-width // ww) * ww, dtype=torch.bool)
            grid[:height, :width] = True  # the zero padding comes after the shift: at the bottom and right
            windows = grid.reshape(grid.shape[0] // wh, wh, grid.shape[1] // ww, ww).permute(0, 2, 1, 3)
            real[name] = windows.reshape(-1, wh * ww).repeat(batch, 1)  # [B·nW, N], windows row-major

        return hook

    handles = []
    for name, block in model.named_modules():
        if isinstance(block, SwinTransformerBlock):
            handles.append(block.register_forward_pre_hook(place(block, f"{name}.attn")))
            handles.append(block.attn.softmax.register_forward_hook(
                lambda m, a, out, n=f"{name}.attn": logits.update({n: a[0].double()})))  # fmt: skip
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    assert len(real) == 4 and not any(rows.all() for rows in real.values())  # padding in every block here
    values, details, said = measure_once(model, images)
    assert not [w for w in said if "pad" in w], said
    for layer, scores in logits.items():
        rows = real[layer][:, None, :].expand(scores.shape[:-1])
        entropy = entropy_of(torch.softmax(scores, dim=-1))
        per_head = torch.stack([entropy[:, h][rows[:, h]].mean() for h in range(scores.shape[1])])
        torch.testing.assert_close(details[key(ENTROPY, layer)].double(), per_head, rtol=1e-5, atol=1e-6)
        assert values[key(ENTROPY, layer)] == pytest.approx(float(entropy[rows].mean()), rel=1e-5)
        assert values[key(MAX_LOGIT, layer)] == pytest.approx(float(scores.amax(-1)[rows].max()), rel=1e-5)


def _eva():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=2, num_classes=5)
    return model.eval()


def test_eva_eager_equals_what_its_fused_path_passes_to_sdpa():
    model = _eva()
    names = ["blocks.0.attn", "blocks.1.attn"]
    assert find_attention_modules(model) == dict.fromkeys(names, "timm")
    calls = {}
    for fused in (True, False):
        for block in model.blocks:
            block.attn.fused_attn = fused
        with torch.no_grad():
            calls[fused], _ = collect(model, lambda: model(_images(size=28)))
    assert [c.module for c in calls[False]] == names == [c.module for c in calls[True]]
    for sdpa, eager in zip(calls[True], calls[False], strict=True):
        for a, b in zip(rows_of(sdpa), rows_of(eager), strict=True):
            assert_rows_close(a, b)


@pytest.mark.parametrize("qkv_fused", [True, False])
def test_eva_attention_layer_with_rope_mask_and_causal_flag(qkv_fused):
    torch.manual_seed(0)
    layer = EvaAttention(
        32, num_heads=4, qkv_bias=True, qkv_fused=qkv_fused, num_prefix_tokens=1, qk_norm=True, norm_layer=nn.LayerNorm
    )
    if qkv_fused:
        torch.nn.init.normal_(layer.q_bias)
        torch.nn.init.normal_(layer.k_bias)
    x = torch.randn(2, 7, 32)
    rope = torch.randn(6, 16)  # sin | cos for the 6 non-prefix tokens, head_dim 8
    mask = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(2)) < 0.7
    mask[..., 0] = True
    for kwargs in ({"rope": rope}, {"rope": rope, "attn_mask": mask}, {"is_causal": True}):
        seen = {}
        for fused in (True, False):
            layer.fused_attn = fused
            with torch.no_grad():
                calls, _ = collect(layer, lambda kw=kwargs: layer(x, **kw))
            assert len(calls) == 1
            seen[fused] = rows_of(calls[0])
        for a, b in zip(seen[True], seen[False], strict=True):
            assert_rows_close(a, b)
