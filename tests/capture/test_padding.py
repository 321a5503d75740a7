"""The padding rule (geomon/capture/_padding.py): padded tokens' query rows are excluded, nothing else is.

Masks are built here the ways implementations build them (boolean "may attend", additive with the dtype's minimum,
additive with -10000, key-padding only or full 4-D), from a token mask drawn by hypothesis; the rule must recover
exactly the padded tokens, and the rows it keeps must equal an explicit float64 softmax."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.capture import AttentionCall
from geomon.capture._padding import MASKED_AT, PaddingRule, is_cross_name, padded_keys
from tests.capture._reference import rows_of, softmax_rows

H, DH = 2, 4


def _tokens(lengths, n, left):
    position = torch.arange(n)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return position >= n - lengths if left else position < lengths


def _allowed(tokens, structure, window):
    """[B, 1, N, N] boolean: the structure's rule over real keys (as HF masks do: padding masks keys only)."""
    n = tokens.shape[1]
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    rule = torch.ones(n, n, dtype=torch.bool)
    if structure in ("causal", "window"):
        rule &= cols <= rows
    if structure == "window":
        rule &= rows - cols < window
    return rule[None, None] & tokens[:, None, None, :]


def _encode(allowed, style):
    if style == "bool":
        return allowed
    fill = torch.finfo(torch.float32).min if style == "finfo" else -10000.0
    return torch.zeros(allowed.shape).masked_fill(~allowed, fill)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 9),
    data=st.data(),
    left=st.booleans(),
    structure=st.sampled_from(["bidirectional", "causal", "window"]),
    style=st.sampled_from(["bool", "finfo", "minus_1e4"]),
    window=st.integers(1, 4),
)
def test_exactly_the_padded_tokens_are_excluded_and_real_rows_are_exact(n, data, left, structure, style, window):
    lengths = data.draw(st.lists(st.integers(1, n), min_size=1, max_size=3))
    tokens = _tokens(lengths, n, left)
    allowed = _allowed(tokens, structure, window)
    mask = _encode(allowed, style)
    batch = tokens.shape[0]
    expected_padding = ~tokens
    assert torch.equal(padded_keys(mask, batch, n), expected_padding)

    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(batch, H, n, DH, generator=gen), torch.randn(batch, H, n, DH, generator=gen)
    rows = PaddingRule().apply(q, k, mask, None, "layers.0.attn")
    entropy, max_logit, n_keys = rows_of(AttentionCall("x", q, k, mask, False, None, rows, MASKED_AT))
    real = tokens[:, None, :].expand(batch, H, n)
    # a real row sees the real keys its structure allows (at least itself); a padded row is NaN
    expected_entropy, expected_max = softmax_rows(q, k, allowed=allowed)
    assert entropy[~real].isnan().all() and max_logit[~real].isnan().all()
    torch.testing.assert_close(entropy[real].double(), expected_entropy[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(max_logit[real].double(), expected_max[real], rtol=1e-5, atol=1e-6)
    assert torch.equal(n_keys[real], allowed.expand(batch, H, n, n).sum(-1)[real])


def test_masks_without_padding_exclude_nothing():
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    packed = torch.block_diag(torch.ones(2, 2), torch.ones(4, 4)).bool()
    for mask in (None, causal, packed[None, None], torch.zeros(1, 1, n, n), torch.randn(2, H, n, n)):
        found = padded_keys(mask, 2, n)
        assert found is None or not found.any()


def test_cross_attention_takes_the_query_padding_of_the_last_self_attention():
    rule, gen = PaddingRule(), torch.Generator().manual_seed(0)
    decoder_tokens = _tokens([4, 2], 5, left=False)
    encoder_tokens = _tokens([5, 3], 5, left=False)  # the same length as the decoder: cross is told by its name
    q, k = torch.randn(2, H, 5, DH, generator=gen), torch.randn(2, H, 5, DH, generator=gen)
    self_mask = _allowed(decoder_tokens, "causal", 0)
    rule.apply(q, k, self_mask, None, "decoder.block.0.layer.0.SelfAttention")
    cross_mask = encoder_tokens[:, None, None, :].expand(2, 1, 5, 5)
    rows = rule.apply(q, k, cross_mask, None, "decoder.block.0.layer.1.EncDecAttention")
    _, _, n_keys = rows_of(AttentionCall("x", q, k, cross_mask, False, None, rows, MASKED_AT))
    no_key = n_keys[:, 0] == 0  # [B, Nq]
    assert torch.equal(no_key, ~decoder_tokens)  # the decoder's padded rows, not the encoder's
    assert torch.equal(n_keys[:, 0][decoder_tokens], encoder_tokens.sum(-1)[:, None].expand(2, 5)[decoder_tokens])


def test_masked_at_blocks_keys_and_cross_names():
    mask = torch.tensor([0.0, -3.0, MASKED_AT, -math.inf, torch.finfo(torch.float32).min])
    q, k = torch.randn(1, 1, 1, DH), torch.randn(1, 1, 5, DH)
    entropy, max_logit, n_keys = rows_of(AttentionCall("x", q, k, mask, False, None, None, MASKED_AT))
    allowed = torch.tensor([True, True, False, False, False])
    expected_entropy, expected_max = softmax_rows(q, k, allowed=allowed, additive=mask.masked_fill(~allowed, 0.0))
    assert n_keys.item() == 2  # -1e4, -inf and the dtype's minimum all block their key
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(max_logit.double(), expected_max, rtol=1e-6, atol=1e-6)
    assert padded_keys(torch.tensor([True, False]), 1, 2).tolist() == [[False, True]]
    cross = ["decoder.block.1.layer.1.EncDecAttention", "model.decoder.layers.0.encoder_attn"]
    cross += ["layers.0.multihead_attn", "blocks.2.cross_attn", "bert.encoder.layer.0.crossattention.self"]
    for name in cross:
        assert is_cross_name(name), name
    for name in ("transformer.h.0.attn", "model.layers.0.self_attn", "decoder.block.0.layer.0.SelfAttention"):
        assert not is_cross_name(name), name


@pytest.mark.parametrize("left", [False, True])
def test_an_explicit_cross_flag_wins_over_shapes(left):
    rule, gen = PaddingRule(), torch.Generator().manual_seed(1)
    tokens = _tokens([3], 4, left)
    q, k = torch.randn(1, H, 4, DH, generator=gen), torch.randn(1, H, 4, DH, generator=gen)
    key_padding = tokens[:, None, None, :]
    as_self = rule.apply(q, k, key_padding, False, "attn")
    assert torch.equal(as_self[0], ~tokens[0])
    as_cross = PaddingRule().apply(q, k, key_padding, True, "attn")  # no self-attention seen: nothing to exclude
    assert as_cross is None
