import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.functional import GeomonWarning, rankme
from geomon.functional._common import sum_stats
from geomon.functional.rankme import _rankme_compute, _rankme_update
from tests.conftest import to_np
from tests.reference import ref_rankme


def _orthonormal_centred(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n x d matrix with orthonormal columns, each orthogonal to the all-ones vector (column means zero)."""
    a = rng.standard_normal((n, d))
    a -= a.mean(axis=0)
    q, _ = np.linalg.qr(a)
    return q


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (257, 257), (5, 3)])
@pytest.mark.parametrize("centered", [False, True])
def test_matches_float64_reference(shape, centered, gen):
    z = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.rand(
        shape[1], generator=gen, dtype=torch.float64
    )
    expected = ref_rankme(to_np(z), centered=centered)
    assert float(rankme(z, centered=centered)) == pytest.approx(expected, rel=1e-6)


def test_identity_check_value():
    assert float(rankme(torch.eye(100))) == pytest.approx(100.00360523, abs=1e-7)


def test_rank_one_check_value(gen):
    # METRICS.md: rank-1 Z with D = 2048 (and N >= D rows) -> 1.0033: 2047 zero singular values add -eps log eps each
    direction = torch.randn(2048, generator=gen)
    z = torch.randn(4096, 1, generator=gen) * direction
    assert float(rankme(z)) == pytest.approx(1.0033, abs=5e-5)


@pytest.mark.parametrize("n", [1, 50, 2048, 4096])
def test_rank_one_counts_min_n_d_zero_singular_values(n, gen):
    # analytic: p = (1 + eps, eps x (k - 1)) with k = min(N, D) values, so with N = 50 rows only 49 zeros count
    eps, k = 1e-7, min(n, 2048)
    z = torch.randn(n, 1, generator=gen, dtype=torch.float64) * torch.randn(2048, generator=gen, dtype=torch.float64)
    entropy = -(1 + eps) * math.log1p(eps) - (k - 1) * eps * math.log(eps)
    assert float(rankme(z, eps=eps)) == pytest.approx(math.exp(entropy), rel=1e-9)


def _svdvals_rankme(z: torch.Tensor, eps: float, centered: bool) -> float:
    """Reference from METRICS.md §1 via torch.linalg.svdvals in float64: exactly min(N, D) values."""
    x = z.double()
    if centered:
        x = x - x.mean(dim=0)
    sigma = torch.linalg.svdvals(x)
    values = sigma**2 if centered else sigma  # covariance eigenvalues are sigma^2 / (N - 1); the scale cancels
    assert values.shape[0] == min(z.shape)
    p = values / values.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _spread(n: int, d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """Rows with an uneven spectrum and a non-zero mean (so centring matters); rank-deficient if ``rank``."""
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.arange(1, d + 1, dtype=torch.float64) ** -0.5
    if rank is not None:
        z = z[:, :rank] @ torch.randn(rank, d, generator=gen, dtype=torch.float64)
    return z + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)


SHAPES = [(100, 512), (30, 200), (64, 64), (512, 100), (7, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("eps", [1e-7, 1e-5])
def test_one_shot_equals_svdvals_reference(shape, centered, eps, gen):
    z = _spread(*shape, gen)
    expected = _svdvals_rankme(z, eps, centered)
    assert float(rankme(z, eps=eps, centered=centered)) == pytest.approx(expected, rel=1e-9)
    assert float(rankme(z.float(), eps=eps, centered=centered)) == pytest.approx(
        _svdvals_rankme(z.float(), eps, centered), rel=1e-6
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("eps", [1e-7, 1e-5])
def test_streamed_metric_equals_svdvals_reference(shape, centered, eps, gen):
    from geomon.metrics import RankMe

    z = _spread(*shape, gen)
    metric = RankMe(num_features=shape[1], eps=eps, centered=centered, min_samples=1)
    for chunk in z.split(max(1, shape[0] // 4 + 1)):  # several chunks, the last one shorter
        metric.update(chunk)
    assert float(metric.compute()) == pytest.approx(_svdvals_rankme(z, eps, centered), rel=1e-9)


@pytest.mark.parametrize(("shape", "rank"), [((100, 512), 20), ((512, 100), 20), ((64, 64), 63)])
@pytest.mark.parametrize("centered", [False, True])
def test_rank_deficient_rows_equal_svdvals_reference(shape, rank, centered, gen):
    z = _spread(*shape, gen, rank=rank)
    for eps in (1e-7, 1e-5):
        assert float(rankme(z, eps=eps, centered=centered)) == pytest.approx(
            _svdvals_rankme(z, eps, centered), rel=1e-8
        )


def test_wide_gaussian_is_not_inflated_by_the_grams_extra_zeros(gen):
    # randn(100, 512): the D - N = 412 zero eigenvalues of the Gram are not singular values of Z; counting them would
    # multiply RankMe by about exp(412 eps log(1/eps)) (6.6e-4 off at eps = 1e-7, 5% at eps = 1e-5)
    z = torch.randn(100, 512, generator=gen, dtype=torch.float64)
    for eps in (1e-7, 1e-5):
        value, expected = float(rankme(z, eps=eps)), _svdvals_rankme(z, eps, False)
        padded = torch.cat([torch.linalg.svdvals(z), torch.zeros(412, dtype=torch.float64)])
        p = padded / padded.sum() + eps
        all_d = float(torch.exp(-(p * p.log()).sum()))  # the wrong form, to show the test can tell the two apart
        assert value == pytest.approx(expected, rel=1e-10)
        assert all_d / expected - 1 == pytest.approx(math.expm1(412 * eps * math.log(1 / eps)), rel=0.05)
        assert value < 100 * (1 + 100 * eps)


def test_power_law_spectrum_distinguishes_the_two_variants(rng):
    # σ_k = k^-1/2, k <= 64: uncentred-σ RankMe 55.0, covariance-eigenvalue RankMe 29.1 (METRICS.md).
    sigma = np.arange(1, 65) ** -0.5
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    z = torch.from_numpy(_orthonormal_centred(200, 64, rng) * sigma @ v.T)
    assert float(rankme(z)) == pytest.approx(55.0, abs=0.05)
    assert float(rankme(z, centered=True)) == pytest.approx(29.1, abs=0.05)
    assert float(rankme(z)) == pytest.approx(ref_rankme(z.numpy()), rel=1e-9)
    assert float(rankme(z, centered=True)) == pytest.approx(ref_rankme(z.numpy(), centered=True), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_computed_at_full_precision(dtype, gen):
    z = torch.randn(400, 32, generator=gen).to(dtype)
    # the reference sees exactly the same (rounded) values, in float64
    assert float(rankme(z)) == pytest.approx(ref_rankme(to_np(z)), rel=1e-6)
    assert float(rankme(z, centered=True)) == pytest.approx(ref_rankme(to_np(z), centered=True), rel=1e-6)


def test_eps_is_not_clamped():
    # a flat spectrum reads slightly above min(N, D): the eps contribution is part of the definition
    assert float(rankme(torch.eye(10), eps=0.0)) == pytest.approx(10.0, abs=1e-9)
    assert float(rankme(torch.eye(10))) > 10.0


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 60),
    d=st.integers(1, 12),
    centered=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_invariant_to_row_order_and_batching(seed, n, d, centered):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    whole = rankme(z, centered=centered)
    shuffled = rankme(z[torch.randperm(n, generator=g)], centered=centered)
    cuts = sorted(torch.randint(0, n + 1, (3,), generator=g).tolist())
    parts = [z[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]  # may include empty batches
    stats = _rankme_update(parts[0])
    for part in parts[1:]:
        stats = sum_stats(stats, _rankme_update(part))
    streamed = _rankme_compute(stats, centered=centered)
    assert float(shuffled) == pytest.approx(float(whole), rel=1e-9)
    assert float(streamed) == pytest.approx(float(whole), rel=1e-9)
    assert 1.0 - 1e-6 <= float(whole) <= min(n, d) * 1.001 + 1e-3  # eps can move it by ~1e-7


@pytest.mark.parametrize(
    ("z", "kwargs", "match"),
    [
        (torch.zeros(0, 8), {}, "at least 1 rows, got 0"),
        (torch.randn(1, 8), {"centered": True}, "at least 2 rows, got 1"),
        (torch.randn(10, 8), {"min_samples": 32}, "at least 32 rows, got 10"),
        (torch.zeros(10, 8), {}, "all zero"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), {}, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), {"centered": True}, "NaN or Inf"),
    ],
)
def test_degenerate_inputs_warn_and_return_nan(z, kwargs, match):
    with pytest.warns(GeomonWarning, match=match):
        value = rankme(z, **kwargs)
    assert math.isnan(float(value))


@pytest.mark.parametrize(
    ("z", "error", "match"),
    [
        (torch.ones(4, 3, dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones(4, 3, dtype=torch.complex64), TypeError, "floating-point"),
        (torch.ones(4, 3, dtype=torch.bool), TypeError, "floating-point"),
        (torch.ones(12), ValueError, r"shape \[N, D\]"),
        (torch.ones(2, 3, 4), ValueError, r"shape \[N, D\]"),
        (np.ones((4, 3)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(z, error, match):
    with pytest.raises(error, match=match):
        rankme(z)


def test_negative_eps_is_rejected():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rankme(torch.eye(3), eps=-1.0)


def test_zero_width_embeddings_are_rejected():
    with pytest.raises(ValueError, match="at least one feature"):
        rankme(torch.zeros(5, 0))
    with pytest.raises(ValueError, match="min_samples must be a positive integer"):
        rankme(torch.eye(3), min_samples=0)


@pytest.mark.parametrize("scale", [1e200, 1e300, 1e-170, 1e-300, 2.0**-1040])
@pytest.mark.parametrize("centered", [False, True])
def test_float64_input_of_extreme_scale_matches_the_unscaled_reference(scale, centered, rng):
    # regression: the float64 Gram of finite values above ~1e154 overflowed (NaN, "contain NaN or Inf") and below
    # ~1e-162 underflowed (NaN, "all zero"); RankMe is scale-invariant and the function rescales by a power of two
    z = rng.standard_normal((200, 40)) * np.arange(1, 41) ** -0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeomonWarning)
        value = rankme(torch.from_numpy(z) * scale, centered=centered)
    assert float(value) == pytest.approx(ref_rankme(z, centered=centered), rel=1e-10)


@pytest.mark.parametrize(
    ("scale", "match"),
    [(1e200, "are finite, but their float64 Gram overflows"), (1e-170, "non-zero but their float64 Gram underflows")],
)
def test_the_streaming_metric_names_extreme_scale_as_the_cause(scale, match, rng):
    from geomon.metrics import RankMe

    metric = RankMe(8, min_samples=1)
    metric.update(torch.from_numpy(rng.standard_normal((50, 8))) * scale)
    with pytest.warns(GeomonWarning, match=f"{match}.*cannot rescale"):
        assert math.isnan(float(metric.compute()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": "a"}, "eps must be a number"),
        ({"eps": None}, "eps must be a number"),
        ({"centered": "yes"}, "centered"),
    ],
)
def test_arguments_of_the_wrong_type_are_named(kwargs, match):
    with pytest.raises(TypeError, match=match):
        rankme(torch.randn(5, 3), **kwargs)


@pytest.mark.parametrize("k", [1, 2, 7, 100])
def test_the_range_is_one_hot_to_flat_with_eps_shifted_ends(k):
    # RankMe over K = min(N, D) values lies between the one-hot and the flat spectrum's values, both moved by eps:
    # a single row reads exp(-(1+eps) log(1+eps)) = 1 - 1e-7, just below 1; a flat spectrum slightly above K
    eps = 1e-7
    one_hot = np.exp(-(1 + eps) * np.log1p(eps) - (k - 1) * eps * np.log(eps))
    flat = np.exp(-(1 + k * eps) * np.log(1 / k + eps))
    z = torch.zeros(k, 3 * k, dtype=torch.float64)
    z[0, 0] = 2.5  # rank 1, K = k singular values
    assert float(rankme(z)) == pytest.approx(one_hot, rel=1e-12)
    assert float(rankme(torch.eye(k, dtype=torch.float64) * 3)) == pytest.approx(flat, rel=1e-12)
    if k == 1:
        assert float(rankme(z)) < 1.0


def test_small_n_bias_table_of_the_docs():
    # docs/metrics/rankme.md: standard Gaussian embeddings, D = 256, read low for small N (reference: svdvals)
    table = {256: 205.5, 512: 237.0, 1024: 247.3, 2560: 252.7, 25600: 255.7}
    g = torch.Generator().manual_seed(0)
    for n, expected in table.items():
        z = torch.randn(n, 256, generator=g, dtype=torch.float64)
        value = float(rankme(z))
        assert value == pytest.approx(_svdvals_rankme(z, 1e-7, False), rel=1e-9)
        assert value == pytest.approx(expected, abs=0.5)  # one draw: draws differ by a few tenths at N = 256


def test_a_float32_gram_would_read_a_rank_one_z_as_about_1_4():
    # why the Gram is accumulated in float64 (docs/metrics/rankme.md): the same eigen-solve on a float32 Gram turns
    # its rounding in the null space into spurious singular values; geomon reads the float32 input at 1.0033
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4096, 1, generator=g) * torch.randn(2048, generator=g)
    gram32 = (z.T @ z).double().numpy()
    lam = np.sort(np.linalg.eigvalsh(gram32))[::-1]
    lam = np.where(lam > lam[0] * 2048 * np.finfo(np.float64).eps, lam, 0.0)
    p = np.sqrt(lam) / np.sqrt(lam).sum() + 1e-7
    assert 1.3 < float(np.exp(-(p * np.log(p)).sum())) < 1.5
    assert float(rankme(z)) == pytest.approx(1.0033, abs=5e-5)
