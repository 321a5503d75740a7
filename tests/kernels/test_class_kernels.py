"""Class-statistics and class-argmax kernels against the torch reference path."""

import numpy as np
import pytest
import torch

from geomon.functional import neural_collapse
from geomon.functional._class_tiles import nearest_centre, tiled_argmax
from geomon.functional.neural_collapse import _neural_collapse_update
from geomon.kernels import class_argmax, class_stats
from geomon.kernels.class_stats import class_stats_triton
from tests.kernels.conftest import DEVICE, INTERPRETED


def _zipf_labels(n, c, seed, invalid=0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, c + 1)
    labels = rng.choice(c, size=n, p=p / p.sum())
    labels[:invalid] = rng.choice([-1, c, c + 5], size=invalid)
    return torch.from_numpy(labels).to(DEVICE)


def test_kernels_really_run_interpreted_on_the_cpu():
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        assert INTERPRETED
        assert isinstance(class_stats._class_sums_kernel, InterpretedFunction)
        assert isinstance(class_argmax._tiled_argmax_kernel, InterpretedFunction)


@pytest.mark.parametrize(("n", "c", "d"), [(1, 1, 1), (50, 7, 33), (300, 40, 16), (129, 3, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_class_stats_match_the_torch_path(n, c, d, dtype):
    g = torch.Generator().manual_seed(n + c + d)
    features = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    labels = _zipf_labels(n, c, seed=n, invalid=min(3, n - 1))
    count, sums, sq, n_invalid = class_stats_triton(features, labels, c, block_r=16, block_d=16)
    ref = _neural_collapse_update(features, labels, num_classes=c, backend="torch")
    torch.testing.assert_close(count, ref.count, rtol=0, atol=0)
    torch.testing.assert_close(sums, ref.feature_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sq, ref.sq_norm_sum, rtol=1e-12, atol=1e-12)
    assert float(n_invalid) == float(ref.n_invalid)


def test_class_stats_are_bitwise_deterministic_and_stride_aware():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 2, 24, generator=g).to(DEVICE)
    features = base[:, 1]  # non-contiguous rows: row stride 48
    labels = _zipf_labels(200, 30, seed=1)
    strided = class_stats_triton(features, labels, 30, block_r=16, block_d=16)
    contiguous = class_stats_triton(features.contiguous(), labels, 30, block_r=16, block_d=16)
    # The promise: the same bits on every call for the same tensor (no atomics, one fixed summation order).
    for x, first in ((features, strided), (features.contiguous(), contiguous)):
        for _ in range(2):
            again = class_stats_triton(x, labels, 30, block_r=16, block_d=16)
            for a, b in zip(first, again, strict=True):
                assert torch.equal(a, b)
    # Not promised: the same bits across memory layouts. Triton specialises on strides divisible by 16, so row
    # strides 48 and 24 compile to two variants whose fp64 sums may differ in the last bits (seen on an H200).
    for a, b in zip(strided, contiguous, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Strides are honoured: the non-contiguous view gives the reference's values, not another row's.
    count, sums, sq, n_invalid = strided
    ref = _neural_collapse_update(features, labels, num_classes=30, backend="torch")
    torch.testing.assert_close(count, ref.count, rtol=0, atol=0)
    torch.testing.assert_close(sums, ref.feature_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sq, ref.sq_norm_sum, rtol=1e-12, atol=1e-12)
    assert float(n_invalid) == float(ref.n_invalid) == 0.0


@pytest.mark.parametrize(("n", "c", "d"), [(1, 1, 3), (70, 65, 20), (64, 130, 70), (150, 5, 16)])
def test_tiled_argmax_matches_the_torch_path(n, c, d):
    g = torch.Generator().manual_seed(c)
    features = torch.randn(n, d, generator=g).to(DEVICE)
    rows = torch.randn(c, d, generator=g).to(DEVICE)
    offset = torch.randn(c, generator=g).to(DEVICE)
    offset[c // 2] = float("-inf")  # an excluded class
    expected = tiled_argmax(features, rows, offset, backend="torch")
    assert torch.equal(tiled_argmax(features, rows, offset, backend="triton"), expected)
    means = rows.clone()
    means[0] = float("nan")  # an unknown class
    assert torch.equal(nearest_centre(features, means, "triton"), nearest_centre(features, means, "torch"))


def test_tiled_argmax_breaks_ties_towards_the_lowest_class():
    features = torch.ones(3, 16, device=DEVICE)
    rows = torch.zeros(100, 16, device=DEVICE)
    rows[[7, 70, 99]] = 1.0  # three equal winners, in different 64-wide class tiles
    assert tiled_argmax(features, rows, torch.zeros(100, device=DEVICE), backend="triton").tolist() == [7, 7, 7]


def test_neural_collapse_end_to_end_on_the_kernels():
    g = torch.Generator().manual_seed(3)
    c, d = 12, 24
    centres = torch.randn(c, d, generator=g) * 2
    labels = _zipf_labels(240, c, seed=3)
    features = (centres[labels.cpu()] + torch.randn(240, d, generator=g)).to(DEVICE)
    weight = torch.randn(c, d, generator=g).to(DEVICE)
    fused = neural_collapse(features, labels, weight, backend="triton")
    reference = neural_collapse(features, labels, weight, backend="torch")
    for key, value in reference.items():
        assert float(fused[key]) == pytest.approx(float(value), rel=1e-9, abs=1e-12), key
