"""capture_attention on x-transformers models: Decoder / Encoder in the default (non-flash) mode with rotary, ALiBi,
T5-style relative bias, grouped-query heads with QK-norm, memory and zero key/values, residual attention, flash
mode, cross-attention, with and without padding. References: the model's own attention probabilities and
pre-softmax logits (``return_intermediates``), the non-flash copy of a flash model, and a float64 softmax written
here from the projection weights. Configurations whose softmax geomon does not model warn and report nothing."""

import copy

import pytest
import torch

xt = pytest.importorskip("x_transformers")

from geomon.capture import capture_attention, find_attention_modules  # noqa: E402
from tests.capture._reference import (  # noqa: E402
    assert_clean,
    assert_rows_close,
    collect,
    entropy_of,
    rows_of,
    softmax_rows,
)

N, B = 16, 3

CONFIGS = {
    "default": {},
    "rotary": {"rotary_pos_emb": True},
    "alibi": {"alibi_pos_bias": True},
    "rel_pos": {"rel_pos_bias": True},
    "gqa_qk_norm": {"attn_kv_heads": 2, "attn_qk_norm": True},
    "mem_and_zero_kv": {"attn_num_mem_kv": 2, "attn_add_zero_kv": True},
    "residual_attn": {"residual_attn": True, "alibi_pos_bias": True},
    "zero_kv_rel_pos": {"attn_add_zero_kv": True, "rel_pos_bias": True},  # a bias and the zero key Attend adds
    # the previous layer's scores cover the zero key, the bias and the mask do not
    "zero_kv_residual": {"attn_add_zero_kv": True, "residual_attn": True, "attn_num_mem_kv": 2, "rel_pos_bias": True},
}


def _model(layers, flash=False, **kwargs):
    torch.manual_seed(0)
    attn_layers = layers(dim=64, depth=2, heads=4, attn_flash=flash, **kwargs)
    return xt.TransformerWrapper(num_tokens=256, max_seq_len=64, attn_layers=attn_layers).eval()


def _tokens_and_mask(padded):
    tokens = torch.randint(0, 256, (B, N), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, N, dtype=torch.bool)
    if padded:
        mask[1, 11:] = False
        mask[2, 5:] = False
    return tokens, mask


def _own_attention(model, tokens, **kwargs):
    """The model's own attention probabilities and pre-softmax logits per attention layer (non-flash only)."""
    with torch.no_grad():
        _, intermediates = model(tokens, return_intermediates=True, **kwargs)
    return [(i.post_softmax_attn, i.pre_softmax_attn) for i in intermediates.attn_intermediates]


#: Which calls of the two layers the kernel takes (on CUDA), per configuration: biases (ALiBi, T5-style) go to it as
#: a per-score mask read in place beside the causal rule and key padding; the first layer of residual attention has no
#: previous scores yet; zero and memory keys in self-attention (moved last, not covered by the terms) and two per-score
#: terms are left to the torch path.
ON_THE_KERNEL = {"mem_and_zero_kv": [False, False], "residual_attn": [True, False], "zero_kv_rel_pos": [False, False],
                 "zero_kv_residual": [False, False]}  # fmt: skip


def _assert_equal_to_own(calls, own, real_rows, on_the_kernel=None):
    assert len(calls) == len(own)
    on_the_kernel = [True] * len(calls) if on_the_kernel is None else on_the_kernel
    for call, (probabilities, logits), kernel in zip(calls, own, on_the_kernel, strict=True):
        entropy, max_logit, _ = rows_of(call)
        assert_rows_close(entropy, entropy_of(probabilities), real_rows)
        assert_rows_close(max_logit, logits.amax(-1), real_rows)
        assert entropy[~real_rows.expand(entropy.shape)].isnan().all()  # padding rows are left out
        if not kernel:
            with pytest.raises(RuntimeError, match="torch path"):
                rows_of(call, "triton")
            continue
        entropy, max_logit, _ = rows_of(call, "triton")  # the kernel, interpreted on the CPU
        assert_rows_close(entropy, entropy_of(probabilities), real_rows)
        assert_rows_close(max_logit, logits.amax(-1), real_rows)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layers", ["Decoder", "Encoder"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_non_flash_equals_the_models_own_probabilities(config, layers, padded):
    model = _model(getattr(xt, layers), **CONFIGS[config])
    names = ["attn_layers.layers.0.1.attend", "attn_layers.layers.2.1.attend"]
    assert find_attention_modules(model) == dict.fromkeys(names, "x_transformers")
    tokens, mask = _tokens_and_mask(padded)
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(tokens, mask=mask))
    assert [c.module for c in calls] == names
    own = _own_attention(model, tokens, mask=mask)
    _assert_equal_to_own(calls, own, mask[:, None, :], ON_THE_KERNEL.get(config, [True, True]))
    assert_clean(model)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layers", ["Decoder", "Encoder"])
@pytest.mark.parametrize("config", ["default", "rotary", "alibi", "gqa_qk_norm", "mem_and_zero_kv"])
def test_flash_path_equals_the_non_flash_copys_probabilities(config, layers, padded):
    """On the flash path SDPA receives the memory and zero keys first: the padding rule reads the tokens' keys after
    them (x-transformers' layout, read at capture start)."""
    model = _model(getattr(xt, layers), flash=True, **CONFIGS[config])
    tokens, mask = _tokens_and_mask(padded)
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(tokens, mask=mask))
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if isinstance(module, xt.attend.Attend):
            module.flash = False
    _assert_equal_to_own(calls, _own_attention(eager, tokens, mask=mask), mask[:, None, :])


@pytest.mark.parametrize("layers", ["Decoder", "Encoder"])
def test_default_layers_equal_a_float64_softmax_from_the_weights(layers):
    model = _model(getattr(xt, layers))
    tokens, mask = _tokens_and_mask(True)
    blocks = [model.attn_layers.layers[i][1] for i in (0, 2)]
    inputs = []
    handles = [b.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0]), with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(tokens, mask=mask)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(tokens, mask=mask))
    allowed = mask[:, None, None, :].expand(B, 1, N, N)
    if layers == "Decoder":
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    for call, block, x in zip(calls, blocks, inputs, strict=True):
        q = (x.double() @ block.to_q.weight.double().T).unflatten(-1, (4, -1)).transpose(1, 2)
        k = (x.double() @ block.to_k.weight.double().T).unflatten(-1, (4, -1)).transpose(1, 2)
        expected_entropy, expected_max = softmax_rows(q, k, scale=q.shape[-1] ** -0.5, allowed=allowed)
        entropy, max_logit, n_keys = rows_of(call)
        real = mask[:, None, :]
        assert_rows_close(entropy, expected_entropy, real)
        assert_rows_close(max_logit, expected_max, real)
        expected_keys = allowed.sum(-1).expand(B, 4, N)
        assert torch.equal(n_keys[real.expand(B, 4, N)], expected_keys[real.expand(B, 4, N)])


@pytest.mark.parametrize("flash", [False, True])
def test_cross_attention_with_a_padded_context_of_the_same_length(flash):
    model = _model(xt.Decoder, flash=flash, cross_attend=True)
    tokens, mask = _tokens_and_mask(True)
    context = torch.randn(B, N, 64, generator=torch.Generator().manual_seed(2))
    context_mask = torch.ones(B, N, dtype=torch.bool)
    context_mask[0, 9:] = False  # padding of the context: keys only, no query row of the decoder is padding here
    kwargs = {"mask": mask, "context": context, "context_mask": context_mask}
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(tokens, **kwargs))
    names = [f"attn_layers.layers.{i}.1.attend" for i in (0, 1, 3, 4)]
    assert [c.module for c in calls] == names
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if isinstance(module, xt.attend.Attend):
            module.flash = False
    own = _own_attention(eager, tokens, **kwargs)
    # on both paths the cross-attention layers ('c', read at capture start) are known as such, also on SDPA's flash
    # call, which has as many keys as queries here: the context's padded keys do not make decoder rows padding
    _assert_equal_to_own(calls, own, mask[:, None, :])


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [
        ({"attn_softclamp_logits": True}, "logit soft-clamping"),
        ({"attn_pre_talking_heads": True}, "talking heads"),
        ({"attn_sparse_topk": 4}, "other than softmax"),
        ({"attn_sigmoid": True}, "other than softmax"),
        ({"attn_head_learned_sink": True}, "learned attention sinks"),
    ],
)
def test_softmax_variants_warn_once_and_report_nothing(kwargs, feature):
    model = _model(xt.Decoder, **kwargs)
    kinds = find_attention_modules(model)
    assert len(kinds) == 2 and all(feature in kind for kind in kinds.values())
    tokens, _ = _tokens_and_mask(False)
    calls = []
    blocked = capture_attention(model, calls.append, strict=True)
    with pytest.warns(UserWarning, match=feature) as record, blocked, torch.no_grad():
        model(tokens)
        model(tokens)
    assert calls == []
    (ours,) = [str(w.message) for w in record if "geomon" in str(w.message)]  # once per kind per block
    assert "'attn_layers.layers.0.1.attend', 'attn_layers.layers.2.1.attend'" in ours  # naming each module


def test_training_is_bit_identical_with_capture_on():
    def train(capture):
        torch.manual_seed(0)
        layers = xt.Decoder(dim=64, depth=2, heads=4, alibi_pos_bias=True, attn_dropout=0.1, ff_dropout=0.1)
        model = xt.TransformerWrapper(num_tokens=256, max_seq_len=64, attn_layers=layers).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tokens, mask = _tokens_and_mask(True)
        torch.manual_seed(5)
        calls = []
        for _ in range(2):
            if capture:
                with capture_attention(model, lambda call: calls.append(rows_of(call)), strict=True):
                    loss = model(tokens, mask=mask).logsumexp(-1).mean()
            else:
                loss = model(tokens, mask=mask).logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return loss.detach(), [p.detach().clone() for p in model.parameters()], torch.rand(3), calls

    plain, captured = train(False), train(True)
    assert torch.equal(plain[0], captured[0]) and torch.equal(plain[2], captured[2])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], captured[1], strict=True))
    assert len(captured[3]) == 4


@pytest.mark.parametrize(("config", "on_the_kernel"), [("mem_and_zero_kv", True), ("zero_kv_rel_pos", False)])
def test_an_encoder_called_without_a_mask_is_measured_on_both_paths(config, on_the_kernel):
    """Zero or memory keys with no mask: with no bias either the call has no term at all (its layer used to log
    nothing: the torch path asserted on it and the kernel refused it) and the kernel takes it as it is; a bias that
    does not cover the zero key leaves it to the torch path."""
    model = _model(xt.Encoder, **CONFIGS[config])
    tokens, _ = _tokens_and_mask(False)
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(tokens))
    _assert_equal_to_own(
        calls, _own_attention(model, tokens), torch.ones(B, 1, N, dtype=torch.bool), [on_the_kernel] * 2
    )
