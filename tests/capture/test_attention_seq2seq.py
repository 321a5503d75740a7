"""Encoder-decoder models: T5 (a relative position bias added to the scores) and BART, eager and SDPA, with left and
right padding on both sides. Reference: an eager copy with the same weights returning its own probabilities
(``output_attentions=True``): encoder self-attention, decoder self-attention and cross-attention, rows of real
query tokens only (padded tokens' query rows must be excluded, NaN)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.capture._reference import assert_rows_close, collect, entropy_of, rows_of  # noqa: E402

VOCAB, N_ENC, N_DEC = 64, 7, 7  # equal lengths: cross-attention is told from its module, not from its shape


def _models(family, implementation):
    if family == "t5":
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        cls = transformers.T5ForConditionalGeneration
    else:
        config = transformers.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0, pad_token_id=1, decoder_start_token_id=2,
        )  # fmt: skip
        cls = transformers.BartForConditionalGeneration
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = cls(config).eval()
    if family == "t5":  # a trained-size relative bias (random init is small): it must reach the logged entropy
        with torch.no_grad():
            for stack in (model.encoder, model.decoder):
                stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(40.0)
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"
    eager = cls(eager_config).eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def _mask(lengths, n, left):
    position = torch.arange(n)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return (position >= n - lengths if left else position < lengths).long()


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_and_cross_attention_equal_the_eager_probabilities(family, implementation, left):
    model, eager = _models(family, implementation)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, N_ENC), generator=gen)
    decoder_ids = torch.randint(3, VOCAB, (3, N_DEC), generator=gen)
    mask = _mask([N_ENC, 5, 3], N_ENC, left)
    decoder_mask = _mask([4, N_DEC, 2], N_DEC, left)
    inputs = dict(
        input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask
    )
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(**inputs))
        reference = eager(**inputs, output_attentions=True)
    expected = {
        "encoder": (reference.encoder_attentions, mask),
        "decoder_self": (reference.decoder_attentions, decoder_mask),
        "cross": (reference.cross_attentions, decoder_mask),
    }
    groups = {"encoder": [], "decoder_self": [], "cross": []}
    for call in calls:
        if call.module.startswith(("encoder.", "model.encoder.")):
            groups["encoder"].append(call)
        elif "EncDecAttention" in call.module or "encoder_attn" in call.module:
            groups["cross"].append(call)
        else:
            groups["decoder_self"].append(call)
    for group, (weights, tokens) in expected.items():
        assert len(groups[group]) == 2, (group, [c.module for c in calls])
        real = tokens.bool()[:, None, :]
        for call, probabilities in zip(groups[group], weights, strict=True):
            entropy = rows_of(call)[0]
            assert_rows_close(entropy, entropy_of(probabilities), real)
            assert entropy[~real.expand_as(entropy)].isnan().all(), (group, call.module)


def test_the_t5_relative_bias_is_part_of_what_eager_reports():
    """Without the bias the entropy would be that of softmax(q·kᵀ) alone: far from the model's own attention."""
    model, eager = _models("t5", "eager")
    ids = torch.randint(3, VOCAB, (2, N_ENC), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        calls, _ = collect(model.encoder, lambda: model.encoder(input_ids=ids))
        reference = eager.encoder(input_ids=ids, output_attentions=True)
    own = entropy_of(reference.attentions[0])
    captured = rows_of(calls[0])[0]
    no_bias = entropy_of(torch.softmax(calls[0].q.double() @ calls[0].k.double().transpose(-1, -2), dim=-1))
    assert_rows_close(captured, own)
    assert (no_bias - own).abs().mean() > 0.3  # the bias matters at this size: dropping it would be caught


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_pix2struct_cross_attention_as_long_as_the_decoder_is_cross_attention(implementation):
    """Pix2Struct's text decoder calls its cross-attention ``encoder_decoder_attention.attention``; with as many
    encoder states as decoder tokens only the module's own call (``key_value_states``) says it is cross-attention:
    its query rows are the decoder's, whose right padding is excluded."""
    config = transformers.Pix2StructTextConfig(
        vocab_size=VOCAB, hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, initializer_range=0.02,
    )  # fmt: skip
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = transformers.Pix2StructTextModel(config).eval()
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"
    eager = transformers.Pix2StructTextModel(eager_config).eval()
    eager.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(2)
    decoder_mask = _mask([N_DEC, 4, 2], N_DEC, left=False)
    encoder_mask = _mask([5, N_ENC, N_ENC], N_ENC, left=False)  # padded where the decoder is not
    inputs = dict(
        input_ids=torch.randint(3, VOCAB, (3, N_DEC), generator=gen), attention_mask=decoder_mask,
        encoder_hidden_states=torch.randn(3, N_ENC, 32, generator=gen), encoder_attention_mask=encoder_mask,
    )  # fmt: skip
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(**inputs))
        reference = eager(**inputs, output_attentions=True)
    cross = [call for call in calls if ".encoder_decoder_attention." in call.module]
    own = [call for call in calls if ".self_attention." in call.module]
    real = decoder_mask.bool()[:, None, :]
    for group, weights in ((own, reference.attentions), (cross, reference.cross_attentions)):
        assert len(group) == 2
        for call, probabilities in zip(group, weights, strict=True):
            entropy = rows_of(call)[0]
            assert_rows_close(entropy, entropy_of(probabilities), real)
            assert entropy[~real.expand_as(entropy)].isnan().all(), call.module
