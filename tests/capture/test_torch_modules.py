"""torch.nn attention modules: nn.TransformerEncoder routes through SDPA in training mode and is captured."""

import pytest
import torch
from torch import nn

from geomon.capture import capture_sdpa
from geomon.metrics import AttentionEntropy


def test_transformer_encoder_layer_entropy_equals_its_own_attention_weights():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2).train()
    x = torch.randn(3, 9, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    metrics = {}

    def on_attention(call):
        metric = metrics.setdefault(call.module, AttentionEntropy(num_heads=call.q.shape[1]))
        metric.update(call.q, call.k, scale=call.scale, is_causal=call.is_causal, attn_mask=call.attn_mask)

    with capture_sdpa(encoder, on_attention):
        encoder(x, mask=causal, is_causal=True)
    assert list(metrics) == ["layers.0.self_attn", "layers.1.self_attn"]
    with torch.no_grad():  # the reference: the layer's own probabilities, asked for explicitly (geomon never does)
        _, weights = encoder.layers[0].self_attn(
            x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False
        )
    expected = -(torch.special.xlogy(weights, weights)).sum(-1).mean()
    assert float(metrics["layers.0.self_attn"].compute()["entropy"]) == pytest.approx(float(expected), rel=1e-5)


def test_the_inference_fast_path_is_not_seen():
    # documented limitation: eval-mode nn.TransformerEncoder may run a fused native kernel without SDPA
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1).eval()
    seen = []
    with torch.no_grad(), capture_sdpa(encoder, seen.append):
        encoder(torch.randn(2, 5, 32))
    assert seen == []
