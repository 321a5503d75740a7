"""capture_attention on timm attention layers: a ViT with fused attention (seen at SDPA) and without (Q/K recomputed
from qkv), QK-norm, and AttentionRope with rotary embeddings and grouped-query heads. References: float64 softmax
rows written here from the weights, and the same layer's fused path (what SDPA received)."""

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from timm.layers import Attention, AttentionRope  # noqa: E402

from geomon.capture import capture_attention, find_attention_modules  # noqa: E402
from tests.capture._reference import assert_clean, assert_rows_close, collect, rows_of, softmax_rows  # noqa: E402


def _vit(fused):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def _inputs_of(model, names):
    """Each attention layer's input, from a separate run with ordinary hooks (the reference's own capture)."""
    inputs = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.update({n: a[0].detach()})) for n in names]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    for handle in handles:
        handle.remove()
    return inputs


def _by_hand(attention, x, allowed=None):
    heads, dim = attention.num_heads, attention.head_dim
    qkv = x.double() @ attention.qkv.weight.double().T + attention.qkv.bias.double()
    q, k, _ = qkv.unflatten(-1, (3, heads, dim)).permute(2, 0, 3, 1, 4)
    if not isinstance(attention.q_norm, torch.nn.Identity):
        norm = attention.q_norm
        q = F.layer_norm(q, (dim,), norm.weight.double(), norm.bias.double(), norm.eps)
        norm = attention.k_norm
        k = F.layer_norm(k, (dim,), norm.weight.double(), norm.bias.double(), norm.eps)
    return softmax_rows(q, k, scale=attention.scale, allowed=allowed)


@pytest.mark.parametrize("fused", [True, False])
def test_vit_layers_reported_once_and_equal_a_float64_reference(fused):
    model = _vit(fused).eval()
    names = [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    assert find_attention_modules(model) == dict.fromkeys(names, "timm")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(images))
    assert [c.module for c in calls] == names
    inputs = _inputs_of(model, names)
    for call in calls:
        entropy, max_logit, n_keys = rows_of(call)
        expected_entropy, expected_max = _by_hand(model.get_submodule(call.module), inputs[call.module])
        assert_rows_close(entropy, expected_entropy)
        assert_rows_close(max_logit, expected_max)
        assert (n_keys == 17).all()  # 16 patches + class token, no mask
    assert_clean(model)


def test_qk_norm_mask_and_causal_flag_on_the_eager_path():
    torch.manual_seed(0)
    layer = Attention(32, num_heads=4, qk_norm=True, norm_layer=torch.nn.LayerNorm, qkv_bias=True)
    torch.nn.init.normal_(layer.q_norm.weight)
    torch.nn.init.normal_(layer.k_norm.bias)
    x = torch.randn(2, 6, 32)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(2)) < 0.7
    mask[..., 0] = True
    seen = {}
    for fused in (True, False):  # fused: what SDPA received; eager: recomputed by geomon
        layer.fused_attn = fused
        for kwargs in ({"attn_mask": mask}, {"is_causal": True}):
            calls, _ = collect(layer, lambda kw=kwargs: layer(x, **kw))
            assert len(calls) == 1
            seen[fused, "is_causal" in kwargs] = rows_of(calls[0])
    for causal in (False, True):
        for a, b in zip(seen[True, causal], seen[False, causal], strict=True):
            assert_rows_close(a, b)
    for causal, allowed in ((False, mask), (True, torch.ones(6, 6, dtype=torch.bool).tril())):
        expected_entropy, expected_max = _by_hand(layer, x, allowed)
        assert_rows_close(seen[False, causal][0], expected_entropy)
        assert_rows_close(seen[False, causal][1], expected_max)


@pytest.mark.parametrize("separate_projections", [False, True])
def test_attention_rope_eager_equals_what_the_fused_path_passes_to_sdpa(separate_projections):
    torch.manual_seed(0)
    kwargs = {"num_kv_heads": 2, "qkv_fused": False} if separate_projections else {}
    layer = AttentionRope(32, num_heads=4, num_prefix_tokens=1, qk_norm=True, norm_layer=torch.nn.LayerNorm, **kwargs)
    x = torch.randn(2, 7, 32)
    rope = torch.randn(6, 16)  # sin | cos for the 6 non-prefix tokens, head_dim 8
    calls = {}
    for fused in (True, False):
        layer.fused_attn = fused
        calls[fused], _ = collect(layer, lambda: layer(x, rope=rope))
    sdpa, eager = calls[True][0], calls[False][0]
    for a, b in zip(rows_of(sdpa), rows_of(eager), strict=True):
        assert_rows_close(a, b)
    if separate_projections:
        assert eager.k.shape[1] == 2 and sdpa.k.shape[1] == 4  # geomon keeps the grouped layout


def test_outputs_and_gradients_are_bit_identical():
    def run(capture):
        model = _vit(False).train()
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        if capture:
            with capture_attention(model, lambda call: rows_of(call)):
                out = model(images)
        else:
            out = model(images)
        out.sum().backward()
        return out.detach(), [p.grad for p in model.parameters()]

    (a, grads_a), (b, grads_b) = run(False), run(True)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))


def test_convit_mhsa_is_measured_and_gpsa_is_named_once_not_measured():
    """ConViT's first blocks use GPSA: a sigmoid-gated mix of a content softmax and a positional softmax, not the
    softmax of one set of logits, so it has no exact entropy here: it must be named in a warning, once, not dropped
    silently. Its last blocks use MHSA, plain softmax attention written by hand: recomputed exactly."""
    from timm.models.convit import GPSA, MHSA

    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, img_size=32, depth=3, local_up_to_layer=2).eval()
    kinds = find_attention_modules(model)
    gpsa = [n for n, m in model.named_modules() if isinstance(m, GPSA)]
    mhsa = [n for n, m in model.named_modules() if isinstance(m, MHSA)]
    assert len(gpsa) == 2 and len(mhsa) == 1
    assert all("GPSA" in kinds[n] and "not modelled" in kinds[n] for n in gpsa) and kinds[mhsa[0]] == "timm"
    inputs = _inputs_of(model, mhsa)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.warns(UserWarning) as caught:
        calls, _ = collect(model, lambda: (model(images), model(images)))
    assert [c.module for c in calls] == mhsa * 2
    for name in gpsa:  # once per block, naming the module and why
        said = [str(w.message) for w in caught if repr(name) in str(w.message)]
        assert len(said) == 1 and "GPSA" in said[0], said
    attention = dict(model.named_modules())[mhsa[0]]
    heads = attention.num_heads
    x = inputs[mhsa[0]].double()
    q, k = (x @ attention.qkv.weight.double().T).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)[:2]
    entropy, max_logit = softmax_rows(q, k, scale=attention.scale)
    captured, captured_max, _ = rows_of(calls[0])
    assert_rows_close(captured, entropy)
    assert_rows_close(captured_max, max_logit)


def test_xcit_channel_attention_is_measured_and_said_to_be_over_channels():
    """XCiT's cross-covariance attention is a softmax over each head's channels (Dh x Dh), fused through SDPA: its
    values equal a float64 recomputation of that channel softmax, and one warning per layer says what they are."""
    import warnings

    from geomon import Monitor

    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=64, depth=2).eval()
    layer = model.blocks[0].attn
    for module in model.modules():
        if type(module).__name__ == "XCA":
            module.fused_attn = True
            module.temperature.data.uniform_(0.5, 3.0)  # not all ones: a per-head scale the reference must apply
    inputs = {}
    layer.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0].detach()))
    monitor = Monitor(every_n_steps=1, head=None, query_rows=None, strict=True).attach(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with monitor.step(0):
            model(torch.randn(2, 3, 64, 64))
        monitor.compute()
    said = [str(w.message) for w in caught if "cross-covariance attention" in str(w.message)]
    assert len(said) == 2 and "'blocks.0.attn'" in said[0] + said[1], said  # once per layer
    x = inputs["x"].double()
    b, n, c = x.shape
    h = layer.num_heads
    qkv = (x @ layer.qkv.weight.double().T + layer.qkv.bias.double()).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 4, 1)
    q = F.normalize(qkv[0], dim=-1) * layer.temperature.double()
    k = F.normalize(qkv[1], dim=-1)
    p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # [B, H, Dh, Dh]
    want = -(p * p.log()).sum(-1).mean((0, 2))
    got = monitor.details["geomon/attention/entropy/blocks.0.attn"].double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
