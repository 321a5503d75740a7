"""Attention read at its own softmax with a layout known by class (``geomon/capture/hf_softmax.py``): LongT5's local
and transient-global attention (``[B, blocks, H, L, 3L (+ G)]``, read at every length, as many blocks as heads
included) and ProphetNet's n-gram self-attention (a main-stream and a predicting-streams softmax in one call, the
latter under ``<module>.ngram``). References, in float64: the models' own probabilities (``output_attentions=True``)
per head over the real tokens' rows, taken from the attention mask, and the scores each softmax takes (max logit)."""

from __future__ import annotations

import pytest
import torch

from geomon.keys import ENTROPY, ENTROPY_NORMALIZED, MAX_LOGIT, key
from tests.capture._reference import entropy_of, measure_once, softmax_inputs, tiny_hf_model

B, PADDED = 2, 3
MASKED = -1e9  # LongT5 masks with -1e10, ProphetNet with finfo.min: far below any logit here


def _logged(values: dict) -> list[str]:
    return sorted(name.removeprefix(key(ENTROPY, "")) for name in values if name.startswith(key(ENTROPY, "")))


def _assert_rows(values: dict, details: dict, layer: str, probabilities, scores, real) -> None:
    """The layer's per-head entropy and max logit equal those of the rows ``[B', H, R, K]`` selected by ``real
    [B', H, R]``: entropy and allowed keys from the model's own ``probabilities``, max logit from the ``scores`` its
    softmax took."""
    entropy, keys = entropy_of(probabilities), (probabilities > 0).sum(-1)
    row_max = scores.masked_fill(scores <= MASKED, -torch.inf).amax(-1)
    heads = entropy.shape[1]
    per_head = torch.stack([entropy[:, h][real[:, h]].mean() for h in range(heads)])
    max_logit = torch.stack([row_max[:, h][real[:, h]].max() for h in range(heads)])
    torch.testing.assert_close(details[key(ENTROPY, layer)].double(), per_head, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(details[key(MAX_LOGIT, layer)].double(), max_logit, rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, layer)] == pytest.approx(float(entropy[real].mean()), rel=1e-5)
    assert values[key(MAX_LOGIT, layer)] == pytest.approx(float(max_logit.max()), rel=1e-5)
    several = real & (keys >= 2)
    normalised = entropy[several] / keys[several].double().log()
    assert values[key(ENTROPY_NORMALIZED, layer)] == pytest.approx(float(normalised.mean()), rel=1e-5)


def _blocks_to_rows(x: torch.Tensor) -> torch.Tensor:
    """LongT5's ``[B, blocks, H, L, ...]`` as ``[B, H, blocks·L, ...]``: row ``blk·L + i`` is position ``blk·L + i``."""
    return x.movedim(2, 1).flatten(2, 3)


@pytest.mark.parametrize("attention", ["local", "transient-global"])
@pytest.mark.parametrize("tokens", [9, 10])
def test_hugging_face_longt5_blocks_are_read_at_every_length_over_the_keys_its_softmax_normalises(attention, tokens):
    """LongT5's local attention scores ``[B, blocks, H, L, 3L]``, its transient-global attention ``[B, blocks, H, L,
    3L + G]`` (global-block keys after the local ones); the heads are at dimension 2 by class. With 9 tokens in blocks
    of 3 there are 3 blocks; with 10, 4 blocks beside the 4 heads (it was named and not reported), the last padded
    past the sequence. Right padding of 3 tokens. Per head and layer (the second reuses the first's bias), entropy,
    normalised entropy and max logit equal the model's own probabilities and softmax inputs over the real tokens'
    rows: a padded token's row and the blocks' padding are left out, though in transient-global attention they see
    global keys."""
    model = tiny_hf_model("LongT5Config", "LongT5EncoderModel", vocab_size=100, d_model=32, d_kv=8, d_ff=64,
                          num_layers=2, num_heads=4, local_radius=2, encoder_attention_type=attention,
                          global_block_size=2, initializer_range=0.3)  # fmt: skip
    ids = torch.randint(4, 100, (B, tokens), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, tokens, dtype=torch.long)
    keep[1, -PADDED:] = 0
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=keep, output_attentions=True).attentions
    inputs = softmax_inputs(model, input_ids=ids, attention_mask=keep)
    values, details, said = measure_once(model, input_ids=ids, attention_mask=keep)
    assert not said, said
    part = "LocalSelfAttention" if attention == "local" else "TransientGlobalSelfAttention"
    layers = [f"encoder.block.{i}.layer.0.{part}" for i in range(2)]
    assert _logged(values) == layers
    blocks = -(-tokens // 3)
    for layer, probabilities in zip(layers, own, strict=True):
        (scores,) = inputs[layer]
        assert scores.shape[:4] == (B, blocks, 4, 3) and probabilities.shape == scores.shape
        if attention == "transient-global":
            assert scores.shape[-1] == 9 + tokens // 2  # three local blocks, then a key per global block
        positions = torch.zeros(B, 3 * blocks, dtype=torch.bool)
        positions[:, :tokens] = keep.bool()  # the real tokens; the last block's padding past them is none
        real = positions[:, None, :].expand(B, 4, 3 * blocks)
        _assert_rows(values, details, layer, _blocks_to_rows(probabilities.double()), _blocks_to_rows(scores), real)


@pytest.mark.parametrize(
    ("heads", "ngram"), [pytest.param(4, 2, id="4-heads-2-streams"), pytest.param(2, 2, id="as-many-streams-as-heads")]
)
def test_hugging_face_prophetnet_ngram_self_attention_reports_its_main_and_predicting_streams(heads, ngram):
    """ProphetNet's decoder n-gram self-attention takes two softmaxes per call: the main stream ``[B, H, T, T]``
    (causal), reported under the module's name, and the predicting streams ``[B, ngram, H, T, 2T]``, reported under
    ``<module>.ngram`` (it was named and not reported). With decoder right padding, per head: entropy, normalised
    entropy and max logit equal its own ``decoder_attentions`` / ``decoder_ngram_attentions`` and the scores each
    softmax took, over the real decoder tokens' rows, in every stream (a padded position's predicting row still sees
    its own predicting key). With as many streams as heads, the heads are placed by class."""
    model = tiny_hf_model("ProphetNetConfig", "ProphetNetModel", vocab_size=100, hidden_size=32, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                          num_encoder_attention_heads=heads, num_decoder_attention_heads=heads,
                          max_position_embeddings=64, ngram=ngram, num_buckets=8, relative_max_distance=16,
                          initializer_range=0.3)  # fmt: skip
    n, t = 9, 7
    ids = torch.randint(4, 100, (B, n), generator=torch.Generator().manual_seed(1))
    keep, decoder_keep = torch.ones(B, n, dtype=torch.long), torch.ones(B, t, dtype=torch.long)
    keep[1, -PADDED:] = 0
    decoder_keep[1, -2:] = 0
    inputs = dict(input_ids=ids, attention_mask=keep, decoder_input_ids=ids[:, :t].clone(),
                  decoder_attention_mask=decoder_keep)  # fmt: skip
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    (main_scores, ngram_scores) = softmax_inputs(model, **inputs)["decoder.layers.0.self_attn"]
    values, details, said = measure_once(model, **inputs)
    assert not said, said
    layer = "decoder.layers.0.self_attn"
    assert _logged(values) == ["decoder.layers.0.cross_attn", layer, f"{layer}.ngram", "encoder.layers.0.self_attn"]
    (main,), (streams,) = out.decoder_attentions, out.decoder_ngram_attentions
    assert main.shape == main_scores.shape == (B, heads, t, t)
    assert streams.shape == ngram_scores.shape == (B, ngram, heads, t, 2 * t)
    real = decoder_keep.bool()[:, None, :].expand(B, heads, t)
    _assert_rows(values, details, layer, main.double(), main_scores, real)
    per_stream = real[:, :, None, :].expand(B, heads, ngram, t).flatten(2)
    _assert_rows(values, details, f"{layer}.ngram", streams.double().movedim(2, 1).flatten(2, 3),
                 ngram_scores.movedim(2, 1).flatten(2, 3), per_stream)  # fmt: skip
