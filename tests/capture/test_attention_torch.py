"""capture_attention on torch.nn attention: nn.MultiheadAttention on all its paths, nn.Transformer* layers, the
fused encoder-layer inference path and nested-tensor inputs. References: the module's own attention weights
(``need_weights=True, average_attn_weights=False``) and a float64 softmax written here from the module's weights."""

import math

import pytest
import torch
from torch import nn

from geomon.capture import capture_attention, find_attention_modules
from tests.capture._reference import (
    assert_clean,
    assert_rows_close,
    collect,
    entropy_of,
    rows_of,
    softmax_rows,
)

B, L, S, E, H = 3, 6, 7, 16, 4


def _by_hand(mha, query, key, attn_mask=None, key_padding_mask=None):
    """float64 entropy / max logit from in_proj (or q/k_proj) weights; inputs batch-first [B, L, E]."""
    w = mha.in_proj_weight if mha._qkv_same_embed_dim else None
    w_q = (w[:E] if w is not None else mha.q_proj_weight).double()
    w_k = (w[E : 2 * E] if w is not None else mha.k_proj_weight).double()
    b_q, b_k = mha.in_proj_bias[:E].double(), mha.in_proj_bias[E : 2 * E].double()
    q = (query.double() @ w_q.T + b_q).unflatten(-1, (H, E // H)).transpose(1, 2)
    k = (key.double() @ w_k.T + b_k).unflatten(-1, (H, E // H)).transpose(1, 2)
    n_q, n_k = q.shape[2], k.shape[2]
    additive = torch.zeros(q.shape[0], H, n_q, n_k, dtype=torch.float64)
    for mask in (attn_mask, key_padding_mask):
        if mask is None:
            continue
        if mask is key_padding_mask:
            mask = mask[:, None, None, :]
        elif mask.dim() == 3:
            mask = mask.view(-1, H, n_q, n_k)
        additive = additive + (torch.where(mask, -math.inf, 0.0) if mask.dtype == torch.bool else mask.double())
    entropy, max_logit = softmax_rows(q, k, additive=additive)
    if key_padding_mask is not None and query is key:  # self-attention: padded tokens' query rows are excluded
        padded = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask <= -1e4
        padded = padded[:, None, :, None].expand(-1, H, -1, 1)[..., 0]
        entropy, max_logit = entropy.masked_fill(padded, math.nan), max_logit.masked_fill(padded, math.nan)
    return entropy, max_logit


def _masks(kind, gen):
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = NOT allowed (nn.MultiheadAttention)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 4:] = True
    padding[2, 2:] = True
    return {
        "none": {},
        "bool_2d": {"attn_mask": causal},
        "float_2d": {"attn_mask": torch.randn(L, L, generator=gen)},
        "bool_3d": {"attn_mask": torch.rand(B * H, L, L, generator=gen) < 0.3},
        "float_3d": {"attn_mask": torch.randn(B * H, L, L, generator=gen)},
        "padding": {"key_padding_mask": padding},
        "padding_and_causal": {"key_padding_mask": padding, "attn_mask": causal},
        "float_padding": {"key_padding_mask": torch.where(padding, -1e4, 0.0), "attn_mask": causal.float() * -1e4},
        "causal_hint": {"attn_mask": causal, "is_causal": True},
    }[kind]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "masks",
    ["none", "bool_2d", "float_2d", "bool_3d", "float_3d", "padding", "padding_and_causal", "float_padding",
     "causal_hint"],
)  # fmt: skip
def test_multihead_attention_matches_its_own_weights_and_a_float64_reference(need_weights, batch_first, masks, gen):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    model = nn.ModuleDict({"attn": mha}).train()
    x = torch.randn(B, L, E, generator=gen, requires_grad=True)
    kwargs = _masks(masks, gen)
    inputs = x if batch_first else x.transpose(0, 1)
    calls, _ = collect(model, lambda: mha(inputs, inputs, inputs, need_weights=need_weights, **kwargs))
    assert [c.module for c in calls] == ["attn"]  # once: by SDPA (need_weights=False) or recomputed (True)
    entropy, max_logit, _ = rows_of(calls[0])
    with torch.no_grad():
        plain = {k: v for k, v in kwargs.items() if k != "is_causal"}
        _, weights = mha(inputs, inputs, inputs, need_weights=True, average_attn_weights=False, **plain)
    expected_entropy, expected_max = _by_hand(mha, x, x, kwargs.get("attn_mask"), kwargs.get("key_padding_mask"))
    valid = ~expected_entropy.isnan()
    assert_rows_close(entropy, entropy_of(weights), valid)
    assert_rows_close(entropy, expected_entropy)
    assert_rows_close(max_logit, expected_max)
    # the kernel (interpreted here) reads the module's masks in place: one per-score mask plus per-key terms; a float
    # attn_mask beside a float key-padding mask is left to the torch path (the module compares their sum)
    if masks == "float_padding" and need_weights:
        with pytest.raises(RuntimeError, match="torch path"):
            rows_of(calls[0], "triton")
    else:
        kernel_entropy, kernel_max, _ = rows_of(calls[0], "triton")
        assert_rows_close(kernel_entropy, expected_entropy)
        assert_rows_close(kernel_max, expected_max)
    assert_clean(model)


def test_cross_attention_with_kdim_vdim_and_extra_keys(gen):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=10, vdim=12, batch_first=True)
    assert not mha._qkv_same_embed_dim
    query, key, value = torch.randn(B, L, E, generator=gen), torch.randn(B, S, 10), torch.randn(B, S, 12)
    for need_weights in (True, False):
        calls, _ = collect(mha, lambda nw=need_weights: mha(query, key, value, need_weights=nw))
        assert [c.module for c in calls] == [""] and calls[0].k.shape == (B, H, S, E // H)
        with torch.no_grad():
            _, weights = mha(query, key, value, average_attn_weights=False)
        assert_rows_close(rows_of(calls[0])[0], entropy_of(weights))
        assert_rows_close(rows_of(calls[0])[1], _by_hand(mha, query, key)[1])

    extra = nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True)  # two keys appended to every row
    x = torch.randn(L, B, E, generator=gen)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, 3:] = True
    seen = {}
    for need_weights in (True, False):  # recomputed vs what SDPA received
        calls, _ = collect(extra, lambda nw=need_weights: extra(x, x, x, key_padding_mask=padding, need_weights=nw))
        seen[need_weights] = calls
        assert len(calls) == 1 and calls[0].k.shape[2] == L + 2
    with torch.no_grad():
        _, weights = extra(x, x, x, key_padding_mask=padding, average_attn_weights=False)
    real = ~padding[:, None, :]  # self-attention: the padded tokens' query rows are excluded
    for calls in seen.values():
        entropy, _, n_keys = rows_of(calls[0])
        assert_rows_close(entropy, entropy_of(weights), real)
        assert entropy[~real.expand_as(entropy)].isnan().all()
        assert int(n_keys[0, 0, 0]) == 3 + 2 and int(n_keys[1, 0, 0]) == L + 2


def test_unbatched_input(gen):
    mha = nn.MultiheadAttention(E, H)
    x = torch.randn(L, E, generator=gen)
    calls, _ = collect(mha, lambda: mha(x, x, x))
    assert len(calls) == 1 and calls[0].q.shape == (1, H, L, E // H)
    with torch.no_grad():
        _, weights = mha(x, x, x, average_attn_weights=False)
    assert_rows_close(rows_of(calls[0])[0][0], entropy_of(weights))


def test_the_multihead_attention_inference_fast_path_is_recomputed(monkeypatch, gen):
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    native = torch._native_multi_head_attention
    used = []
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a: used.append(1) or native(*a))
    x = torch.randn(B, L, E, generator=gen)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 2:] = True
    with torch.no_grad():
        expected, _ = mha(x, x, x, key_padding_mask=padding, need_weights=False)
        calls, (out, _) = collect(mha, lambda: mha(x, x, x, key_padding_mask=padding, need_weights=False))
        assert used == [1, 1]  # the fused native path ran, with and without geomon
        _, weights = mha.train()(x, x, x, key_padding_mask=padding, average_attn_weights=False)  # not fused
    assert torch.equal(out, expected)
    assert len(calls) == 1
    assert_rows_close(rows_of(calls[0])[0], entropy_of(weights), ~padding[:, None, :])
    assert rows_of(calls[0])[0][1, :, 2:].isnan().all()  # padded queries excluded, as on every path
    assert rows_of(calls[0])[2][1, 0, 0] == 2


def _encoder(norm_first=False, nested=False, layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, batch_first=True, dropout=0.0, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize(  # nn.TransformerEncoder builds nested tensors for post-norm layers only
    ("mode", "norm_first"),
    [("train", False), ("train", True), ("eval_fused", False), ("eval_fused", True), ("eval_nested", False)],
)
def test_transformer_encoder_every_path_reports_each_layer_once(mode, norm_first, monkeypatch, gen):
    encoder = _encoder(norm_first, nested=mode == "eval_nested").train(mode == "train")
    fused = torch._transformer_encoder_layer_fwd
    nested_inputs = []
    monkeypatch.setattr(
        torch, "_transformer_encoder_layer_fwd", lambda src, *a: nested_inputs.append(src.is_nested) or fused(src, *a)
    )
    x = torch.randn(B, L, E, generator=gen)
    padding = torch.zeros(B, L, dtype=torch.bool)  # right padding: left-aligned, as the nested path requires
    padding[1, 4:] = True
    padding[2, 2:] = True
    with torch.set_grad_enabled(mode == "train"):
        expected = encoder(x, src_key_padding_mask=padding)
        calls, out = collect(encoder, lambda: encoder(x, src_key_padding_mask=padding))
    assert torch.equal(out, expected)
    if mode == "train":
        assert nested_inputs == []
    else:  # the fused native layer ran with geomon as without (no hook on any module disables it)
        assert nested_inputs == [mode == "eval_nested"] * 4
    assert [c.module for c in calls] == ["layers.0.self_attn", "layers.1.self_attn"]
    with torch.no_grad():  # the reference: layer 0's own weights on its own input
        layer = encoder.layers[0]
        h = layer.norm1(x) if norm_first else x
        _, weights = layer.self_attn(h, h, h, key_padding_mask=padding, average_attn_weights=False)
    entropy, _, n_keys = rows_of(calls[0])
    valid = ~padding[:, None, :]
    assert_rows_close(entropy, entropy_of(weights), valid)
    # padded queries are excluded on every path (in the nested computation they do not even exist)
    assert entropy[padding[:, None, :].expand_as(entropy)].isnan().all()
    assert n_keys[2, 0, 0] == 2 and n_keys[1, 0, 0] == 4 and n_keys[0, 0, 0] == L
    assert_clean(encoder)


def test_transformer_decoder_layer_reports_self_and_cross_attention(gen):
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 32, dropout=0.0, batch_first=True), 2)
    tgt, memory = torch.randn(B, L, E, generator=gen), torch.randn(B, S, E, generator=gen)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    for mode in (True, False):
        decoder.train(mode)
        calls, _ = collect(decoder, lambda: decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True))
        names = [c.module for c in calls]
        assert names == [f"layers.{i}.{a}" for i in range(2) for a in ("self_attn", "multihead_attn")]
        assert calls[1].k.shape[2] == S
        _, _, n_keys = rows_of(calls[0])
        assert n_keys[0, 0].tolist() == list(range(1, L + 1))
    assert find_attention_modules(decoder) == {n: "torch_mha" for n in names}


def test_outputs_and_gradients_are_bit_identical_with_and_without_capture(gen):
    def run(capture, need_weights):
        torch.manual_seed(3)
        mha = nn.MultiheadAttention(E, H, dropout=0.2, batch_first=True)
        x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(4), requires_grad=True)
        torch.manual_seed(5)
        if capture:
            with capture_attention(mha, lambda call: rows_of(call)):
                out, _ = mha(x, x, x, need_weights=need_weights)
        else:
            out, _ = mha(x, x, x, need_weights=need_weights)
        out.square().sum().backward()
        return out.detach(), x.grad, [p.grad for p in mha.parameters()], torch.rand(3)

    for need_weights in (True, False):
        a, b = run(False, need_weights), run(True, need_weights)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
        assert all(torch.equal(p, q) for p, q in zip(a[2], b[2], strict=True))


def test_everything_is_removed_after_an_exception(gen):
    encoder = _encoder()
    x = torch.randn(B, L, E, generator=gen)
    with pytest.raises(RuntimeError, match="boom"), capture_attention(encoder, lambda call: None):
        encoder(x)
        raise RuntimeError("boom")
    assert_clean(encoder)

    def explode(*args, **kwargs):
        raise ValueError("inside")

    encoder.layers[1].linear1.forward = explode
    with pytest.raises(ValueError, match="inside"), capture_attention(encoder, lambda call: None):
        encoder(x)
    assert_clean(encoder)


@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_called_with_equal_but_separate_tensors_excludes_padded_queries(need_weights, gen):
    """``attn(ln(x), ln(x), ln(x))`` is self-attention: the three inputs are equal tensors, not one object."""
    torch.manual_seed(0)
    ln, mha = nn.LayerNorm(E), nn.MultiheadAttention(E, H, batch_first=True)
    model = nn.ModuleDict({"ln": ln, "attn": mha}).eval()
    x = torch.randn(B, L, E, generator=gen)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 4:] = True
    padding[2, 2:] = True
    with torch.no_grad():
        calls, _ = collect(model, lambda: mha(ln(x), ln(x), ln(x), key_padding_mask=padding, need_weights=need_weights))
        _, weights = mha(ln(x), ln(x), ln(x), key_padding_mask=padding, average_attn_weights=False)
    assert [c.module for c in calls] == ["attn"]
    entropy = rows_of(calls[0])[0]
    real = ~padding[:, None, :]
    assert_rows_close(entropy, entropy_of(weights), real)  # the module's own probabilities, real rows
    assert entropy[~real.expand_as(entropy)].isnan().all()  # padded tokens' rows are excluded


def test_telling_equal_inputs_apart_never_waits_for_the_device(gen):
    """Query and key are compared on the device: the capture runs under ``FakeTensorMode``, where any read of a
    tensor's data on the host (``bool``, ``item``, ``torch.equal``: a sync on CUDA) raises. Then, on real tensors,
    both answers: equal separate inputs are self-attention (their padded rows left out), different ones of the same
    shape are cross-attention (the rows of the self-attention before them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    ln, mha = nn.LayerNorm(E), nn.MultiheadAttention(E, H, batch_first=True)
    model = nn.ModuleDict({"ln": ln, "attn": mha}).eval()

    def run(x, memory, padding):
        mha(ln(x), ln(x), ln(x), key_padding_mask=padding, need_weights=False)
        mha(ln(x), memory, memory, need_weights=False)

    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 4:] = True
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.no_grad(), fake:
        inputs = torch.randn(B, L, E), torch.randn(B, L, E), fake.from_tensor(padding)
        calls, _ = collect(model, lambda: run(*inputs))  # strict: a host read would raise here
    assert len(calls) == 2
    with torch.no_grad():
        calls, _ = collect(model, lambda: run(torch.randn(B, L, E, generator=gen), torch.randn(B, L, E, generator=gen),
                                              padding))  # fmt: skip
    for call in calls:  # padded token 1's rows out in both: its own (self), the decoder's (cross)
        rows = call.query_padding
        assert rows is not None and rows[1, 4:].all() and not rows[0].any() and not rows[1, :4].any()
