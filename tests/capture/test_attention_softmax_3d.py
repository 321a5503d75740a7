"""Attention written by hand over 3-D ``[batch·heads, queries, keys]`` scores (the fairseq-era layout of Hugging Face
XGLM, TrOCR, MVP, FSMT, GroupViT, VitDet, and of torch's ``F.multi_head_attention_forward`` that WavLM calls), read at
the module's own softmax. References: the models' own per-head probabilities (``output_attentions=True``, which the
models regroup as ``[batch, heads, ...]`` themselves), in float64; for WavLM, whose returned weights are averaged
over heads, the scores its softmax takes, regrouped as torch's MHA regroups them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from geomon.keys import ENTROPY, MAX_LOGIT, key
from tests.capture._reference import (
    entropy_of,
    measure_once,
    returned_probabilities,
    softmax_inputs,
    tiny_hf_model,
)

B, N, PADDED = 2, 9, 3


def _hf(config_name: str, model_name: str, **config) -> nn.Module:
    model = tiny_hf_model(config_name, model_name, **config)
    with torch.no_grad():  # weights large enough that no map is near uniform
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "embed" not in name:
                parameter.normal_(0, 0.3)
    return model


def _entropies(values: dict, details: dict) -> dict[str, tuple[float, torch.Tensor]]:
    prefix = key(ENTROPY, "")
    return {n.removeprefix(prefix): (v, details[n]) for n, v in values.items() if n.startswith(prefix)}


def _assert_equals_own(measured: tuple[float, torch.Tensor], probabilities: torch.Tensor, real: torch.Tensor):
    """Per head and layer mean equal the float64 entropies of ``probabilities [B, H, Nq, Nk]`` over ``real`` rows
    (``[B, Nq]``)."""
    mean, per_head = measured
    entropy = entropy_of(probabilities)
    rows = real[:, None, :].expand(entropy.shape)
    expected_heads = torch.stack([entropy[:, h][rows[:, h]].mean() for h in range(entropy.shape[1])])
    torch.testing.assert_close(per_head.double(), expected_heads, rtol=1e-5, atol=1e-6)
    assert mean == pytest.approx(float(entropy[rows].mean()), rel=1e-5)


TEXT_SEQ2SEQ = dict(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=64)  # fmt: skip


def _padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 100, (B, N), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, N, dtype=torch.long)
    keep[1, -PADDED:] = 0  # right padding
    return ids, keep


@pytest.mark.parametrize(
    ("config_name", "model_name", "config"),
    [
        pytest.param("XGLMConfig", "XGLMModel", dict(vocab_size=100, d_model=32, num_layers=2, attention_heads=4,
                                                      ffn_dim=64, max_position_embeddings=64), id="xglm"),
        pytest.param("TrOCRConfig", "TrOCRForCausalLM", dict(vocab_size=100, d_model=32, decoder_layers=2,
                                                             decoder_attention_heads=4, decoder_ffn_dim=64,
                                                             max_position_embeddings=64), id="trocr"),
    ],
)  # fmt: skip
def test_decoders_equal_their_own_probabilities_per_head(config_name, model_name, config):
    model = _hf(config_name, model_name, **config)
    ids, keep = _padded_ids()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=keep, output_attentions=True).attentions
    values, details, said = measure_once(model, input_ids=ids, attention_mask=keep)
    assert not said, said
    measured = _entropies(values, details)
    assert len(measured) == len(own) == 2, sorted(measured)
    for layer, p in zip(sorted(measured), own, strict=True):
        _assert_equals_own(measured[layer], p, keep.bool())


@pytest.mark.parametrize(
    ("config_name", "model_name", "config"),
    [
        pytest.param("MvpConfig", "MvpModel", TEXT_SEQ2SEQ, id="mvp"),
        # sequence-first hidden states: [N, B, C] viewed as [N, B·H, Dh]
        pytest.param("FSMTConfig", "FSMTModel", dict(TEXT_SEQ2SEQ, langs=["en", "de"], src_vocab_size=100,
                                                     tgt_vocab_size=100), id="fsmt"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("decoder_length", [7, N])
def test_encoder_decoders_equal_their_own_probabilities_per_head(config_name, model_name, config, decoder_length):
    """With as many decoder tokens as encoder tokens, the cross-attention's padded keys (the encoder's) are not its
    padded queries: its rows are the decoder's, none padded here."""
    model = _hf(config_name, model_name, **config)
    ids, keep = _padded_ids()
    decoder_ids = ids[:, :decoder_length].clone()
    inputs = dict(input_ids=ids, attention_mask=keep, decoder_input_ids=decoder_ids)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    values, details, said = measure_once(model, **inputs)
    assert not said, said
    measured = _entropies(values, details)
    real_queries = torch.ones(B, decoder_length, dtype=torch.bool)
    expected = {
        "encoder.layers.0.self_attn": (out.encoder_attentions[0], keep.bool()),  # padded query rows left out
        "decoder.layers.0.self_attn": (out.decoder_attentions[0], real_queries),
        "decoder.layers.0.encoder_attn": (out.cross_attentions[0], real_queries),  # the decoder's rows
    }
    assert sorted(measured) == sorted(expected)
    for layer, (p, real) in expected.items():
        _assert_equals_own(measured[layer], p, real)


def test_vision_families_equal_their_own_probabilities_per_head():
    """VitDet (windowed blocks and a global block, relative position terms added to the scores) and GroupViT (its
    grouping's assignment, a softmax over groups, stays warned)."""
    vitdet = _hf("VitDetConfig", "VitDetModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, image_size=32, patch_size=4, pretrain_image_size=32,
                 use_relative_position_embeddings=True, window_block_indices=[0], window_size=4)  # fmt: skip
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = vitdet(pixel_values=x, output_attentions=True).attentions
    values, details, said = measure_once(vitdet, pixel_values=x)
    assert not said, said
    measured = _entropies(values, details)
    assert sorted(measured) == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    for layer, p in zip(sorted(measured), own, strict=True):  # [B·windows, H, N, N]
        _assert_equals_own(measured[layer], p, torch.ones(p.shape[0], p.shape[-2], dtype=torch.bool))

    groupvit = _hf("GroupViTVisionConfig", "GroupViTVisionModel", hidden_size=32, depths=[1, 1], num_hidden_layers=2,
                   num_group_tokens=[4, 0], num_output_groups=[4, 4], num_attention_heads=4, intermediate_size=64,
                   image_size=32, patch_size=8)  # fmt: skip
    own_maps = returned_probabilities(groupvit, "GroupViTAttention", pixel_values=x)
    values, details, said = measure_once(groupvit, pixel_values=x)
    measured = _entropies(values, details)
    assert sorted(measured) == sorted(own_maps) and len(own_maps) == 3, (sorted(measured), sorted(own_maps))
    for layer, p in own_maps.items():
        _assert_equals_own(measured[layer], p, torch.ones(p.shape[0], p.shape[-2], dtype=torch.bool))
    (warning,) = said
    assert "GroupViTAssignAttention" in warning and "vision_model.encoder.stages.0.downsample.assign" in warning


def test_sam_vision_encoder_equals_its_own_probabilities_per_head():
    """SAM's image encoder: windowed and global blocks, decomposed relative positions added to ``[B·H, N, N]``
    scores, which it returns as they are (batch-major, as it folds them)."""
    model = _hf("SamVisionConfig", "SamVisionModel", hidden_size=32, output_channels=16, num_hidden_layers=2,
                num_attention_heads=4, image_size=64, patch_size=8, mlp_dim=64, global_attn_indexes=[1],
                window_size=4, use_rel_pos=True)  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():  # the patch embedding too: no window is near uniform
            parameter.normal_(0, 0.3)
    x = torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model(pixel_values=x, output_attentions=True).attentions
    values, details, said = measure_once(model, pixel_values=x)
    assert not said, said
    measured = _entropies(values, details)
    assert sorted(measured) == ["vision_encoder.layers.0.attn", "vision_encoder.layers.1.attn"]
    for layer, p in zip(sorted(measured), own, strict=True):  # [B·windows·H, N, N], then [B·H, N, N]
        p = p.view(-1, 4, *p.shape[-2:])
        assert float(entropy_of(p).std()) > 0.05  # not uniform: the per-head check can fail
        _assert_equals_own(measured[layer], p, torch.ones(p.shape[0], p.shape[-2], dtype=torch.bool))


def test_detr_style_and_led_decoders_equal_their_own_probabilities_per_head():
    """Table Transformer (DETR's attention: self-attention of object queries, cross-attention to image features),
    and LED's decoder (its encoder's banded attention: tests/capture/test_attention_longformer.py)."""
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], out_features=["stage2"])
    detr = _hf("TableTransformerConfig", "TableTransformerModel", use_timm_backbone=False, backbone_config=backbone,
               use_pretrained_backbone=False, num_queries=5, **TEXT_SEQ2SEQ)  # fmt: skip
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = detr(pixel_values=x, output_attentions=True)
    values, details, said = measure_once(detr, pixel_values=x)
    assert not said, said
    measured = _entropies(values, details)
    expected = {"encoder.layers.0.self_attn": out.encoder_attentions[0], "decoder.layers.0.self_attn":
                out.decoder_attentions[0], "decoder.layers.0.encoder_attn": out.cross_attentions[0]}  # fmt: skip
    assert sorted(measured) == sorted(expected)
    for layer, p in expected.items():  # the image's padding mask is all ones here: every row counts
        _assert_equals_own(measured[layer], p, torch.ones(B, p.shape[-2], dtype=torch.bool))

    led = _hf("LEDConfig", "LEDModel", max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
              attention_window=4, **TEXT_SEQ2SEQ)  # fmt: skip
    ids, keep = _padded_ids()
    inputs = dict(input_ids=ids, attention_mask=keep, decoder_input_ids=ids[:, :7].clone())
    with torch.no_grad():
        out = led(**inputs, output_attentions=True)
    values, details, said = measure_once(led, **inputs)
    measured = _entropies(values, details)
    assert not said, said
    assert sorted(measured) == ["decoder.layers.0.encoder_attn", "decoder.layers.0.self_attn",
                                "encoder.layers.0.self_attn.longformer_self_attn"]  # fmt: skip
    _assert_equals_own(measured["decoder.layers.0.self_attn"], out.decoder_attentions[0], torch.ones(B, 7).bool())
    _assert_equals_own(measured["decoder.layers.0.encoder_attn"], out.cross_attentions[0], torch.ones(B, 7).bool())


def test_vits_text_encoder_equals_the_scores_its_softmax_takes():
    """VITS: windowed relative position terms added to ``[B·H, N, N]`` scores, padded keys at the dtype's lowest
    value; its own probabilities are not returned."""
    model = _hf("VitsConfig", "VitsModel", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=64, window_size=2, flow_size=8, spectrogram_bins=16, upsample_initial_channel=16,
                upsample_rates=[2], upsample_kernel_sizes=[4], resblock_kernel_sizes=[3],
                resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=1, posterior_encoder_num_wavenet_layers=1,
                prior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=1,
                depth_separable_num_layers=1).text_encoder  # fmt: skip
    ids, keep = _padded_ids()
    ids = ids % 40
    inputs = dict(input_ids=ids, padding_mask=keep.unsqueeze(-1).float(), attention_mask=keep)
    scores = softmax_inputs(model, **inputs)
    values, details, said = measure_once(model, **inputs)
    assert not said, said
    measured = _entropies(values, details)
    assert sorted(measured) == sorted(scores) == ["encoder.layers.0.attention", "encoder.layers.1.attention"]
    for layer, (s,) in scores.items():
        _assert_equals_own(measured[layer], torch.softmax(s.view(B, 4, N, N), dim=-1), keep.bool())


def test_speecht5_equals_its_own_probabilities_per_head():
    """SpeechT5 speech-to-text: its encoder adds a relative position bias to ``[B·H, N, N]`` scores, over frames
    padded in the second sample; the decoder's self- and cross-attention are fairseq-style too."""
    model = _hf("SpeechT5Config", "SpeechT5ForSpeechToText", vocab_size=50, hidden_size=32, encoder_layers=1,
                decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, conv_dim=(16, 16), conv_stride=(5, 5), conv_kernel=(10, 10),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                encoder_max_relative_position=8)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    keep = torch.ones(B, 800, dtype=torch.long)
    keep[1, -300:] = 0
    inputs = dict(input_values=torch.randn(B, 800, generator=g), attention_mask=keep,
                  decoder_input_ids=torch.randint(3, 50, (B, 6), generator=g))  # fmt: skip
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    values, details, said = measure_once(model, **inputs)
    assert not said, said
    measured = _entropies(values, details)
    (encoder,) = out.encoder_attentions
    frames = (encoder > 0).any(dim=1).any(dim=1)  # [B, N]: frames some row of some head attends to
    assert frames[0].all() and not frames[1].all()
    expected = {
        "speecht5.encoder.wrapped_encoder.layers.0.attention": (encoder, frames),
        "speecht5.decoder.wrapped_decoder.layers.0.self_attn": (out.decoder_attentions[0], torch.ones(B, 6).bool()),
        "speecht5.decoder.wrapped_decoder.layers.0.encoder_attn": (out.cross_attentions[0], torch.ones(B, 6).bool()),
    }
    assert sorted(measured) == sorted(expected)
    for layer, (p, real) in expected.items():
        _assert_equals_own(measured[layer], p, real)


def test_wavlm_equals_the_scores_its_multi_head_attention_takes():
    """WavLM calls ``F.multi_head_attention_forward`` with a gated relative position bias and a key padding mask:
    its softmax takes ``[B·H, N, N]`` scores with padded keys at -inf, which torch itself regroups as
    ``[B, H, N, N]``."""
    model = _hf("WavLMConfig", "WavLMModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, conv_dim=(32, 32), conv_stride=(5, 5), conv_kernel=(10, 10),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer")  # fmt: skip
    audio = torch.randn(B, 400, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, 400, dtype=torch.long)
    keep[1, -150:] = 0
    scores = softmax_inputs(model, input_values=audio, attention_mask=keep)
    values, details, said = measure_once(model, input_values=audio, attention_mask=keep)
    assert not said, said
    measured = _entropies(values, details)
    assert sorted(measured) == sorted(scores) == ["encoder.layers.0.attention", "encoder.layers.1.attention"]
    for layer, (s,) in scores.items():
        s = s.view(B, 4, *s.shape[-2:])
        real = s.amax(dim=(1, 2)) > -torch.inf  # [B, N] keys some row may attend to: the others are padding
        assert not real.all() and real.any(dim=1).all()
        _assert_equals_own(measured[layer], torch.softmax(s, dim=-1), real)
        rows = real[:, None, :].expand(B, 4, s.shape[-2])  # the layer's max logit: over its batch and query rows
        assert values[key(MAX_LOGIT, layer)] == pytest.approx(float(s.amax(-1)[rows].max()), rel=1e-5)


def test_informer_prob_sparse_attention_is_said_and_not_reported():
    """ProbSparse attention takes a softmax over its top-u query rows only (the others read the mean of the
    values): it is not one softmax over every query, so it is named, not reported; the decoder's cross-attention
    (full, 3-D scores) equals its own probabilities."""
    model = _hf("InformerConfig", "InformerModel", prediction_length=4, context_length=8, lags_sequence=[1],
                num_time_features=1, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_type="prob",
                distil=False)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = dict(past_values=torch.randn(B, 9, generator=g), past_time_features=torch.randn(B, 9, 1, generator=g),
                  past_observed_mask=torch.ones(B, 9), future_values=torch.randn(B, 4, generator=g),
                  future_time_features=torch.randn(B, 4, 1, generator=g))  # fmt: skip
    with torch.no_grad():
        (cross,) = model(**inputs, output_attentions=True).cross_attentions
    values, details, said = measure_once(model, **inputs)
    measured = _entropies(values, details)
    assert sorted(measured) == ["decoder.layers.0.encoder_attn"]
    _assert_equals_own(measured["decoder.layers.0.encoder_attn"], cross, torch.ones(B, 4, dtype=torch.bool))
    (warning,) = said
    assert "ProbSparse" in warning
    assert "'encoder.layers.0.self_attn'" in warning and "'decoder.layers.0.self_attn'" in warning


class FoldedAttention(nn.Module):
    """Written by hand over ``[B·H, N, N]`` scores, heads folded into the batch batch-major, a key padding mask
    added as -inf."""

    def __init__(self, dim: int = 16, heads: int = 4, softmax_dim: int = -1):
        super().__init__()
        self.num_heads, self.softmax_dim = heads, softmax_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def scores(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2).flatten(0, 1)  # noqa: E731
        q, k = split(self.q_proj(x)), split(self.k_proj(x))
        bias = torch.zeros(padding.shape, dtype=x.dtype).masked_fill(padding, -torch.inf)
        return (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias.repeat_interleave(self.num_heads, 0)[:, None]

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        v = self.v_proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2).flatten(0, 1)
        weights = torch.softmax(self.scores(x, padding), dim=self.softmax_dim)
        return (weights @ v).unflatten(0, (x.shape[0], self.num_heads)).transpose(1, 2).flatten(2)


@pytest.mark.parametrize(("query_rows", "softmax_dim"), [(None, -1), (5, -1), (None, 2)])
def test_folded_scores_equal_an_explicit_float64_softmax_per_head(query_rows, softmax_dim):
    """Also with the keys' dimension given as a positive index of the 3-D scores (``dim=2``)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": FoldedAttention(softmax_dim=softmax_dim)})
    for parameter in model.parameters():
        nn.init.normal_(parameter, 0, 0.6)
    n = 12
    x = torch.randn(3, n, 16, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(3, n, dtype=torch.bool)
    padding[2, -4:] = True
    values, details, said = measure_once(model.attn, x, padding, query_rows=query_rows)
    assert not said, said
    with torch.no_grad():
        scores = copy.deepcopy(model.attn).double().scores(x.double(), padding).view(3, 4, n, n)  # [B, H, N, N]
    rows = torch.arange(n) if query_rows is None else torch.linspace(0, n - 1, query_rows).round().long()
    scores, real = scores[:, :, rows], ~padding[:, rows]
    p = torch.softmax(scores, dim=-1)
    (name,) = [n for n in values if n.startswith(key(ENTROPY, ""))]
    _assert_equals_own((values[name], details[name]), p, real)
    max_logit = scores.amax(-1)[real[:, None, :].expand(3, 4, len(rows))].max()
    assert values[key(MAX_LOGIT, name.removeprefix(key(ENTROPY, "")))] == pytest.approx(float(max_logit), rel=1e-5)
