"""Longformer's sliding-window attention (and LED's encoder, a copy of it): banded scores ``[B, N, H, 2w + 1]``
formed by the module itself, global tokens that every token attends to and that attend to every token with their
own projections, padding to a whole number of windows. References: the models' own probabilities
(``output_attentions=True``: the band rows, and the global tokens' rows, which Longformer returns transposed), and
the scores each of the module's two softmaxes takes (the max logit), in float64."""

from __future__ import annotations

import pytest
import torch

from geomon.keys import ENTROPY, ENTROPY_NORMALIZED, MAX_LOGIT, key
from tests.capture._reference import (
    choose_as_on_cuda,
    entropy_of,
    measure_once,
    softmax_inputs,
    tiny_hf_model,
)

B, N, HEADS, WINDOW = 2, 14, 4, 4  # 14 tokens: Longformer pads them to 16, a whole number of windows
LAYERS = 2
SCORES_MASKED_AT = -5e3


def _model(name: str) -> torch.nn.Module:
    if name == "longformer":
        model = tiny_hf_model("LongformerConfig", "LongformerModel", vocab_size=100, hidden_size=32,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
                              attention_window=[WINDOW] * LAYERS, max_position_embeddings=80)  # fmt: skip
    else:
        model = tiny_hf_model("LEDConfig", "LEDModel", vocab_size=100, d_model=32, encoder_layers=LAYERS,
                              decoder_layers=1, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                              encoder_ffn_dim=64, decoder_ffn_dim=64, attention_window=[WINDOW] * LAYERS,
                              max_encoder_position_embeddings=64, max_decoder_position_embeddings=64)  # fmt: skip
    with torch.no_grad():  # weights large enough that no row is near uniform
        for parameter_name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "embed" not in parameter_name:
                parameter.normal_(0, 0.3)
    return model


def _inputs(name: str, global_tokens: tuple[tuple[int, ...], ...]) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (B, N), generator=g)
    keep = torch.ones(B, N, dtype=torch.long)
    keep[1, -4:] = 0  # right padding, beside the model's own padding to 16
    inputs = dict(input_ids=ids, attention_mask=keep)
    if global_tokens:
        marked = torch.zeros(B, N, dtype=torch.long)
        for item, positions in enumerate(global_tokens):
            marked[item, list(positions)] = 1
        inputs["global_attention_mask"] = marked
    if name == "led":
        inputs["decoder_input_ids"] = torch.randint(3, 100, (B, 5), generator=g)
    return inputs


def _layers(name: str) -> list[str]:
    if name == "longformer":
        return [f"encoder.layer.{i}.attention.self" for i in range(LAYERS)]
    return [f"encoder.layers.{i}.self_attn.longformer_self_attn" for i in range(LAYERS)]


def _own(model: torch.nn.Module, name: str, inputs: dict) -> tuple[tuple, tuple | None]:
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    if name == "longformer":
        return out.attentions, out.global_attentions if "global_attention_mask" in inputs else None
    return out.encoder_attentions, out.encoder_global_attentions if "global_attention_mask" in inputs else None


def _expected(probabilities: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Per head mean entropy, layer mean entropy and layer mean normalised entropy of ``probabilities [B, H, R, K]``
    over ``rows [B, R]``."""
    entropy = entropy_of(probabilities)
    keys = (probabilities > 0).sum(-1)  # the keys the row's softmax gave weight: its allowed keys
    selected = rows[:, None, :].expand(entropy.shape)
    per_head = torch.stack([entropy[:, h][selected[:, h]].mean() for h in range(entropy.shape[1])])
    normalised = entropy[selected & (keys >= 2)] / keys[selected & (keys >= 2)].double().log()
    return per_head, float(entropy[selected].mean()), float(normalised.mean())


def _assert_layer(values: dict, details: dict, layer: str, probabilities, rows, scores_max: float) -> None:
    per_head, mean, normalised = _expected(probabilities, rows)
    torch.testing.assert_close(details[key(ENTROPY, layer)].double(), per_head, rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, layer)] == pytest.approx(mean, rel=1e-5)
    assert values[key(ENTROPY_NORMALIZED, layer)] == pytest.approx(normalised, rel=1e-5)
    assert values[key(MAX_LOGIT, layer)] == pytest.approx(scores_max, rel=1e-5)


def _row_max(scores: torch.Tensor) -> torch.Tensor:
    """Each row's largest allowed score (masked keys are at or below -5e3)."""
    return scores.masked_fill(scores <= SCORES_MASKED_AT, -torch.inf).amax(-1)


@pytest.mark.parametrize("name", ["longformer", "led"])
@pytest.mark.parametrize(
    "global_tokens", [pytest.param((), id="band-only"), pytest.param(((0, 6), (0,)), id="global-tokens")]
)
def test_band_and_global_rows_equal_the_models_own_probabilities(name, global_tokens):
    """Per head, the band rows of real, non-global tokens equal the model's own band probabilities; the global
    tokens' rows, reported under ``<module>.global``, equal its global probabilities; the max logit is that of the
    scores the module's softmax took. Items have different global-token counts (2 and 1) and padding (none, and
    4 tokens plus the model's 2)."""
    model = _model(name)
    inputs = _inputs(name, global_tokens)
    band, global_rows = _own(model, name, inputs)
    scores = softmax_inputs(model, **inputs)
    values, details, said = measure_once(model, **inputs)
    assert not said, said
    real = inputs["attention_mask"].bool()  # the model returns its band rows without its own padding to 16
    marked = inputs["global_attention_mask"].bool() if global_tokens else torch.zeros(B, N, dtype=torch.bool)
    layers = _layers(name)
    reported = {n.removeprefix(key(ENTROPY, "")) for n in values if n.startswith(key(ENTROPY, ""))}
    encoder = {n for n in reported if ".decoder" not in "." + n}
    assert encoder == set(layers) | ({f"{layer}.global" for layer in layers} if global_tokens else set())
    for i, layer in enumerate(layers):
        local_scores = scores[layer][0][:, :N]  # [B, 16, H, G + 2w + 1]: the rows of the 14 tokens
        band_rows = real & ~marked
        band_max = _row_max(local_scores)[band_rows].max()
        _assert_layer(values, details, layer, band[i].double(), band_rows, float(band_max))
        if global_tokens:
            own = global_rows[i].transpose(2, 3).double()  # returned [B, H, N, G]: the rows are [B, H, G, N]
            counts = marked.sum(dim=1)
            used = torch.arange(own.shape[2])[None, :] < counts[:, None]
            global_scores = scores[layer][1].view(B, HEADS, own.shape[2], -1)
            global_max = _row_max(global_scores).permute(0, 2, 1)[used].max()
            _assert_layer(values, details, f"{layer}.global", own, used, float(global_max))


@pytest.mark.parametrize(
    "global_tokens", [pytest.param((), id="band-only"), pytest.param(((0, 6), (0,)), id="global-tokens")]
)
def test_band_rows_run_on_the_kernel_as_a_sliding_window(monkeypatch, global_tokens):
    """As on CUDA: the band alone is a sliding window with a key mask, which the (interpreted) kernel takes; with
    global tokens the band-or-global rule goes to the torch path. Either way the values equal the torch path's."""
    pytest.importorskip("triton")
    model = _model("longformer")
    inputs = _inputs("longformer", global_tokens)
    on_torch, _, _ = measure_once(model, **inputs)
    chosen = choose_as_on_cuda(monkeypatch)
    as_on_cuda, _, said = measure_once(model, **inputs)
    assert not said, said
    assert chosen == (["triton"] * LAYERS if not global_tokens else ["torch"] * (2 * LAYERS))
    assert as_on_cuda.keys() == on_torch.keys()
    for name, value in on_torch.items():
        assert as_on_cuda[name] == pytest.approx(value, rel=1e-5), name
