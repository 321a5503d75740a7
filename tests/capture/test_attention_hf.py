"""capture_attention on Hugging Face models (small configs, no downloads) for every attention implementation:
"sdpa" (seen at SDPA), "eager" (the modeling module's eager function), and the AttentionInterface registry (custom
functions registered here, one with flash's 2-D padding masks, one that itself calls SDPA). References: an eager copy
with identical weights returning its own probabilities (``output_attentions=True``, the test's reference only), and
float64 softmax rows written here from GPT-2's and Llama's weights."""

import copy
import itertools
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from geomon.capture import capture_attention, find_attention_modules  # noqa: E402
from geomon.capture.hf import interface_mask  # noqa: E402
from tests.capture._reference import (  # noqa: E402
    assert_clean,
    assert_rows_close,
    collect,
    entropy_of,
    rows_of,
    softmax_rows,
)

VARLEN, THROUGH_SDPA, PACKED = "geomon_test_varlen", "geomon_test_via_sdpa", "geomon_test_packed"


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A flash-like function on CPU: 2-D padding mask (or None), causality from module.is_causal, bottom-right, and
    ``sliding_window`` as flash applies it (``window_size = (w - 1, w - 1)`` when there are more keys than ``w``)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    n_q, n_k = scores.shape[-2:]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if module.is_causal:
        allowed = allowed.tril(n_k - n_q)
    window = kwargs.get("sliding_window")
    if window is not None and n_k > window:
        distance = torch.arange(n_q)[:, None] + (n_k - n_q) - torch.arange(n_k)[None, :]
        allowed = allowed & (distance.abs() <= window - 1)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num()
    return (probs @ value).transpose(1, 2).contiguous(), probs


def _packed_attention(module, query, key, value, attention_mask, scaling=None, position_ids=None, **kwargs):
    """Flash's varlen call on packed sequences (batch 1, no mask), its sequences found as transformers' flash call
    finds them (``_flash_attention_forward``): its varlen arguments ``cu_seq_lens_q/k`` when all four are given, else
    ``prepare_fa_kwargs_from_position_ids`` (a sequence starts wherever ``position_ids`` is at its minimum); each
    token sees the tokens of its own sequence up to itself."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    assert attention_mask is None and query.shape[0] == 1
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    if all(kwargs.get(arg) is not None for arg in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")):
        edges = kwargs["cu_seq_lens_q"]
    else:
        (edges, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
    n = query.shape[-2]
    sequence = torch.bucketize(torch.arange(n), edges[1:].long(), right=True)
    allowed = (sequence[:, None] == sequence[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    probs = torch.softmax(((query @ key.transpose(-1, -2)) * scaling).masked_fill(~allowed, -math.inf), dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def _via_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    AttentionInterface.register(VARLEN, _varlen_attention)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    AttentionInterface.register(THROUGH_SDPA, _via_sdpa)
    AttentionInterface.register(PACKED, _packed_attention)
    AttentionMaskInterface.register(PACKED, flash_attention_mask)
    AttentionMaskInterface.register(THROUGH_SDPA, AttentionMaskInterface._global_mapping["sdpa"])
    yield
    for interface in (AttentionInterface, AttentionMaskInterface):
        for name in (VARLEN, THROUGH_SDPA, PACKED):
            interface._global_mapping.pop(name, None)


def _config(name, implementation):
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    elif name in ("llama", "mistral"):  # Mistral: Llama's shapes with a 4-token sliding window
        config_class = transformers.LlamaConfig if name == "llama" else transformers.MistralConfig
        config = config_class(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=100,
            **({"sliding_window": 4} if name == "mistral" else {}),
        )
    else:
        config = transformers.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100
        )
    config._attn_implementation = implementation
    return config


def _models(name, implementation, **overrides):
    """The model under test and an eager copy with the same weights (the reference)."""
    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "bert": transformers.BertModel,
    }
    config = _config(name, implementation)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = cls[name](config).eval()
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"
    eager = cls[name](eager_config).eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def _batch():
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    return ids, mask


LAYERS = {
    "gpt2": "transformer.h.{}.attn",
    "llama": "model.layers.{}.self_attn",
    "bert": "encoder.layer.{}.attention.self",
}
CASES = [(m, i) for m in ("gpt2", "llama", "bert") for i in ("sdpa", "eager", VARLEN, THROUGH_SDPA)]


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize(("name", "implementation"), CASES)
def test_each_layer_once_with_the_entropy_of_the_eager_probabilities(name, implementation, padded):
    model, eager = _models(name, implementation)
    ids, mask = _batch()
    mask = mask if padded else torch.ones_like(mask)
    assert find_attention_modules(model) == {LAYERS[name].format(i): f"hf:{implementation}" for i in range(2)}
    with torch.no_grad():
        calls, out = collect(model, lambda: model(ids, attention_mask=mask))
        reference = eager(ids, attention_mask=mask, output_attentions=True)
    assert [c.module for c in calls] == [LAYERS[name].format(i) for i in range(2)]
    first = out.logits if name != "bert" else out.last_hidden_state
    second = reference.logits if name != "bert" else reference.last_hidden_state
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
    tokens = mask.bool()
    # rows of real tokens only, on every path: eager/SDPA compute padded queries, flash-style functions drop them
    rows = tokens[:, None, :]
    causal = name != "bert"
    for call, weights in zip(calls, reference.attentions, strict=True):
        # the torch path, and the kernel as CUDA would run it (flash-style rules as per-row key ranges)
        for backend in ("torch", "triton"):
            entropy, _, n_keys = rows_of(call, backend)
            assert_rows_close(entropy, entropy_of(weights), rows)
            position = torch.arange(9)
            expected_keys = (
                torch.minimum(position + 1, tokens.sum(1, keepdim=True)) if causal else tokens.sum(1)[:, None]
            )
            assert_rows_close(n_keys[:, 0].double(), expected_keys.expand(3, 9).double(), rows[:, 0])
            assert entropy[~rows.expand_as(entropy)].isnan().all()
        if name == "llama" and (implementation in ("eager", VARLEN) or (implementation == "sdpa" and not padded)):
            assert call.k.shape[1] == 2 < call.q.shape[1] == 4  # grouped-query layout as the model used it


def _llama_by_hand(model, ids):
    """float64 Q/K of layer 0 from its weights: RMSNorm, projections, rotary (rotate-half), GQA kept."""
    attention = model.model.layers[0].self_attn
    norm = model.model.layers[0].input_layernorm
    x = model.model.embed_tokens.weight[ids].double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    q = (x @ attention.q_proj.weight.double().T).unflatten(-1, (4, 16)).transpose(1, 2)
    k = (x @ attention.k_proj.weight.double().T).unflatten(-1, (2, 16)).transpose(1, 2)
    inv_freq = 1.0 / (model.config.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).double() / 16))
    angles = torch.arange(ids.shape[1]).double()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(t):
        half = torch.cat([-t[..., 8:], t[..., :8]], dim=-1)
        return t * cos + half * sin

    return rotate(q), rotate(k)


def _gpt2_by_hand(model, ids):
    """float64 Q/K of GPT-2's layer 0 from its weights (Conv1D: x @ W + b)."""
    block = model.transformer.h[0]
    x = (model.transformer.wte.weight[ids] + model.transformer.wpe.weight[: ids.shape[1]]).double()
    x = torch.nn.functional.layer_norm(x, (64,), block.ln_1.weight.double(), block.ln_1.bias.double(), 1e-5)
    qkv = x @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()
    q, k = (t.unflatten(-1, (4, 16)).transpose(1, 2) for t in qkv.split(64, dim=-1)[:2])
    return q, k


@pytest.mark.parametrize("implementation", ["sdpa", "eager", VARLEN])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_max_logit_and_entropy_equal_a_float64_reference_after_rotary(name, implementation):
    model, _ = _models(name, implementation)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(ids))
        q, k = (_gpt2_by_hand if name == "gpt2" else _llama_by_hand)(model, ids)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    expected_entropy, expected_max = softmax_rows(q, k, allowed=causal)
    entropy, max_logit, _ = rows_of(calls[0])
    assert_rows_close(entropy, expected_entropy, tol=1e-4)
    assert_rows_close(max_logit, expected_max, tol=1e-4)


def test_gpt2_reordered_upcast_eager_path_is_seen():
    model, eager = _models("gpt2", "eager", reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    ids, mask = _batch()
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(ids, attention_mask=mask))
        reference = eager(ids, attention_mask=mask, output_attentions=True)
    assert [c.module for c in calls] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert calls[1].scale == pytest.approx(0.25 / 2)
    real = mask.bool()[:, None, :]
    for call, weights in zip(calls, reference.attentions, strict=True):
        assert_rows_close(rows_of(call)[0], entropy_of(weights), real)
        assert rows_of(call)[0][~real.expand(-1, 4, -1)].isnan().all()


@pytest.mark.parametrize("implementation", ["eager", VARLEN, "sdpa"])
def test_training_is_bit_identical_and_everything_is_restored(implementation):
    def snapshot():
        import transformers.models.gpt2.modeling_gpt2 as gpt2

        return (
            gpt2.eager_attention_forward,
            gpt2.GPT2Attention.__dict__["_upcast_and_reordered_attn"],
            dict(AttentionInterface._global_mapping),
            dict(ALL_ATTENTION_FUNCTIONS._local_mapping),
        )

    def train(capture):
        model, _ = _models("gpt2", implementation)  # GPT-2's dropouts are on: the random stream must not move
        model.train()
        ids, mask = _batch()
        torch.manual_seed(7)
        if capture:
            with capture_attention(model, lambda call: rows_of(call)):
                loss = model(ids, attention_mask=mask, labels=ids).loss
        else:
            loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()], torch.rand(2), model

    before = snapshot()
    plain, captured = train(False), train(True)
    assert torch.equal(plain[0], captured[0]) and torch.equal(plain[2], captured[2])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], captured[1], strict=True))
    assert snapshot() == before
    assert_clean(captured[3])
    model = captured[3]
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model, lambda call: None):
        model(_batch()[0])
        assert snapshot() != before or implementation == "sdpa"
        raise RuntimeError("boom")
    assert snapshot() == before
    assert_clean(model)


def test_flex_block_mask_is_read_per_chunk_as_the_sdpa_mask():
    from transformers.masking_utils import create_causal_mask

    _, mask = _batch()
    masks = {}
    for implementation in ("flex_attention", "sdpa"):
        config = _config("llama", implementation)
        masks[implementation] = create_causal_mask(
            config=config,
            inputs_embeds=torch.zeros(3, 9, 64),
            attention_mask=mask,
            past_key_values=None,
            position_ids=torch.arange(9)[None].expand(3, -1),
        )
    q, k = torch.zeros(3, 4, 9, 16), torch.zeros(3, 2, 9, 16)
    found = interface_mask(torch.nn.Module(), q, k, masks["flex_attention"], {})
    assert found.attn_mask is None and not found.is_causal  # no Nq x Nk tensor: a rule per key chunk
    rows = torch.tensor([0, 4, 8])
    dense = torch.cat([found.pattern(rows, start, min(start + 4, 9)) for start in range(0, 9, 4)], dim=-1)
    assert torch.equal(dense, masks["sdpa"][:, :, rows].expand_as(dense))


def _rule(found, n):
    """The [Nq, Nk] rule a generated pattern stands for (test-side materialisation; geomon never builds it)."""
    return None if found.pattern is None else found.pattern(torch.arange(n), 0, n).reshape(n, n)


@pytest.mark.parametrize("packing", ["positions-from-0", "positions-from-1", "varlen-arguments"])
def test_packed_sequences_are_measured_as_the_sequences_alone(packing):
    # four sequences packed into one row, as a flash varlen call sees them: position_ids restarting at 0, or at 1
    # (flash starts a sequence wherever they are at their minimum), or flash's own varlen arguments (cu_seq_lens_q/k,
    # max_length_q/k, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them; the model's positions
    # then run over the whole row). Reference: each sequence run alone through the eager copy. The kernel takes each
    # row's own sequence as its key range. Before, sequences started only where position_ids was 0: the last two
    # ways were measured as one causal sequence over the whole row, with nothing said.
    model, eager = _models("llama", PACKED)
    lengths = [4, 1, 6, 3]
    ids = torch.randint(0, 100, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    edges = torch.tensor([0, *lengths]).cumsum(0)
    if packing == "varlen-arguments":
        edges32, longest = edges.to(torch.int32), max(lengths)
        packed = dict(cu_seq_lens_q=edges32, cu_seq_lens_k=edges32, max_length_q=longest, max_length_k=longest)
    else:
        first = 0 if packing == "positions-from-0" else 1
        packed = dict(position_ids=torch.cat([torch.arange(first, first + n) for n in lengths])[None])
    edges = edges.tolist()
    with torch.no_grad():
        calls, out = collect(model, lambda: model(ids, **packed))
        alone = [eager(ids[:, a:b], output_attentions=True) for a, b in itertools.pairwise(edges)]
    expected_logits = torch.cat([run.logits for run in alone], dim=1)
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-4, atol=1e-5)  # the packed call is right
    assert len(calls) == 2 and calls[0].attn_mask is None and calls[0].pattern is not None
    for layer, call in enumerate(calls):
        expected = torch.cat([entropy_of(run.attentions[layer]) for run in alone], dim=-1)
        for backend in ("torch", "triton"):
            entropy, _, n_keys = rows_of(call, backend)
            assert_rows_close(entropy, expected)
            assert n_keys[0, 0].tolist() == [i + 1 for n in lengths for i in range(n)]


@pytest.mark.parametrize("implementation", [VARLEN, "sdpa", "eager"])
def test_sliding_window_attention_has_the_entropy_of_the_eager_probabilities(implementation):
    # Mistral with a 4-token window on 9 tokens, right padding: the flash-style call's window travels as a rule
    # (a per-row key range on the kernel), sdpa's and eager's as their 4-D masks; reference: the eager copy's own
    # probabilities (transformers' sliding-window mask)
    model, eager = _models("mistral", implementation)
    ids, mask = _batch()
    with torch.no_grad():
        calls, out = collect(model, lambda: model(ids, attention_mask=mask))
        reference = eager(ids, attention_mask=mask, output_attentions=True)
    tokens = mask.bool()
    torch.testing.assert_close(out.logits[tokens], reference.logits[tokens], rtol=1e-4, atol=1e-5)  # same attention
    assert len(calls) == 2
    expected_keys = torch.minimum(torch.arange(9) + 1, torch.tensor(4)).expand(3, 9)
    for call, weights in zip(calls, reference.attentions, strict=True):
        for backend in ("torch", "triton"):
            entropy, _, n_keys = rows_of(call, backend)
            assert_rows_close(entropy, entropy_of(weights), tokens[:, None, :])
            assert torch.equal(n_keys[:, 0][tokens], expected_keys[tokens])


def test_interface_mask_sliding_window_and_packed_sequences():
    module = torch.nn.Module()
    module.is_causal = True
    q, k = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4)
    found = interface_mask(module, q, k, None, {"sliding_window": 3})
    assert found.attn_mask is None and not found.is_causal and _rule(found, 6).sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    found = interface_mask(module, q, k, None, {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])})
    assert found.attn_mask is None and _rule(found, 6).sum(-1).tolist() == [1, 2, 3, 1, 2, 1]
    found = interface_mask(module, q, k, None, {"position_ids": torch.arange(6)[None]})
    assert found.is_causal or _rule(found, 6).sum(-1).tolist() == [1, 2, 3, 4, 5, 6]
    found = interface_mask(module, q, k, None, {"is_causal": False})
    assert found.attn_mask is None and found.pattern is None and not found.is_causal


def test_soft_capped_attention_warns_instead_of_reporting_a_wrong_entropy():
    config = transformers.Gemma2Config(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=100,
        attn_implementation="eager",
    )
    model = transformers.Gemma2ForCausalLM(config).eval()
    seen = []
    with torch.no_grad(), pytest.warns(UserWarning, match="soft-capping"), capture_attention(model, seen.append):
        model(torch.randint(0, 100, (1, 5)))
    assert seen == []


class _UnknownAttention(torch.nn.Module):
    """Looks like a transformers attention module (reads the global) but computes attention in its own way."""

    def forward(self, x):
        _ = ALL_ATTENTION_FUNCTIONS
        return torch.softmax(x @ x.transpose(-1, -2), -1) @ x


def test_an_attention_module_that_runs_unseen_is_named_in_a_warning():
    model = torch.nn.Sequential(_UnknownAttention())
    assert find_attention_modules(model) == {"0": "hf"}
    with pytest.warns(UserWarning, match="attention modules \\(hf\\) ran but their attention was not seen: '0'"):
        calls, _ = collect(model, lambda: model(torch.randn(1, 3, 4)))
    assert calls == []
