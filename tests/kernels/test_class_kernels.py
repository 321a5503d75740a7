"""Class-statistics and class-argmax kernels against the torch reference path."""

import numpy as np
import pytest
import torch

from geomon.functional import neural_collapse
from geomon.functional._class_tiles import decided, nearest_centre, score_error_bound, tiled_argmax
from geomon.functional.neural_collapse import _neural_collapse_update
from geomon.kernels import class_argmax, class_stats
from geomon.kernels.class_stats import class_stats_triton
from tests.functional.argmax_cases import exact_ties, near_ties, reference_argmax
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


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def test_the_kernel_search_tracks_the_best_and_second_best_scores():
    g = torch.Generator().manual_seed(5)
    features, rows = torch.randn(70, 24, generator=g), torch.randn(150, 24, generator=g)
    rows[140] = rows[20]  # a duplicated class: its second best equals its best
    features[0] = rows[20] * 3  # ... and sample 0 picks it
    offset = torch.randn(150, generator=g)
    offset[140] = offset[20]
    best, index, second = class_argmax.fast_search_triton(*_on_device(features, rows, offset))
    scores = features.double() @ rows.double().T + offset.double()
    top2 = scores.topk(2, dim=1).values
    torch.testing.assert_close(best.double().cpu(), top2[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double().cpu(), top2[:, 1], rtol=1e-5, atol=1e-5)
    assert int(index[0]) == 20 and float(best[0]) == float(second[0])


def test_near_ties_beyond_tf32_are_re_checked_to_the_float64_decision():
    # The interpreter's fp32 dot is exact-ish IEEE; the test-only knob truncates the operands to TF32 as tensor
    # cores may, so that the fast search really is wrong on these rows and the float64 re-check has to fix them.
    features, rows, offset = _on_device(*near_ties(150, 40, seed=11))
    expected = reference_argmax(features, rows, offset)
    fast = class_argmax.fast_search_triton(features, rows, offset, round_to_tf32=True)[1]
    assert int((fast.cpu() != expected).sum()) > 0  # the cases defeat the fast search: this test can fail
    assert torch.equal(class_argmax.tiled_argmax_triton(features, rows, offset, _round_to_tf32=True).cpu(), expected)
    assert torch.equal(tiled_argmax(features, rows, offset, backend="triton").cpu(), expected)


@pytest.mark.parametrize("scale", [1e20, 1e-22])
def test_huge_and_tiny_norms_are_decided_as_float64_on_the_kernels(scale):
    features, rows, offset = _on_device(*near_ties(40, 16, seed=12, scale=scale))
    expected = reference_argmax(features, rows, offset)
    assert torch.equal(tiled_argmax(features, rows, offset, backend="triton").cpu(), expected)


def test_exact_ties_and_half_precision_features_on_the_kernels():
    features, rows, offset = _on_device(*exact_ties(32, seed=13))
    assert tiled_argmax(features, rows, offset, backend="triton").tolist() == [3] * 5
    features, rows, offset = near_ties(64, 16, seed=14)
    half = features.bfloat16()
    expected = reference_argmax(half, rows, offset)  # bf16 samples against the fp32 rows, as given
    assert torch.equal(tiled_argmax(*_on_device(half, rows, offset), backend="triton").cpu(), expected)


def test_a_few_flagged_rows_scattered_among_decided_ones_get_their_own_decisions():
    # near-tie rows in feature dims 0-15, clearly decided rows in dims 16-31 (against their own 10 classes): the
    # re-check packs the few flagged rows into one tile and must write each result back to its own row
    ties, tie_rows, tie_offset = near_ties(6, 16, seed=15)
    g = torch.Generator().manual_seed(15)
    clear_rows = 20 * torch.randn(10, 16, generator=g)
    rows = torch.block_diag(tie_rows, clear_rows)
    offset = torch.cat([tie_offset, torch.zeros(10)])
    clear = torch.cat([torch.zeros(144, 16), clear_rows[torch.arange(144) % 10] + torch.randn(144, 16, generator=g)], 1)
    features = torch.cat([clear, torch.cat([ties, torch.zeros(6, 16)], 1)])[torch.randperm(150, generator=g)]
    features, rows, offset = _on_device(features, rows, offset)
    expected = reference_argmax(features, rows, offset)
    best, _, second = class_argmax.fast_search_triton(features, rows, offset, round_to_tf32=True)
    flagged = int((~decided(best, second, score_error_bound(features, rows, offset, "tf32"))).sum())
    assert 0 < flagged < 32  # a few rows, spread over the 5 tiles of 32
    assert torch.equal(class_argmax.tiled_argmax_triton(features, rows, offset, _round_to_tf32=True).cpu(), expected)


def test_half_features_with_float32_rows_keep_the_bound():
    # fp32 rows rounded to fp16 underflow (2.9e-8 -> 0, 5e-8 -> 6e-8): the search must not trust that rounding
    features = torch.ones(1, 2, dtype=torch.float16, device=DEVICE)
    rows = torch.tensor([[2.9e-8, 2.9e-8], [5e-8, 0.0]], device=DEVICE)
    offset = torch.zeros(2, device=DEVICE)
    expected = reference_argmax(features.float().cpu(), rows.cpu(), offset.cpu())
    assert expected.tolist() == [0]
    assert class_argmax.tiled_argmax_triton(features, rows, offset).cpu().tolist() == [0]


def _argmax_skipping_nan(features, rows, offset) -> torch.Tensor:
    """float64 numpy reference of the rule for non-finite scores: NaN counts as -inf, ties to the lowest class, a
    row with nothing but NaN gets class 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        scores = features.double().cpu().numpy() @ rows.double().cpu().numpy().T + offset.double().cpu().numpy()
    return torch.from_numpy(np.where(np.isnan(scores), -np.inf, scores).argmax(axis=1))


def test_rows_with_nan_or_infinite_features_are_decided_as_the_torch_path_and_do_not_crash():
    # the interpreter used to raise on an all-NaN tile (numpy's nanargmax); on a GPU the NaN pick was unspecified
    g = torch.Generator().manual_seed(11)
    n, c, d = 70, 130, 20  # three class tiles, two sample tiles
    features, rows, offset = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g), torch.zeros(c)
    features[3] = float("nan")  # every score NaN: class 0
    features[10, 4] = float("nan")
    features[20, 0] = float("inf")  # +-inf scores; NaN where the class row is 0 at that feature
    rows[5:90:7, 0] = 0.0
    features[64, 1] = float("-inf")  # in the second sample tile
    features[65, :2] = torch.tensor([float("inf"), float("-inf")])  # inf - inf: NaN wherever both products are
    expected = _argmax_skipping_nan(features, rows, offset)
    features, rows, offset = _on_device(features, rows, offset)
    torch_path = tiled_argmax(features, rows, offset, backend="torch")
    assert torch.equal(torch_path.cpu(), expected), (torch_path.cpu() != expected).nonzero()
    assert torch.equal(tiled_argmax(features, rows, offset, backend="triton").cpu(), expected)
    means = rows.clone()
    means[1] = float("nan")  # an unknown class as well
    assert torch.equal(nearest_centre(features, means, "triton"), nearest_centre(features, means, "torch"))


def test_nan_features_of_ignored_rows_leave_nc4_as_on_the_torch_path():
    g = torch.Generator().manual_seed(12)
    c, d = 6, 16
    labels = torch.arange(60) % c
    features = torch.randn(60, d, generator=g) + 3 * torch.eye(c, d)[labels]
    labels[[4, 31]] = -100
    features[[4, 31]] = float("nan")  # padding positions whose features are garbage
    weight = torch.randn(c, d, generator=g)
    means = torch.randn(c, d, generator=g)
    results = {}
    for backend in ("torch", "triton"):
        f, lab, w, m = _on_device(features, labels, weight, means)
        stats = _neural_collapse_update(f, lab, w, num_classes=c, class_means=m, backend=backend, ignore_index=-100)
        results[backend] = (float(stats.nc4_mismatch), float(stats.nc4_count))
    h, w, m = features[labels >= 0].double(), weight.double(), means.double()
    reference = float(((h @ w.T).argmax(1) != torch.cdist(h, m).argmin(1)).sum())
    assert results["torch"] == results["triton"] == (reference, 58.0)
