"""NeuralCollapse.update adds the class statistics into its state tensors in place: no C x D temporary per update,
the same values as an independent float64 reference, and states that stay private to the metric."""

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from geomon.functional.neural_collapse import _neural_collapse_update
from geomon.metrics import NeuralCollapse
from tests.kernels.conftest import INTERPRETED

BACKENDS = ["torch"] + (["triton"] if INTERPRETED else [])


def _largest_allocation(fn) -> int:
    """Bytes of the largest single allocation torch's profiler sees while ``fn`` runs (on the CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(max(e.cpu_memory_usage, e.self_cpu_memory_usage) for e in prof.events())


def _reference(features, labels, c):
    """Per-class count, sum and squared-norm sum in float64 numpy, class by class."""
    h, y = features.double().numpy(), labels.numpy()
    count, sums, sq = np.zeros(c), np.zeros((c, h.shape[1])), np.zeros(c)
    for k in np.unique(y[(y >= 0) & (y < c)]):
        rows = h[y == k]
        count[k], sums[k], sq[k] = len(rows), rows.sum(axis=0), (rows**2).sum()
    return count, sums, sq


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_update_allocates_nothing_of_the_class_sums_size(backend):
    c, d, n = 20_000, 64, 512  # the C x D float64 state is 10 MB; the batch's N x D float64 copy is 0.26 MB
    metric = NeuralCollapse(c, d, backend=backend)
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    metric.update(features, labels)  # warm-up: lazy imports, first-call allocations
    largest = _largest_allocation(lambda: metric.update(features, labels))
    assert largest < c * d * 8 // 2, f"an update allocated {largest} bytes (the C x D state is {c * d * 8})"
    assert largest >= n * d * 8  # the profiler does see the update's own allocations (the float64 batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_updates_write_into_the_same_state_tensors_and_match_a_float64_reference(backend, gen):
    c, d = 40, 12
    metric = NeuralCollapse(c, d, backend=backend, ignore_index=-100)
    pointers = {name: getattr(metric, name).data_ptr() for name in ("count", "feature_sum", "sq_norm_sum", "gram")}
    batches = []
    for size in (30, 1, 57):
        features = torch.randn(size, d, generator=gen).to(torch.float32)
        labels = torch.randint(0, 8, (size,), generator=gen) ** 2 % c  # repeated, skewed classes
        labels[::7] = -100
        features[::7] = float("nan")  # a padding row may hold anything: it is left out of every sum and the Gram
        metric.update(features, labels)
        batches.append((features, labels))
    for name, pointer in pointers.items():
        assert getattr(metric, name).data_ptr() == pointer, name
    features, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
    count, sums, sq = _reference(features, labels, c)
    np.testing.assert_array_equal(metric.count.numpy(), count)
    np.testing.assert_allclose(metric.feature_sum.numpy(), sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(metric.sq_norm_sum.numpy(), sq, rtol=1e-12, atol=1e-12)
    kept = features.double().numpy()[labels.numpy() != -100]
    np.testing.assert_allclose(metric.gram.numpy(), kept.T @ kept, rtol=1e-12, atol=1e-12)
    assert float(metric.n_invalid) == 0.0


def test_a_one_shot_update_into_given_statistics_adds_to_them(gen):
    c, d = 6, 5
    features, labels = torch.randn(20, d, generator=gen), torch.randint(0, c, (20,), generator=gen)
    into = _neural_collapse_update(features[:8], labels[:8], num_classes=c)
    out = _neural_collapse_update(features[8:], labels[8:], num_classes=c, into=into)
    assert out is into
    count, sums, sq = _reference(features, labels, c)
    np.testing.assert_array_equal(into.count.numpy(), count)
    np.testing.assert_allclose(into.feature_sum.numpy(), sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(into.sq_norm_sum.numpy(), sq, rtol=1e-12, atol=1e-12)
    wrong = into._replace(feature_sum=into.feature_sum.float())
    with pytest.raises(ValueError, match=r"into\.feature_sum must be a float64 tensor"):
        _neural_collapse_update(features, labels, num_classes=c, into=wrong)


def test_a_state_reset_inside_inference_mode_still_takes_updates_outside_it(gen):
    c, d = 9, 4
    features, labels = torch.randn(30, d, generator=gen), torch.randint(0, c, (30,), generator=gen)
    metric = NeuralCollapse(c, d, backend="torch")
    with torch.inference_mode():  # e.g. a validation loop that computes and resets
        metric.update(features, labels)
        metric.reset()
    metric.update(features, labels)  # in-place adds into inference tensors would raise here
    count, sums, _ = _reference(features, labels, c)
    np.testing.assert_array_equal(metric.count.numpy(), count)
    np.testing.assert_allclose(metric.feature_sum.numpy(), sums, rtol=1e-12, atol=1e-12)


def test_loaded_states_are_copies_so_updates_do_not_write_into_the_callers_tensors(gen):
    c, d = 5, 3
    features, labels = torch.randn(10, d, generator=gen), torch.randint(0, c, (10,), generator=gen)
    source = NeuralCollapse(c, d, backend="torch")
    source.update(features, labels)
    saved = source.state_dict()
    before = saved["feature_sum"].clone()
    twins = [NeuralCollapse(c, d, backend="torch") for _ in range(2)]
    for twin in twins:
        twin.load_state_dict(dict(saved))
    twins[0].update(features, labels)
    assert torch.equal(saved["feature_sum"], before)
    assert torch.equal(twins[1].feature_sum, before)
    torch.testing.assert_close(twins[0].feature_sum, 2 * before, rtol=1e-15, atol=0)
