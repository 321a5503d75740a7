import math
import warnings

import numpy as np
import pytest
import torch

from geomon.functional import GeomonWarning, alpha_req
from geomon.functional._common import sum_stats
from geomon.functional.alpha_req import _alpha_req_compute, _alpha_req_update
from tests.conftest import to_np
from tests.reference import ref_alpha_req


def _with_covariance_spectrum(eigenvalues: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n x D data whose sample covariance has exactly the given eigenvalues (and any mean)."""
    d = eigenvalues.shape[0]
    a = rng.standard_normal((n, d))
    a -= a.mean(axis=0)
    u, _ = np.linalg.qr(a)  # orthonormal, column means zero
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    z = u * np.sqrt(eigenvalues * (n - 1)) @ v.T + rng.standard_normal(d) * 3
    return torch.from_numpy(z)


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_exact_power_law_returns_its_exponent(a, rng):
    z = _with_covariance_spectrum(np.arange(1, 151, dtype=np.float64) ** -a, 400, rng)
    alpha, r2 = alpha_req(z, return_r2=True)
    assert float(alpha) == pytest.approx(a, abs=1e-6)
    assert float(r2) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("fit_range", [(11, 100), (1, 20), (5, 149)])
def test_matches_float64_reference(fit_range, gen):
    z = torch.randn(600, 150, generator=gen, dtype=torch.float64) * torch.arange(1, 151, dtype=torch.float64) ** -0.7
    alpha, r2 = alpha_req(z, fit_range=fit_range, return_r2=True)
    ref_alpha, ref_r2 = ref_alpha_req(to_np(z), fit_range)
    assert float(alpha) == pytest.approx(ref_alpha, rel=1e-8)
    assert float(r2) == pytest.approx(ref_r2, rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype, gen):
    z = (torch.randn(500, 128, generator=gen) * torch.arange(1, 129) ** -0.5).to(dtype)
    assert float(alpha_req(z)) == pytest.approx(ref_alpha_req(to_np(z))[0], rel=1e-6)


def test_streaming_equals_one_shot(gen):
    z = torch.randn(700, 120, generator=gen, dtype=torch.float64) * torch.arange(1, 121, dtype=torch.float64) ** -1.0
    stats = _alpha_req_update(z[:1])
    for part in z[1:].split(97):
        stats = sum_stats(stats, _alpha_req_update(part))
    assert float(_alpha_req_compute(stats)[0]) == pytest.approx(float(alpha_req(z)), rel=1e-9)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((50, 150), "found 49"),  # N - 1 non-zero eigenvalues
        ((400, 100), "found 100"),  # the spec asks for more than fit_range[1] = 100
        ((1, 150), "at least 2 rows"),
        ((0, 150), "at least 2 rows"),
    ],
)
def test_too_few_eigenvalues_warn_and_return_nan(shape, match, gen):
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    with pytest.warns(GeomonWarning, match=match):
        alpha, r2 = alpha_req(z, return_r2=True)
    assert math.isnan(alpha) and math.isnan(r2)


def test_rank_deficient_embeddings_do_not_fit_rounding_noise(gen):
    z = torch.randn(1000, 20, generator=gen, dtype=torch.float64) @ torch.randn(
        20, 200, generator=gen, dtype=torch.float64
    )
    with pytest.warns(GeomonWarning, match="found 20"):
        assert math.isnan(alpha_req(z))


def test_non_finite_embeddings_warn_and_return_nan(gen):
    z = torch.randn(300, 128, generator=gen)
    z[7, 3] = float("nan")
    with pytest.warns(GeomonWarning, match="NaN or Inf"):
        assert math.isnan(alpha_req(z))


@pytest.mark.parametrize("fit_range", [(0, 10), (10, 10), (20, 10), (1.5, 10), (1, 2, 3), "ab"])
def test_bad_fit_range_is_rejected(fit_range):
    with pytest.raises(ValueError, match="fit_range must be two integer ranks"):
        alpha_req(torch.randn(10, 4), fit_range=fit_range)


def test_bad_embeddings_are_rejected():
    with pytest.raises(TypeError, match="real floating-point"):
        alpha_req(torch.ones(10, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        alpha_req(torch.ones(10))


@pytest.mark.parametrize("scale", [1e200, 1e-170, 2.0**-1040])
def test_float64_input_of_extreme_scale_matches_the_unscaled_reference(scale, rng):
    # regression: finite values above ~1e154 overflowed the float64 Gram (NaN, "contain NaN or Inf"); α is
    # scale-invariant and the function rescales by a power of two
    z = rng.standard_normal((400, 128)) * np.arange(1, 129) ** -0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeomonWarning)
        alpha, r2 = alpha_req(torch.from_numpy(z) * scale, return_r2=True)
    expected_alpha, expected_r2 = ref_alpha_req(z)
    assert float(alpha) == pytest.approx(expected_alpha, rel=1e-9)
    assert float(r2) == pytest.approx(expected_r2, rel=1e-9)


@pytest.mark.parametrize(
    ("scale", "match"),
    [(1e200, "are finite, but their float64 Gram overflows"), (1e-170, "non-zero but their float64 Gram underflows")],
)
def test_the_streaming_metric_names_extreme_scale_as_the_cause(scale, match, rng):
    from geomon.metrics import AlphaReQ

    metric = AlphaReQ(128)
    metric.update(torch.from_numpy(rng.standard_normal((300, 128))) * scale)
    with pytest.warns(GeomonWarning, match=f"{match}.*cannot rescale"):
        assert math.isnan(float(metric.compute()))


def test_a_return_r2_that_is_not_a_bool_is_named():
    with pytest.raises(TypeError, match="return_r2 must be True or False, got str"):
        alpha_req(torch.randn(10, 4), fit_range=(1, 2), return_r2="no")
