"""Real Hugging Face models (small configs, no downloads): attention captured at SDPA matches the eager weights."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from geomon.capture import capture_sdpa  # noqa: E402
from geomon.metrics import AttentionEntropy  # noqa: E402


def _configs():
    return {
        "gpt2": (
            transformers.GPT2LMHeadModel,
            transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=32, eos_token_id=0),
        ),
        "llama": (  # grouped-query attention with rotary embeddings
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_size=32,
                intermediate_size=64,
                vocab_size=50,
            ),
        ),
    }


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_entropy_from_captured_qk_equals_entropy_of_the_eager_attention_weights(name):
    cls, config = _configs()[name]
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    sdpa_model = cls(config).eval()
    eager_config = copy.deepcopy(config)  # a model keeps a reference to its config: do not mutate the shared one
    eager_config._attn_implementation = "eager"
    eager_model = cls(eager_config).eval()
    eager_model.load_state_dict(sdpa_model.state_dict())
    x = torch.randint(0, 50, (2, 10))
    metrics = {}

    def on_attention(call):
        metric = metrics.setdefault(call.module, AttentionEntropy(num_heads=call.q.shape[1], backend="torch"))
        metric.update(call.q, call.k, scale=call.scale, is_causal=call.is_causal, attn_mask=call.attn_mask)

    with torch.no_grad(), capture_sdpa(sdpa_model, on_attention):
        sdpa_logits = sdpa_model(x).logits
    with torch.no_grad():
        eager = eager_model(x, output_attentions=True)  # the reference only: geomon never asks for these
    torch.testing.assert_close(sdpa_logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert len(metrics) == 2  # one per layer, named by the attention module
    for (module, metric), weights in zip(metrics.items(), eager.attentions, strict=True):
        expected = -(torch.special.xlogy(weights, weights)).sum(-1).mean()
        assert float(metric.compute()["entropy"]) == pytest.approx(float(expected), rel=1e-5), module


def test_differential_attention_is_measured_per_component_head_and_said_so():
    """DiffLlama mixes two softmax heads as (softmax_1 - λ·softmax_2)·V: geomon measures each component softmax
    (the model's own returned weights) and says once, per layer, that the difference itself has no entropy."""
    import warnings

    from geomon import Monitor

    config = transformers.DiffLlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=50)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DiffLlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    monitor = Monitor(every_n_steps=1, head=None, query_rows=None, strict=True).attach(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with monitor.step(0):
            weights = model(ids, output_attentions=True).attentions[0]
        monitor.compute()
    said = [str(w.message) for w in caught if "differential attention" in str(w.message)]
    assert len(said) == 1, said
    p = weights.double()
    want = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean((0, 2))  # per head over batch and rows
    got = monitor.details["geomon/attention/entropy/model.layers.0.self_attn"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
