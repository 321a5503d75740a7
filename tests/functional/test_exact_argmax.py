"""nc4's class search decides as the float64 scores do: a fast fp32 search, a proven rounding bound, a float64
re-check of the rows that are close (torch path; the kernel path is in tests/kernels/test_class_kernels.py)."""

import math

import pytest
import torch

from geomon.functional import _class_tiles
from geomon.functional._class_tiles import decided, nearest_centre, score_error_bound, tiled_argmax
from tests.functional.argmax_cases import exact_ties, near_ties, reference_argmax


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values truncated to TF32's 10 mantissa bits."""
    return (x.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("dim", [3, 64, 700])
def test_the_bound_holds_for_ieee_and_tf32_products(dim, gen):
    features = torch.randn(40, dim, generator=gen) * torch.logspace(-3, 3, 40)[:, None]
    rows = torch.randn(50, dim, generator=gen) * torch.logspace(2, -2, 50)[:, None]
    offset = torch.randn(50, generator=gen) * 100
    offset[7] = -math.inf
    exact = features.double() @ rows.double().T + offset.double()
    fp32 = features @ rows.T + offset  # IEEE fp32 on the CPU
    tf32 = (_tf32(features).double() @ _tf32(rows).double().T).float() + offset  # TF32 operands, exact sums
    for fast, operands in ((fp32, "ieee"), (tf32, "tf32")):
        error = (fast.double() - exact).abs()
        error[:, 7] = 0.0  # the excluded class: -inf in both
        bound = score_error_bound(features, rows, offset, operands)
        assert bool((error <= bound[:, None]).all()), operands
        assert bool((bound < 1e-2 * features.double().norm(dim=1) * rows.double().norm(dim=1).max() + 1e2).all())


def test_rows_that_may_overflow_or_hold_nan_are_never_decided_fast():
    features = torch.tensor([[1e20, 0.0], [1.0, 0.0], [float("nan"), 1.0]])
    rows = torch.tensor([[1e19, 0.0], [1.0, 1.0]])  # |x|·max|w| = 1e39 for row 0: partial sums may overflow fp32
    bound = score_error_bound(features, rows, torch.zeros(2), "tf32")
    assert math.isinf(bound[0]) and math.isfinite(bound[1]) and math.isinf(bound[2])
    best, second = torch.full((3,), 1e18), torch.zeros(3)  # row 1's bound: ~2e-3 x 1e19
    assert decided(best, second, bound).tolist() == [False, True, False]
    assert decided(torch.tensor([math.inf]), torch.tensor([0.0]), torch.zeros(1)).tolist() == [False]


def test_near_ties_defeat_the_fp32_search_and_the_re_check_restores_float64_decisions():
    features, rows, offset = near_ties(200, 48, seed=1)
    expected = reference_argmax(features, rows, offset)
    fast = _class_tiles._search(features, rows, offset)[1]
    assert int((fast != expected).sum()) > 0  # the cases really are beyond fp32: else this test could not fail
    assert torch.equal(tiled_argmax(features, rows, offset), expected)


@pytest.mark.parametrize("scale", [1e20, 1e-22])
def test_huge_and_tiny_norms_decide_as_float64(scale):
    features, rows, offset = near_ties(60, 16, seed=2, scale=scale)
    expected = reference_argmax(features, rows, offset)
    assert torch.equal(tiled_argmax(features, rows, offset), expected)


def test_exact_ties_go_to_the_lowest_class_and_float64_features_search_in_float64():
    features, rows, offset = exact_ties(24, seed=3)
    assert tiled_argmax(features, rows, offset).tolist() == [3] * 5
    features, rows, offset = near_ties(50, 8, seed=4)
    expected = reference_argmax(features, rows, offset)
    assert torch.equal(tiled_argmax(features.double(), rows.double(), offset.double()), expected)


def test_reduced_matmul_precision_is_accounted_for():
    features, rows, offset = near_ties(80, 32, seed=5)
    expected = reference_argmax(features, rows, offset)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert _class_tiles._torch_operands(features.device) == "bf16"
        assert torch.equal(tiled_argmax(features, rows, offset), expected)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_nearest_centre_decides_as_float64_distances(gen):
    centres = torch.randn(30, 20, generator=gen)
    # each sample midway between two centres, nudged by a few fp32 ulps towards a random one of them
    a, b = torch.randint(0, 30, (100,), generator=gen), torch.randint(0, 30, (100,), generator=gen)
    t = 0.5 + (torch.rand(100, generator=gen) - 0.5) * 1e-6
    features = (centres[a] * t[:, None] + centres[b] * (1 - t[:, None])).float()
    distances = torch.cdist(features.double(), centres.double())
    expected = distances.argmin(dim=1)
    assert torch.equal(nearest_centre(features, centres), expected)


@pytest.mark.parametrize(("backend", "setting"), [("cuda", "tf32"), ("mkldnn", "bf16"), ("mkldnn", "tf32")])
def test_the_per_backend_precision_api_is_read_not_a_crash(backend, setting):
    # torch's newer per-backend fp32_precision settings make the legacy getter raise; the search must still decide
    # exactly, reading the setting that applies (the coarsest rounding when in doubt)
    matmul = getattr(torch.backends, backend).matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision setting")
    features, rows, offset = near_ties(80, 32, seed=6)
    expected = reference_argmax(features, rows, offset)
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        operands = _class_tiles._torch_operands(features.device)
        if backend == "mkldnn":  # the CPU's own setting
            assert operands == setting
        assert torch.equal(tiled_argmax(features, rows, offset, backend="torch"), expected)
    finally:
        matmul.fp32_precision = previous
