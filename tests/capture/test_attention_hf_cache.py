"""Hugging Face self-attention with more keys than queries: a cache of earlier tokens or prefix keys (PEFT prefix
tuning passes them as ``past_key_values``), a static cache, and ``generate()``. Self-attention is told by the module's
own call, not by the lengths, so the padded tokens' query rows are excluded as in any self-attention. References: an
eager copy with the same weights and the same cache returning its own probabilities (``output_attentions=True``),
over the rows of real query tokens."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, StaticCache  # noqa: E402

from tests.capture._reference import assert_rows_close, collect, entropy_of, rows_of  # noqa: E402

B, N, PREFIX, VOCAB = 3, 7, 3, 100


def _config(name, implementation):
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32)
    else:  # grouped-query heads: 4 query heads read 2 key heads
        config = transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=VOCAB, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
    config._attn_implementation = implementation
    return config


def _models(name, implementation):
    """The model under test and an eager copy with the same weights (the reference)."""
    cls = transformers.GPT2LMHeadModel if name == "gpt2" else transformers.LlamaForCausalLM
    config = _config(name, implementation)
    torch.manual_seed(0)
    model = cls(config).eval()
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"
    eager = cls(eager_config).eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def _tokens():
    """[B, N] 1 for real tokens, right padding in rows 1 and 2."""
    tokens = torch.ones(B, N, dtype=torch.long)
    tokens[1, 4:] = 0
    tokens[2, 2:] = 0
    return tokens


def _prefix(model):
    """A cache holding PREFIX prefix positions per layer (what PEFT prefix tuning passes), the same each call."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    dim = config.hidden_size // config.num_attention_heads
    cache, gen = DynamicCache(config=config), torch.Generator().manual_seed(5)
    for layer in range(config.num_hidden_layers):
        keys, values = (torch.randn(B, heads, PREFIX, dim, generator=gen) for _ in range(2))
        cache.update(keys, values, layer)
    return cache


def _assert_real_rows_equal(calls, attentions, real):
    assert len(calls) == len(attentions)
    for call, weights in zip(calls, attentions, strict=True):
        assert call.q.shape[-2] == weights.shape[-2] and call.k.shape[-2] == weights.shape[-1]
        entropy = rows_of(call)[0]
        assert_rows_close(entropy, entropy_of(weights), real)  # the model's own probabilities, real rows
        assert entropy[~real.expand_as(entropy)].isnan().all(), call.module  # padded tokens' rows excluded


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_self_attention_over_prefix_keys_excludes_padded_query_rows(name, implementation):
    model, eager = _models(name, implementation)
    ids = torch.randint(1, VOCAB, (B, N), generator=torch.Generator().manual_seed(1))
    tokens = _tokens()
    inputs = dict(
        attention_mask=torch.cat([torch.ones(B, PREFIX, dtype=torch.long), tokens], 1),  # prefix + tokens
        position_ids=torch.arange(PREFIX, PREFIX + N).expand(B, N),
    )
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(ids, past_key_values=_prefix(model), **inputs))
        reference = eager(ids, past_key_values=_prefix(eager), output_attentions=True, **inputs)
    assert {call.k.shape[-2] for call in calls} == {PREFIX + N}
    _assert_real_rows_equal(calls, reference.attentions, tokens.bool()[:, None, :])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_static_cache_places_the_query_rows_where_the_cache_is_filled(implementation):
    """A static cache hands the attention every position up to ``max_cache_len``; the queries sit where it was
    filled to, first at 0 (prefill), then after the prefilled tokens (a second chunk, right-padded too)."""
    model, eager = _models("llama", implementation)
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randint(1, VOCAB, (B, N), generator=gen), torch.randint(1, VOCAB, (B, 4), generator=gen)
    tokens = _tokens()
    chunk = torch.ones(B, 4, dtype=torch.long)
    chunk[0, 3:] = 0
    caches = [StaticCache(config=m.config, max_cache_len=16) for m in (model, eager)]
    with torch.no_grad():
        for ids, mask in ((first, tokens), (second, torch.cat([tokens, chunk], 1))):
            n = ids.shape[1]
            seen = mask.shape[1] - n
            inputs = dict(attention_mask=mask, position_ids=torch.arange(seen, seen + n).expand(B, n))
            calls, _ = collect(model, lambda: model(ids, cache=caches[0], **inputs))  # noqa: B023
            reference = eager(ids, cache=caches[1], output_attentions=True, **inputs)
            assert {call.k.shape[-2] for call in calls} == {16}
            _assert_real_rows_equal(calls, reference.attentions, mask[:, seen:].bool()[:, None, :])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_generate_with_grouped_query_sdpa_measures_every_decode_step(cache, padding, monkeypatch):
    """transformers' SDPA function packs a one-token query's grouped heads ([B, H, 1, D] as [B, Hk, G, D]) when it
    passes a mask: every decode step is reported with its H query heads, equal to eager's own probabilities."""
    from transformers.integrations import sdpa_attention

    packed = []
    pack = sdpa_attention.pack_gqa
    monkeypatch.setattr(sdpa_attention, "pack_gqa", lambda x, n: packed.append(x is not None) or pack(x, n))
    model, eager = _models("llama", "sdpa")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    tokens = torch.ones(2, 6, dtype=torch.long)
    tokens[1, :2] = 0 if padding == "left" else 1
    tokens[1, 4:] = 0 if padding == "right" else 1
    ids = ids.masked_fill(tokens == 0, 0)
    options = dict(attention_mask=tokens, max_new_tokens=3, do_sample=False, pad_token_id=0)
    if cache == "static":
        options["cache_implementation"] = "static"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing warned
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        calls, sequences = collect(model, lambda: model.generate(ids, **options))
    reference = eager.generate(ids, output_attentions=True, return_dict_in_generate=True, **options)
    assert torch.equal(sequences, reference.sequences)
    assert any(packed)  # the decode steps went through the packed layout
    steps = [weights for step in reference.attentions for weights in step]
    assert [tuple(call.q.shape) for call in calls] == [(2, 4, 6, 16)] * 2 + [(2, 4, 1, 16)] * 4
    for i, (call, weights) in enumerate(zip(calls, steps, strict=True)):
        real = tokens.bool()[:, None, :] if i < 2 else torch.ones(2, 1, 1, dtype=torch.bool)  # new tokens are real
        entropy = rows_of(call)[0]
        assert_rows_close(entropy, entropy_of(weights[..., : call.k.shape[-2]]), real)
        assert entropy[~real.expand_as(entropy)].isnan().all()


def test_a_failure_in_reading_the_call_never_reaches_the_forward(monkeypatch):
    """Reading the module's call runs in the model's forward, before the attention function: when it fails (a cache
    of another transformers version), the forward runs as without geomon and the call is named, not reported."""
    from geomon import Monitor
    from geomon.capture import hf

    def broken(*args, **kwargs):
        raise AttributeError("'StaticLayer' object has no attribute 'cumulative_length'")

    monkeypatch.setattr(hf, "call_layout", broken)
    model, _ = _models("llama", "sdpa")
    ids = torch.randint(1, VOCAB, (B, N), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False).attach(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with monitor.step(0):
            got = model(ids).logits
    assert torch.equal(got, want)
    assert any("reading its call failed" in str(w.message) and "cumulative_length" in str(w.message) for w in caught)
    assert not [key for key in monitor.compute() if key.startswith("geomon/attention/")]


class _Frame:
    """A stand-in for the attention method's frame: only its locals are read."""

    def __init__(self, local):
        self.f_locals = local


def test_static_caches_that_cannot_say_where_the_queries_are_leave_the_call_unplaced():
    """A static cache of a transformers version without per-layer objects, or a static layer that does not say how
    far it is filled: the queries' position among the keys is unknown, so the call is not reported (a dynamic cache
    appends, and its queries are the last keys)."""
    from geomon.capture.hf import call_layout

    model, _ = _models("llama", "sdpa")
    module = model.model.layers[0].self_attn
    q, k = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 8, 16)

    class StaticCache:  # the name older transformers gave its static cache
        """No ``layers``: older transformers kept a static cache's tensors in lists."""

    old = call_layout(module, q, k, _Frame({"self": module, "past_key_values": StaticCache()}))
    assert old.unplaced is not None and "StaticCache" in old.unplaced
    layer = object.__new__(transformers.cache_utils.StaticLayer)
    layer.max_cache_len = 8
    cache = type("Cache", (), {"layers": [layer] * 2})()
    assert not hasattr(layer, "cumulative_length")
    unfilled = call_layout(module, q, k, _Frame({"self": module, "past_key_values": cache}))
    assert unfilled.unplaced is not None and "filled" in unfilled.unplaced
    dynamic = call_layout(module, q, k, _Frame({"self": module}))
    assert dynamic.unplaced is None and dynamic.leading == 8 - 2
