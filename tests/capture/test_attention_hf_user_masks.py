"""Hugging Face models given a 4-D attention mask by the user (a prefix-LM mask, say), which transformers passes to
the attention function as it is. Eager, and transformers' flex function in its ``score_mod``, add it to the scores
whatever its dtype, so a boolean mask is added as 1 / 0 (it masks nothing); SDPA reads a boolean one as True = may
attend. References: the eager copy's own probabilities (``output_attentions=True``) and the scores its softmax took,
in float64, per layer and head. Flex runs uncompiled (transformers compiles it, which fails on the CPU with a tensor
mask): the same ``score_mod`` and the same call of geomon's wrapper."""

import pytest
import torch

from geomon.keys import ENTROPY, MAX_LOGIT, key
from tests.capture._reference import entropy_of, measure_once, softmax_inputs, tiny_hf_model

B, N, PREFIX = 2, 10, 4
MODELS = {  # name: (config class, model class, config, attention module of layer i)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2), "model.layers.{}.self_attn"),
    "bert": ("BertConfig", "BertModel", {}, "encoder.layer.{}.attention.self"),
}
LM = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          initializer_range=0.3)  # fmt: skip


@pytest.fixture
def flex_uncompiled(monkeypatch):
    """transformers' flex function calling ``flex_attention`` as it is, not compiled."""
    flex = pytest.importorskip("transformers.integrations.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(flex, "compile_friendly_flex_attention", uncompiled)


def _model(name: str, implementation: str) -> torch.nn.Module:
    config_name, model_name, config, _ = MODELS[name]
    return tiny_hf_model(config_name, model_name, implementation, **LM, **config)


def _prefix_lm(dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, N, N]``: the first ``PREFIX`` tokens see each other, the rest see the prefix and causally; boolean
    (True = may attend) or additive (0 / the dtype's minimum)."""
    allowed = torch.ones(N, N, dtype=torch.bool).tril()
    allowed[:PREFIX, :PREFIX] = True
    allowed = allowed.expand(B, 1, N, N)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _expected(model: torch.nn.Module, name: str, **inputs) -> list[tuple[torch.Tensor, float]]:
    """Per layer: the mean entropy of each head over every row of the model's own probabilities, and the largest
    score its softmax took."""
    with torch.no_grad():
        probabilities = model(**inputs, output_attentions=True).attentions
    scores = softmax_inputs(model, **inputs)
    layers = []
    for i, p in enumerate(probabilities):
        taken = scores[MODELS[name][3].format(i)][0]
        layers.append((entropy_of(p).mean(dim=(0, 2)), float(taken.masked_fill(taken <= -1e4, -torch.inf).amax())))
    return layers


def _assert_layers(name: str, values: dict, details: dict, expected: list) -> None:
    for i, (per_head, max_logit) in enumerate(expected):
        layer = MODELS[name][3].format(i)
        torch.testing.assert_close(details[key(ENTROPY, layer)].double(), per_head, rtol=1e-5, atol=1e-6, msg=layer)
        assert values[key(MAX_LOGIT, layer)] == pytest.approx(max_logit, rel=1e-5), layer


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("implementation", ["eager", "flex_attention"])
def test_eager_and_flex_add_a_boolean_4d_mask_as_one_and_zero(name, implementation, flex_uncompiled):
    """Eager computes ``softmax(scores + mask)``, and so does flex's ``score_mod``: a boolean mask adds 1 to the
    allowed scores and masks nothing, and that is what the eager copy's own probabilities are. geomon read the
    boolean as SDPA's (True = may attend) and reported the prefix-LM attention the model did not compute (entropy off
    by up to 0.4 nats per head, silently)."""
    model = _model(name, implementation)
    reference = _model(name, "eager")
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 60, (B, N), generator=torch.Generator().manual_seed(1))
    mask = _prefix_lm(torch.bool)
    expected = _expected(reference, name, input_ids=ids, attention_mask=mask)
    values, details, said = measure_once(model, input_ids=ids, attention_mask=mask)
    assert not [s for s in said if "logit map" not in s], said
    _assert_layers(name, values, details, expected)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    ("implementation", "dtype"),
    [("eager", torch.float32), ("sdpa", torch.float32), ("flex_attention", torch.float32), ("sdpa", torch.bool)],
    ids=["eager-additive", "sdpa-additive", "flex-additive", "sdpa-boolean"],
)
def test_a_4d_mask_that_masks_is_measured_as_the_prefix_lm_it_is(name, implementation, dtype, flex_uncompiled):
    """An additive 4-D mask (eager, SDPA and flex add it), and a boolean one under SDPA (True = may attend), mask the
    scores: the values equal the eager copy's own probabilities under the additive mask."""
    model = _model(name, implementation)
    reference = _model(name, "eager")
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 60, (B, N), generator=torch.Generator().manual_seed(1))
    expected = _expected(reference, name, input_ids=ids, attention_mask=_prefix_lm(torch.float32))
    values, details, said = measure_once(model, input_ids=ids, attention_mask=_prefix_lm(dtype))
    assert not [s for s in said if "logit map" not in s], said
    _assert_layers(name, values, details, expected)
