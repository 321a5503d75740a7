"""Each metric class: many updates then compute equal the functional value on the concatenated data."""

import math

import pytest
import torch

from geomon.functional import GeomonWarning, alpha_req, attention_entropy, neural_collapse, rankme, spectral_norm
from geomon.functional.neural_collapse import _neural_collapse_update, means_from_stats
from geomon.functional.spectral_norm import COLD_START_STEPS
from geomon.metrics import AlphaReQ, AttentionEntropy, NeuralCollapse, RankMe, SpectralNorm


@pytest.mark.parametrize("centered", [False, True])
def test_rankme_streams(centered, gen):
    z = torch.randn(250, 24, generator=gen) * torch.rand(24, generator=gen)
    metric = RankMe(num_features=24, centered=centered)
    for part in z.split(33):
        metric.update(part)
    assert float(metric.compute()) == pytest.approx(float(rankme(z, centered=centered)), rel=1e-9)
    metric.reset()
    metric.update(z[:100])
    assert float(metric.compute()) == pytest.approx(float(rankme(z[:100], centered=centered)), rel=1e-9)


def test_alpha_req_streams(gen):
    z = torch.randn(900, 128, generator=gen) * torch.arange(1, 129) ** -0.6
    metric = AlphaReQ(num_features=128, return_r2=True)
    for part in z.split(128):
        metric.update(part)
    alpha, r2 = metric.compute()
    ref_alpha, ref_r2 = alpha_req(z, return_r2=True)
    assert float(alpha) == pytest.approx(float(ref_alpha), rel=1e-9)
    assert float(r2) == pytest.approx(float(ref_r2), rel=1e-9)


def test_attention_entropy_streams(gen):
    q = torch.randn(6, 4, 10, 8, generator=gen) * 3
    k = torch.randn(6, 2, 10, 8, generator=gen)
    metric = AttentionEntropy(num_heads=4)
    for qs, ks in zip(q.split(2), k.split(2), strict=True):
        metric.update(qs, ks, is_causal=True)
    values = metric.compute()
    entropy, max_logit, n_keys = attention_entropy(q, k, is_causal=True, return_n_keys=True)
    assert float(values["entropy"]) == pytest.approx(float(entropy.mean()), rel=1e-6)
    normalized = entropy[..., 1:] / n_keys[..., 1:].float().log()
    assert float(values["entropy_normalized"]) == pytest.approx(float(normalized.mean()), rel=1e-6)
    torch.testing.assert_close(values["entropy_per_head"].float(), entropy.mean(dim=(0, 2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(values["max_logit_per_head"].float(), max_logit.amax(dim=(0, 2)))
    assert float(values["max_logit"]) == pytest.approx(float(max_logit.max()), rel=1e-7)


def test_attention_entropy_rejects_a_different_head_count():
    with pytest.raises(ValueError, match="q must have 4 heads"):
        AttentionEntropy(num_heads=4).update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))


def _clustered(gen, n, c, d):
    centres = torch.randn(c, d, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, c, (n,), generator=gen)
    return centres[labels] + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64), labels


def test_neural_collapse_streams_and_uses_the_previous_window_for_nc4(gen):
    c, d = 6, 8
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64)
    window1, window2 = _clustered(gen, 200, c, d), _clustered(gen, 180, c, d)
    metric = NeuralCollapse(num_classes=c, num_features=d)
    for f, y in zip(window1[0].split(50), window1[1].split(50), strict=True):
        metric.update(f, y, weight)
    first = metric.compute()
    expected = neural_collapse(*window1, weight)
    for key in expected:
        if key == "nc4":
            assert math.isnan(first[key])  # no previous window yet
        else:
            assert float(first[key]) == pytest.approx(float(expected[key]), rel=1e-9), key
    metric.reset()
    for f, y in zip(window2[0].split(45), window2[1].split(45), strict=True):
        metric.update(f, y, weight)
    second = metric.compute()
    previous_means = means_from_stats(_neural_collapse_update(*window1, num_classes=c))
    expected = neural_collapse(*window2, weight, class_means=previous_means)
    for key in expected:
        assert float(second[key]) == pytest.approx(float(expected[key]), rel=1e-9), key


def test_neural_collapse_checkpoint_keeps_the_reference_window(gen):
    c, d = 4, 5
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64)
    metric = NeuralCollapse(num_classes=c, num_features=d)
    metric.update(*_clustered(gen, 80, c, d), weight)
    metric.compute()
    metric.reset()
    restored = NeuralCollapse(num_classes=c, num_features=d)
    restored.load_state_dict(metric.state_dict())
    batch = _clustered(gen, 60, c, d)
    metric.update(*batch, weight)
    restored.update(*batch, weight)
    assert float(restored.compute()["nc4"]) == float(metric.compute()["nc4"])


def test_spectral_norm_keeps_its_vector_across_reset_and_checkpoint(gen):
    w = torch.randn(20, 12, generator=gen)
    metric = SpectralNorm()
    for _ in range(3):
        metric.update(w)
    expected, _ = spectral_norm(w, n_iter=COLD_START_STEPS + 2)
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-6)
    u = metric.u.clone()
    metric.reset()
    torch.testing.assert_close(metric.u, u)
    restored = SpectralNorm()
    restored.load_state_dict(metric.state_dict())
    torch.testing.assert_close(restored.u, u)
    restored.update(w)
    metric.update(w)
    assert float(restored.compute()) == float(metric.compute())


def test_spectral_norm_compute_returns_the_value_measured_at_update():
    weight = torch.nn.Parameter(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
    metric = SpectralNorm()
    metric.update(weight)
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer changing the weight in place between update and compute
    assert float(metric.compute()) == pytest.approx(3.0, rel=1e-6)  # not 6: no reference to the weight is kept
    metric.update(weight)
    assert float(metric.compute()) == pytest.approx(6.0, rel=1e-6)


def test_power_iteration_vector_and_sigma_errors_decay_at_twice_and_four_times_the_gap_exponent():
    # W = diag(1, r), u0 = (1, 1)/√2: after k steps u ∝ (1, r^(2k)), so σ̂ = |Wᵀu| = √((1 + r²·r^(4k)) / (1 + r^(4k)))
    # and 1 - σ̂ ≈ (1 - r²)/2 · r^(4k)
    r = 0.8
    w = torch.diag(torch.tensor([1.0, r], dtype=torch.float64))
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2.0)
    for k in (5, 10, 20):
        sigma, u = spectral_norm(w, u=u0, n_iter=k)
        assert abs(float(u[1] / u[0])) == pytest.approx(r ** (2 * k), rel=1e-9)
        expected = math.sqrt((1 + r**2 * r ** (4 * k)) / (1 + r ** (4 * k)))
        assert float(sigma) == pytest.approx(expected, rel=1e-12)
        assert 1 - float(sigma) == pytest.approx((1 - r**2) / 2 * r ** (4 * k), rel=0.02)


def test_a_cold_start_on_a_random_768_weight_is_not_yet_converged():
    # the gap σ₂/σ₁ of a Gaussian matrix is near 1: 100 steps leave σ̂ between 1e-5 and 2e-3 below σ (three seeds)
    for seed in range(3):
        w = torch.randn(768, 768, generator=torch.Generator().manual_seed(seed)) * 0.02
        sigma, _ = spectral_norm(w)
        exact = float(torch.linalg.matrix_norm(w.double(), 2))
        assert 1e-5 < (exact - float(sigma)) / exact < 2e-3


@pytest.mark.filterwarnings("ignore:The ..compute.. method of metric SpectralNorm")
def test_spectral_norm_compute_before_update_is_an_error():
    with pytest.raises(RuntimeError, match="before any update"):
        SpectralNorm().compute()


@pytest.mark.parametrize(
    ("factory", "update_args", "match"),
    [
        (lambda: RankMe(num_features=8), (torch.randn(4, 7),), "must have 8 features"),
        (lambda: AlphaReQ(num_features=8, fit_range=(1, 4)), (torch.randn(4, 8, 1),), r"shape \[N, 8\]"),
        (
            lambda: NeuralCollapse(num_classes=3, num_features=4),
            (torch.randn(5, 3), torch.zeros(5, dtype=torch.int64)),
            "must have 4 features",
        ),
    ],
)
def test_updates_with_the_wrong_width_are_rejected(factory, update_args, match):
    with pytest.raises(ValueError, match=match):
        factory().update(*update_args)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: RankMe(num_features=0), "num_features must be a positive integer"),
        (lambda: RankMe(num_features=4, eps=-1.0), "eps must be >= 0"),
        (lambda: AlphaReQ(num_features=4, fit_range=(3, 2)), "fit_range"),
        (lambda: AlphaReQ(num_features=100), "needs more than fit_range\\[1\\] = 100 eigenvalues"),
        (lambda: RankMe(num_features=4, min_samples=0), "min_samples must be a positive integer"),
        (lambda: AttentionEntropy(num_heads=0), "num_heads must be a positive integer"),
        (lambda: NeuralCollapse(num_classes=3, num_features=2.5), "num_features must be a positive integer"),
        (lambda: SpectralNorm(steps_per_update=0), "steps_per_update must be a positive integer"),
    ],
)
def test_bad_configuration_fails_at_construction(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_metrics_run_their_kernels_when_asked(gen):
    pytest.importorskip("triton")
    # The kernels run on CUDA tensors, or on CPU tensors in the interpreter, which tests/conftest.py turns on only
    # when there is no GPU: so the inputs (and the metrics' states) go where the kernels can run.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = torch.randn(2, 4, 9, 16, generator=gen).to(device), torch.randn(2, 2, 9, 16, generator=gen).to(device)
    fused = AttentionEntropy(num_heads=4, backend="triton").to(device)
    reference = AttentionEntropy(num_heads=4, backend="torch").to(device)
    index = torch.tensor([1, 4, 8], device=device)
    for metric in (fused, reference):
        metric.update(q, k, is_causal=True, query_index=index)
    for key, value in reference.compute().items():
        torch.testing.assert_close(fused.compute()[key], value, atol=1e-5, rtol=1e-6)
    features, labels = _clustered(gen, 90, 5, 16)
    features, labels = features.to(device), labels.to(device)
    weight = torch.randn(5, 16, generator=gen).to(device)
    nc_fused = NeuralCollapse(num_classes=5, num_features=16, backend="triton").to(device)
    nc_reference = NeuralCollapse(num_classes=5, num_features=16, backend="torch").to(device)
    for metric in (nc_fused, nc_reference):
        metric.update(features.float(), labels, weight)
    for key, value in nc_reference.compute().items():
        assert float(nc_fused.compute()[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9, nan_ok=True), key


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        AttentionEntropy(num_heads=2, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        NeuralCollapse(num_classes=2, num_features=2, backend="fast")


def test_a_checkpoint_carries_the_window_so_a_resumed_metric_continues_it(gen):
    z = torch.randn(300, 16, generator=gen)
    metric = RankMe(num_features=16)
    metric.update(z[:120])
    state = metric.state_dict()
    assert {"n", "total", "gram"} <= set(state)
    resumed = RankMe(num_features=16)
    resumed.load_state_dict(state)
    resumed.update(z[120:])
    assert float(resumed.compute()) == pytest.approx(float(rankme(z)), rel=1e-9)


def test_attention_metric_warns_about_non_finite_inputs(gen):
    q, k = torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 4, 8, generator=gen)
    q[0, 1, 2, 3] = float("inf")
    metric = AttentionEntropy(num_heads=2)
    metric.update(q, k)
    with pytest.warns(GeomonWarning, match="NaN or Inf"):
        values = metric.compute()
    assert math.isfinite(values["entropy_per_head"][0]) and math.isnan(values["entropy_per_head"][1])


def test_forward_only_updates(gen):
    metric = RankMe(num_features=8, min_samples=1)
    z = torch.randn(40, 8, generator=gen)
    assert metric(z[:20]) is None and metric(z[20:]) is None
    assert float(metric.compute()) == pytest.approx(float(rankme(z)), rel=1e-9)


def test_rankme_metric_waits_for_four_times_the_width_by_default(gen):
    metric = RankMe(num_features=8)
    metric.update(torch.randn(31, 8, generator=gen))
    with pytest.warns(GeomonWarning, match="at least 32 rows, got 31"):
        assert math.isnan(metric.compute())
