"""More Hugging Face families under the monitor (small configs, random weights, no downloads), right padding, eager
and sdpa: every attention layer's logged entropy, per head, equals the eager copy's own probabilities
(``output_attentions=True``) over real query rows, in float64."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from geomon import Monitor  # noqa: E402
from tests.capture._reference import entropy_of, tiny_hf_model  # noqa: E402

LM = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          initializer_range=0.3)  # fmt: skip
FAMILIES = {  # name: (config class, model class, config, decoder-only)
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(LM, num_key_value_heads=2, head_dim=16)),
    "gpt-neox-partial-rotary": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(LM, rotary_pct=0.25)),
    "gemma3-sliding-window": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                              dict(LM, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24)),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(vocab_size=50, dim=32, n_layers=2, n_heads=4,
                                                               hidden_dim=64, initializer_range=0.3)),
    "clip-text-causal": ("CLIPTextConfig", "CLIPTextModel", dict(LM, eos_token_id=2, max_position_embeddings=16)),
    "siglip-text": ("SiglipTextConfig", "SiglipTextModel", dict(LM, max_position_embeddings=16)),
}  # fmt: skip
N, PADDED = 9, 3


def _model(config_name: str, model_name: str, config: dict, implementation: str) -> torch.nn.Module:
    return tiny_hf_model(config_name, model_name, implementation, **config)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layer_equals_the_models_own_probabilities(family, implementation):
    config_name, model_name, config = FAMILIES[family]
    model = _model(config_name, model_name, config, implementation)
    reference = _model(config_name, model_name, config, "eager")
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 50, (2, N), generator=torch.Generator().manual_seed(1))
    tokens = torch.ones(2, N, dtype=torch.long)
    tokens[1, N - PADDED :] = 0
    monitor = Monitor(every_n_steps=1, head=None, query_rows=None, strict=True).attach(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the logit-map diagnostics' notes on rotary layers are not under test
        with monitor.step(0):
            model(input_ids=ids, attention_mask=tokens)
        monitor.compute()
        probabilities = reference(input_ids=ids, attention_mask=tokens, output_attentions=True).attentions
    logged = {k: v for k, v in monitor.details.items() if k.startswith("geomon/attention/entropy/")}
    assert len(logged) == len(probabilities) == 2
    for (key, got), p in zip(sorted(logged.items()), probabilities, strict=True):
        rows = entropy_of(p)  # [B, H, N]
        real = tokens.bool()[:, None, :].expand(rows.shape)  # padded tokens' query rows are left out
        want = torch.stack([rows[:, h][real[:, h]].mean() for h in range(rows.shape[1])])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("n", [4, N])  # 4: as many tokens as the config's heads
def test_inkling2_depth_attention_residuals_are_said_and_not_reported(n):
    """Inkling 2's ``*AttentionResidual`` modules call the attention function with a learned query over the earlier
    blocks' states, ``[B, N, 1, D]`` over ``[B, N, blocks, D]``: a softmax over depth whose "heads" axis is the token
    positions. With as many tokens as the config has heads it was logged as four heads of attention over tokens;
    now it is named as not modelled at any length, and not reported (its self-attention has sinks: warned too; the
    model has eager attention only)."""
    config = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                  layer_types=["hybrid_sliding", "hybrid"], moe_intermediate_size=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_layers_per_attn_res_block=1, eos_token_id=2)  # fmt: skip
    model = _model("Inkling2TextConfig", "Inkling2TextModel", config, "eager")
    ids = torch.randint(3, 50, (2, n), generator=torch.Generator().manual_seed(1))
    monitor = Monitor(every_n_steps=1, head=None, query_rows=None).attach(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with monitor.step(0):
            model(input_ids=ids)
        values = monitor.compute()
    assert not [k for k in values if k.startswith("geomon/attention/")], sorted(values)
    said = [str(w.message) for w in caught if "depth attention" in str(w.message)]
    assert len(said) == 1 and "not modelled" in said[0], [str(w.message) for w in caught]
    for name in ("layers.0.mlp_input", "layers.1.attention_input", "layers.1.mlp_input", "final_input"):
        assert repr(name) in said[0], said[0]
