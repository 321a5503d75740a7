import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.functional import GeomonWarning, attention_entropy
from geomon.functional.attention_entropy import (
    _attention_entropy_compute,
    _attention_entropy_update,
    _merge_attention_stats,
)
from tests.conftest import to_np
from tests.reference import ref_attention_entropy, ref_normalized_entropy


def _qk(gen, b, h, hk, nq, nk, dh, dtype=torch.float64, spread=2.0):
    q = torch.randn(b, h, nq, dh, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(b, hk, nk, dh, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype)


def _assert_matches_reference(q, k, atol=1e-10, **kwargs):
    entropy, max_logit, n_keys = attention_entropy(q, k, return_n_keys=True, **kwargs)
    ref_kwargs = {key: value for key, value in kwargs.items() if key != "chunk_size"}
    if ref_kwargs.get("attn_mask") is not None:
        ref_kwargs["attn_mask"] = ref_kwargs["attn_mask"].numpy()
    ref_entropy, ref_max, ref_n = ref_attention_entropy(to_np(q), to_np(k), **ref_kwargs)
    np.testing.assert_array_equal(n_keys.numpy(), ref_n)
    np.testing.assert_allclose(to_np(entropy), ref_entropy, atol=atol, rtol=0, equal_nan=True)
    np.testing.assert_allclose(to_np(max_logit), ref_max, atol=atol, rtol=1e-12, equal_nan=True)


SHAPES = [  # B, H, Hk, Nq, Nk, Dh
    (2, 4, 4, 9, 9, 8),
    (1, 8, 2, 5, 13, 16),  # GQA, Nq < Nk
    (3, 2, 1, 17, 6, 4),  # MQA, Nq > Nk
    (1, 1, 1, 1, 1, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_explicit_softmax(shape, chunk_size, is_causal, gen):
    b, h, hk, nq, nk, dh = shape
    q, k = _qk(gen, b, h, hk, nq, nk, dh)
    _assert_matches_reference(q, k, chunk_size=chunk_size, is_causal=is_causal)
    _assert_matches_reference(q, k, chunk_size=chunk_size, is_causal=is_causal, scale=0.37)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_boolean_padding_and_float_masks(chunk_size, gen):
    b, h, nq, nk = 2, 4, 6, 7
    q, k = _qk(gen, b, h, 2, nq, nk, 8)
    padding = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    padding[1, ..., 4:] = False
    _assert_matches_reference(q, k, attn_mask=padding, chunk_size=chunk_size)
    full = torch.rand(b, h, nq, nk, generator=gen) > 0.4
    full[0, 1, 2] = False  # a row with no allowed key
    _assert_matches_reference(q, k, attn_mask=full, chunk_size=chunk_size)
    bias = torch.randn(nq, nk, generator=gen, dtype=torch.float64)  # ALiBi-like additive bias, 2-D broadcast
    _assert_matches_reference(q, k, attn_mask=bias, chunk_size=chunk_size)
    for blocked in (-math.inf, torch.finfo(torch.float32).min):  # -inf, and the Hugging Face convention
        additive = torch.zeros(b, 1, nq, nk, dtype=torch.float32)
        additive[:, :, :, 5:] = blocked
        additive[1, :, 3, :] = blocked  # fully masked row
        _assert_matches_reference(q, k, attn_mask=additive, chunk_size=chunk_size, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 1), (2, 1, 6, 1), (2, 4, 1, 1), (1,)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_masks_broadcast_along_the_keys_count_every_key(shape, kind, chunk_size, gen):
    # a mask whose key dim has size 1 allows or blocks every key of its rows: each allowed row counts all Nk keys
    # (it used to count one per chunk: n = 1, its entropy clamped to log 1 = 0), as SDPA and the float64 oracle read it
    b, h, nq, nk = 2, 4, 6, 7
    q, k = _qk(gen, b, h, 2, nq, nk, 8)
    blocked = torch.rand(shape, generator=gen) < 0.3
    blocked.view(-1)[0] = False  # at least one row allowed
    if kind == "bool":
        mask = ~blocked
    else:
        mask = torch.randn(shape, generator=gen, dtype=torch.float64).masked_fill(blocked, -math.inf)
    _assert_matches_reference(q, k, attn_mask=mask, chunk_size=chunk_size)


def _sdpa_probabilities(q, k, **kwargs):
    """Attention probabilities as torch's SDPA computes them: values = the identity over keys."""
    b, hk, nk = k.shape[0], k.shape[1], k.shape[2]
    v = torch.eye(nk, dtype=q.dtype).expand(b, hk, nk, nk)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != hk, **kwargs)


@pytest.mark.parametrize(("nq", "nk"), [(7, 7), (4, 9), (9, 4)])
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float"])
def test_mask_semantics_agree_with_torch_sdpa(nq, nk, mask_kind, gen):
    q, k = _qk(gen, 2, 4, 2, nq, nk, 8)
    kwargs = {"is_causal": True} if mask_kind == "causal" else {}
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, nq, nk, generator=gen) > 0.3
        kwargs["attn_mask"][..., 0] = True  # SDPA returns NaN rows for fully masked rows; keep rows alive
    if mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(nq, nk, generator=gen, dtype=torch.float64)
    p = _sdpa_probabilities(q, k, **kwargs)
    expected = -(torch.special.xlogy(p, p)).sum(-1)
    entropy, _ = attention_entropy(q, k, **kwargs)
    torch.testing.assert_close(entropy, expected, atol=1e-10, rtol=0)


def test_uniform_and_one_hot_rows(gen):
    k = torch.randn(2, 3, 50, 16, generator=gen)
    entropy, _ = attention_entropy(torch.zeros(2, 3, 5, 16), k)
    torch.testing.assert_close(entropy, torch.full((2, 3, 5), math.log(50)))
    keys = torch.eye(16).reshape(1, 1, 16, 16) * 100  # orthogonal keys, huge logits for the matching one
    entropy, max_logit = attention_entropy(torch.eye(16).reshape(1, 1, 16, 16), keys, scale=1.0)
    assert float(entropy.abs().max()) < 1e-30
    torch.testing.assert_close(max_logit, torch.full((1, 1, 16), 100.0))


def test_causal_normalisation_counts_allowed_keys(gen):
    q, k = _qk(gen, 1, 2, 2, 6, 6, 4, dtype=torch.float32)
    entropy, _, n_keys = attention_entropy(q, k, is_causal=True, return_n_keys=True)
    assert n_keys[0, 0].tolist() == [1, 2, 3, 4, 5, 6]
    stats = _attention_entropy_update(q, k, is_causal=True)
    normalized = ref_normalized_entropy(to_np(entropy), n_keys.numpy())
    expected = np.nanmean(normalized)
    values = _attention_entropy_compute(stats)
    assert float(values["entropy_normalized"]) == pytest.approx(expected, rel=1e-6)
    assert float(values["entropy"]) == pytest.approx(float(entropy.mean()), rel=1e-6)
    assert stats.normalized_count.tolist() == [5.0, 5.0]  # the single-key first row has no normalised entropy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32_accuracy(dtype, gen):
    q, k = _qk(gen, 2, 4, 4, 33, 40, 32, dtype=dtype)
    entropy, max_logit = attention_entropy(q, k, is_causal=True)
    assert entropy.dtype == torch.float32
    ref_entropy, ref_max, _ = ref_attention_entropy(to_np(q), to_np(k), is_causal=True)
    np.testing.assert_allclose(to_np(entropy), ref_entropy, atol=2e-5)
    np.testing.assert_allclose(to_np(max_logit), ref_max, atol=2e-5, rtol=1e-6)


def test_non_contiguous_views(gen):
    qkv = torch.randn(2, 11, 3, 4, 8, generator=gen, dtype=torch.float64)  # [B, N, 3, H, Dh] as models produce
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous()
    _assert_matches_reference(q, k, is_causal=True, chunk_size=5)


def test_no_allowed_key_gives_nan_and_is_excluded_from_means(gen):
    q, k = _qk(gen, 1, 2, 2, 3, 4, 8, dtype=torch.float32)
    mask = torch.ones(1, 2, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False
    entropy, max_logit = attention_entropy(q, k, attn_mask=mask)
    assert math.isnan(entropy[0, 0, 1]) and math.isnan(max_logit[0, 0, 1])
    assert int(entropy.isnan().sum()) == 1
    values = _attention_entropy_compute(_attention_entropy_update(q, k, attn_mask=mask))
    assert float(values["entropy"]) == pytest.approx(float(entropy.nan_to_num(0).sum() / 5), rel=1e-6)
    assert math.isfinite(values["max_logit"])


def test_non_finite_inputs_propagate_instead_of_vanishing(gen):
    q, k = _qk(gen, 1, 1, 1, 3, 4, 8, dtype=torch.float32)
    k[0, 0, 2, 0] = float("nan")
    entropy, _ = attention_entropy(q, k)
    assert bool(entropy.isnan().all())
    with pytest.warns(GeomonWarning, match="NaN or Inf"):
        values = _attention_entropy_compute(_attention_entropy_update(q, k))
    assert math.isnan(values["entropy"])


def test_streaming_equals_one_shot(gen):
    q, k = _qk(gen, 4, 2, 2, 5, 5, 8)
    whole = _attention_entropy_compute(_attention_entropy_update(q, k, is_causal=True))
    parts = [_attention_entropy_update(q[i : i + 1], k[i : i + 1], is_causal=True) for i in range(4)]
    merged = parts[0]
    for part in parts[1:]:
        merged = _merge_attention_stats(merged, part)
    streamed = _attention_entropy_compute(merged)
    for key, value in whole.items():
        torch.testing.assert_close(streamed[key], value, rtol=1e-12, atol=0)


def test_memory_stays_below_the_attention_matrix():
    b, h, n, dh = 1, 2, 256, 8
    q, k = torch.randn(b, h, n, dh), torch.randn(b, h, n, dh)
    full_bytes = b * h * n * n * 4
    with torch.profiler.profile(profile_memory=True) as prof:
        attention_entropy(q, k, chunk_size=16, is_causal=True)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= full_bytes // 8, f"an op allocated {largest} bytes; the full matrix is {full_bytes}"


@given(
    seed=st.integers(0, 2**31 - 1),
    nq=st.integers(1, 12),
    nk=st.integers(1, 12),
    spread=st.floats(0.0, 30.0),
    causal=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_entropy_lies_between_zero_and_log_n(seed, nq, nk, spread, causal):
    g = torch.Generator().manual_seed(seed)
    q, k = _qk(g, 1, 2, 1, nq, nk, 4, dtype=torch.float32, spread=spread)
    entropy, _, n_keys = attention_entropy(q, k, is_causal=causal, return_n_keys=True)
    valid = n_keys > 0
    assert bool((entropy[valid] >= 0).all())
    assert bool((entropy[valid] <= torch.log(n_keys[valid].float()) + 1e-6).all())
    assert bool(entropy[~valid].isnan().all())


@pytest.mark.parametrize(
    ("q", "k", "kwargs", "error", "match"),
    [
        (torch.ones(2, 4, 3), torch.ones(2, 4, 3), {}, ValueError, r"q must have shape \[B, H, Nq, Dh\]"),
        (torch.ones(1, 4, 3, 8), torch.ones(1, 3, 3, 8), {}, ValueError, "must divide the query heads"),
        (torch.ones(1, 4, 3, 8), torch.ones(2, 4, 3, 8), {}, ValueError, "must agree on B and Dh"),
        (torch.ones(1, 4, 3, 8), torch.ones(1, 4, 3, 4), {}, ValueError, "must agree on B and Dh"),
        (torch.ones(1, 4, 3, 8, dtype=torch.int32), torch.ones(1, 4, 3, 8), {}, TypeError, "q must be a real float"),
        (torch.ones(1, 4, 3, 8), torch.ones(1, 4, 3, 8, dtype=torch.complex64), {}, TypeError, "k must be a real"),
        (
            torch.ones(1, 1, 3, 8),
            torch.ones(1, 1, 3, 8),
            {"scale": float("nan")},
            ValueError,
            "scale must be a finite number",
        ),
        (
            torch.ones(1, 1, 3, 8),
            torch.ones(1, 1, 3, 8),
            {"is_causal": True, "attn_mask": torch.ones(3, 3, dtype=torch.bool)},
            ValueError,
            "cannot be combined",
        ),
        (
            torch.ones(1, 2, 3, 8),
            torch.ones(1, 2, 5, 8),
            {"attn_mask": torch.ones(3, 4, dtype=torch.bool)},
            ValueError,
            r"does not broadcast to \[B, H, Nq, Nk\]",
        ),
        (
            torch.ones(1, 2, 3, 8),
            torch.ones(1, 2, 5, 8),
            {"attn_mask": torch.ones(3, 5, dtype=torch.int64)},
            TypeError,
            "attn_mask must be boolean",
        ),
        (torch.ones(1, 1, 3, 8), torch.ones(1, 1, 3, 8), {"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(q, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention_entropy(q, k, **kwargs)


def test_a_plus_inf_mask_entry_reads_nan_entropy_and_inf_max_logit(gen):
    # q and k finite, +inf only in the additive mask: that row's entropy is NaN and its max logit +inf (the max of its
    # scores); the other rows are untouched. Regression: the warning blamed the queries or keys
    q, k = _qk(gen, 1, 1, 1, 4, 6, 8, dtype=torch.float64)
    mask = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask[2, 1] = math.inf
    entropy, max_logit = attention_entropy(q, k, attn_mask=mask)
    assert math.isnan(float(entropy[0, 0, 2])) and float(max_logit[0, 0, 2]) == math.inf
    finite = mask.clone()
    finite[2, 1] = 0.0
    ref_entropy, ref_max, _ = ref_attention_entropy(to_np(q), to_np(k), attn_mask=to_np(finite))
    rows = [0, 1, 3]
    np.testing.assert_allclose(to_np(entropy)[0, 0, rows], ref_entropy[0, 0, rows], rtol=1e-12)
    np.testing.assert_allclose(to_np(max_logit)[0, 0, rows], ref_max[0, 0, rows], rtol=1e-12)
    with pytest.warns(GeomonWarning, match=r"NaN or infinite score .*\+inf in an additive mask"):
        values = _attention_entropy_compute(_attention_entropy_update(q, k, attn_mask=mask))
    assert math.isnan(float(values["entropy"])) and float(values["max_logit"]) == math.inf


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": "8"}, "chunk_size must be a positive integer or None, got str"),
        ({"chunk_size": [8]}, "chunk_size must be a positive integer or None, got list"),
        ({"is_causal": "False"}, "is_causal must be True or False, got str"),  # a truthy str used to mean causal
        ({"return_n_keys": None}, "return_n_keys must be True or False, got NoneType"),
    ],
)
def test_arguments_of_the_wrong_type_are_named(kwargs, match, gen):
    q, k = _qk(gen, 1, 1, 1, 3, 3, 4)
    with pytest.raises(TypeError, match=match):
        attention_entropy(q, k, **kwargs)


def test_q_and_k_of_different_dtypes_are_promoted_to_the_wider(gen):
    # SDPA refuses q and k of different dtypes; geomon computes in float64 when either is float64, as documented
    q, k = _qk(gen, 1, 2, 2, 5, 7, 8, dtype=torch.float32)
    k64 = k.double() + 1e-9  # not representable in float32: the float64 keys are used as they are
    entropy, max_logit = attention_entropy(q, k64, is_causal=True)
    assert entropy.dtype == max_logit.dtype == torch.float64
    ref_entropy, ref_max, _ = ref_attention_entropy(to_np(q), to_np(k64), is_causal=True)
    np.testing.assert_allclose(to_np(entropy), ref_entropy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_np(max_logit), ref_max, rtol=1e-12)
