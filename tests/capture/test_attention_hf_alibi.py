"""capture_attention on Hugging Face ALiBi models: Bloom and MPT (attention computed inside their modules, Q/K
recomputed by geomon) and Falcon with ``alibi=True`` (ALiBi folded into the mask passed to the attention interface),
with and without right padding. References: the models' own attention probabilities (``output_attentions``), and a
float64 softmax written here from the projection weights with ALiBi written from the papers' slopes."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from geomon.capture import capture_attention, find_attention_modules  # noqa: E402
from tests.capture._reference import (  # noqa: E402
    assert_clean,
    assert_rows_close,
    collect,
    entropy_of,
    rows_of,
    softmax_rows,
)

B, N, H, E = 3, 10, 4, 32


def _inputs(padded):
    ids = torch.randint(0, 100, (B, N), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, N, dtype=torch.long)
    if padded:
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    return ids, mask


def _bloom():
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=100, hidden_size=E, n_layer=2, n_head=H)
    return transformers.BloomForCausalLM(config).eval()


def _mpt():
    torch.manual_seed(0)
    config = transformers.MptConfig(vocab_size=100, d_model=E, n_layers=2, n_heads=H, max_seq_len=32)
    return transformers.MptForCausalLM(config).eval()


def _layer_inputs(model, modules, ids, mask):
    inputs = []
    handles = [
        m.register_forward_pre_hook(lambda mod, a, kw: inputs.append(kw.get("hidden_states", a[0] if a else None)),
                                    with_kwargs=True)
        for m in modules
    ]  # fmt: skip
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    return inputs


def _reference(q, k, scale, alibi, mask):
    """float64 rows of softmax(scale q kᵀ + ALiBi) under the causal and key-padding mask."""
    allowed = torch.ones(N, N, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    return softmax_rows(q, k, scale=scale, allowed=allowed, additive=alibi)


SLOPES = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)  # 4 heads: a power of 2


def _check(model, calls, modules, ids, mask, qk_of, alibi, scale):
    real = mask.bool()[:, None, :]
    with torch.no_grad():
        own = model(ids, attention_mask=mask, output_attentions=True).attentions
    inputs = _layer_inputs(model, modules, ids, mask)
    for call, module, x, probabilities in zip(calls, modules, inputs, own, strict=True):
        entropy, max_logit, _ = rows_of(call)
        assert_rows_close(entropy, entropy_of(probabilities), real)
        q, k = qk_of(module, x.double())
        expected_entropy, expected_max = _reference(q, k, scale(module), alibi, mask)
        assert_rows_close(entropy, expected_entropy, real)
        assert_rows_close(max_logit, expected_max, real)
        assert entropy[~real.expand(entropy.shape)].isnan().all()


@pytest.mark.parametrize("padded", [False, True])
def test_bloom_equals_its_own_probabilities_and_a_float64_alibi_softmax(padded):
    model = _bloom()
    modules = [block.self_attention for block in model.transformer.h]
    names = [f"transformer.h.{i}.self_attention" for i in range(2)]
    assert find_attention_modules(model) == dict.fromkeys(names, "hf:bloom")
    ids, mask = _inputs(padded)
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(ids, attention_mask=mask))
    assert [c.module for c in calls] == names

    def qk_of(module, x):
        fused = x @ module.query_key_value.weight.double().T + module.query_key_value.bias.double()
        fused = fused.view(B, N, H, 3, E // H)
        return fused[..., 0, :].transpose(1, 2), fused[..., 1, :].transpose(1, 2)

    positions = (mask.cumsum(-1) - 1).clamp(min=0).double()  # Bloom: slope times the key's position
    alibi = SLOPES[None, :, None, None] * positions[:, None, None, :]
    _check(model, calls, modules, ids, mask, qk_of, alibi, lambda m: 1 / math.sqrt(E // H))
    assert_clean(model)


@pytest.mark.parametrize("padded", [False, True])
def test_mpt_equals_its_own_probabilities_and_a_float64_alibi_softmax(padded):
    model = _mpt()
    modules = [block.attn for block in model.transformer.blocks]
    names = [f"transformer.blocks.{i}.attn" for i in range(2)]
    assert find_attention_modules(model) == dict.fromkeys(names, "hf:mpt")
    ids, mask = _inputs(padded)
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(ids, attention_mask=mask))
    assert [c.module for c in calls] == names

    def qk_of(module, x):
        fused = x @ module.Wqkv.weight.double().T
        return (t.view(B, N, H, E // H).transpose(1, 2) for t in fused.split(E, -1)[:2])

    alibi = SLOPES[None, :, None, None] * torch.arange(1 - N, 1, dtype=torch.float64)  # MPT: slope times (j - Nk + 1)
    _check(model, calls, modules, ids, mask, qk_of, alibi, lambda m: 1 / math.sqrt(E // H))


def test_bloom_training_is_bit_identical_with_capture_on():
    def train(capture):
        torch.manual_seed(0)
        config = transformers.BloomConfig(
            vocab_size=100, hidden_size=E, n_layer=2, n_head=H, attention_dropout=0.1, hidden_dropout=0.1
        )
        model = transformers.BloomForCausalLM(config).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ids, mask = _inputs(True)
        torch.manual_seed(4)
        calls = []
        for _ in range(2):
            if capture:
                with capture_attention(model, lambda call: calls.append(rows_of(call)), strict=True):
                    loss = model(ids, attention_mask=mask, labels=ids).loss
            else:
                loss = model(ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return loss.detach(), [p.detach().clone() for p in model.parameters()], torch.rand(3), len(calls)

    plain, captured = train(False), train(True)
    assert torch.equal(plain[0], captured[0]) and torch.equal(plain[2], captured[2])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], captured[1], strict=True))
    assert captured[3] == 4


def _falcon(implementation):
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=100,
        hidden_size=E,
        num_hidden_layers=2,
        num_attention_heads=H,
        alibi=True,
        new_decoder_architecture=False,
        multi_query=False,
        attn_implementation=implementation,
    )
    return transformers.FalconForCausalLM(config).eval()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_falcon_alibi_is_exact_through_the_mask_it_passes(implementation, padded):
    model = _falcon(implementation)
    ids, mask = _inputs(padded)
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(ids, attention_mask=mask))
    assert [c.module for c in calls] == [f"transformer.h.{i}.self_attention" for i in range(2)]
    eager = _falcon("eager")  # same seed, same weights: the eager copy's own probabilities
    with torch.no_grad():
        own = eager(ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()[:, None, :]
    for call, probabilities in zip(calls, own, strict=True):
        entropy, _, _ = rows_of(call)
        assert_rows_close(entropy, entropy_of(probabilities), real)
        assert entropy[~real.expand(entropy.shape)].isnan().all()
