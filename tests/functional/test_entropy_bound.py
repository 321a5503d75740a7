import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.functional import attention_entropy, entropy_lower_bound
from tests.reference import ref_entropy_lower_bound


@pytest.mark.parametrize(
    ("sigma", "n_keys", "expected"),
    [(0.0, 16, 2.7726), (5.0, 16, 0.4903), (10.0, 1024, 0.4872)],
)
def test_check_values(sigma, n_keys, expected):
    assert float(entropy_lower_bound(sigma, n_keys)) == pytest.approx(expected, abs=5e-5)


def test_zero_sigma_is_log_t_and_one_key_is_zero():
    assert float(entropy_lower_bound(0.0, 37)) == pytest.approx(math.log(37), rel=1e-12)
    assert float(entropy_lower_bound(3.0, 1)) == 0.0


def test_matches_reference_elementwise_on_a_tensor(gen):
    sigma = torch.rand(50, generator=gen, dtype=torch.float64) * 40
    for n_keys in (2, 3, 100, 4096):
        bound = entropy_lower_bound(sigma, n_keys)
        expected = torch.tensor([ref_entropy_lower_bound(float(s), n_keys) for s in sigma], dtype=torch.float64)
        torch.testing.assert_close(bound, expected, rtol=1e-12, atol=1e-300)


def test_decreases_with_sigma_and_never_goes_negative():
    sigma = torch.linspace(0, 500, 2001, dtype=torch.float64)
    bound = entropy_lower_bound(sigma, 512)
    assert bool((bound.diff() <= 1e-15).all())
    assert bool((bound >= 0).all()) and bool(bound.isfinite().all())


@given(
    seed=st.integers(0, 2**31 - 1),
    t=st.integers(2, 24),
    d=st.integers(2, 16),
    weight_scale=st.floats(0.05, 3.0),
)
@settings(max_examples=60, deadline=None)
def test_measured_entropy_is_never_below_the_bound(seed, t, d, weight_scale):
    # Theorem 3.1: with logits a_ij = x_iᵀ W_Q W_Kᵀ x_j · scale, every row's entropy is at least the bound for
    # 𝛔 = |W_Q W_Kᵀ|₂ · |X Xᵀ|₂ · scale.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    w_q = torch.randn(d, 4, generator=g, dtype=torch.float64) * weight_scale
    w_k = torch.randn(d, 4, generator=g, dtype=torch.float64) * weight_scale
    scale = 0.5
    q, k = (x @ w_q)[None, None], (x @ w_k)[None, None]
    entropy, _ = attention_entropy(q, k, scale=scale)
    sigma = torch.linalg.matrix_norm(w_q @ w_k.T, 2) * torch.linalg.matrix_norm(x @ x.T, 2) * scale
    assert float(entropy.min()) >= float(entropy_lower_bound(sigma, t)) - 1e-9


@pytest.mark.parametrize(
    ("sigma", "n_keys", "match"),
    [
        (-1.0, 8, "sigma must be real and >= 0"),
        (float("nan"), 8, "sigma must be real"),
        (1.0, 0, "n_keys"),
        (1.0, 2.5, "n_keys"),
    ],
)
def test_bad_input_is_rejected(sigma, n_keys, match):
    with pytest.raises(ValueError, match=match):
        entropy_lower_bound(sigma, n_keys)


def test_complex_sigma_is_rejected():
    with pytest.raises(ValueError, match="complex"):
        entropy_lower_bound(torch.tensor([1.0 + 2.0j]), 8)


@pytest.mark.parametrize("sigma", ["a", None, object()])
def test_a_sigma_of_the_wrong_type_is_named(sigma):
    # regression: entropy_lower_bound("a", 16) raised "new(): invalid data type 'str'", naming neither sigma nor
    # what is allowed
    with pytest.raises(TypeError, match=r"sigma must be a real number >= 0 or a real tensor .*got"):
        entropy_lower_bound(sigma, 16)


@pytest.mark.parametrize(("n_keys", "half_at"), [(16, 3.5), (1024, 7.3), (4096, 8.6)])
def test_the_bound_reaches_half_of_log_t_where_the_docs_say(n_keys, half_at):
    # docs/metrics/entropy_bound.md: half of log T at sigma about 3.5 (T = 16), 7.3 (1024), 8.6 (4096)
    half = math.log(n_keys) / 2
    assert ref_entropy_lower_bound(half_at - 0.05, n_keys) > half > ref_entropy_lower_bound(half_at + 0.05, n_keys)
    assert float(entropy_lower_bound(half_at, n_keys)) == pytest.approx(ref_entropy_lower_bound(half_at, n_keys))
