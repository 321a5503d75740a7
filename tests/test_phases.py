"""The phase detector of ``geomon report`` (``geomon.tools.report.phases``) on curves shaped like the figures of
"Tracing the Representation Geometry of Language Models" (Li et al.), sampled at realistic checkpoint grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.tools.report.phases import COMPRESSION_SEEKING, ENTROPY_SEEKING, WARMUP, detect_phases, resample

END = 100_000
GRIDS = {
    "dense linear": np.arange(0, END + 1, 50),
    "log-spaced": np.unique(np.concatenate([[0], np.geomspace(1, END, 60).round()])),
    "few early points": np.array([0, 10, 100, 500, *range(1000, END + 1, 1000)]),
}
SHAPES = [(200, 5000), (400, 20000), (1500, 8000), (60, 3000)]  # (warm-up minimum, peak) steps


def paper_curves(steps, low, peak, noise=0.0, seed=0):
    """Covariance RankMe as in the study's figures, in log steps: 40 at step 0, a warm-up collapse to 12 at ``low``,
    entropy-seeking up to 60 at ``peak``, then a slow compression-seeking decline to 48 at 100k steps (cosine
    ramps between these knots, so the minimum and the peak are exactly at ``low`` and ``peak``). alpha-ReQ mirrors
    it. ``noise``: relative Gaussian noise on both."""
    u = np.log10(1.0 + np.asarray(steps, dtype=np.float64))
    um, up, ue = np.log10(1.0 + np.array([low, peak, END], dtype=np.float64))

    def ramp(u0, u1, v0, v1):
        f = np.clip((u - u0) / (u1 - u0), 0.0, 1.0)
        return v0 + (v1 - v0) * (1 - np.cos(np.pi * f)) / 2

    rank = np.where(u <= um, ramp(0.0, um, 40, 12), np.where(u <= up, ramp(um, up, 12, 60), ramp(up, ue, 60, 48)))
    alpha = 2.0 - 0.02 * rank
    rng = np.random.default_rng(seed)
    rank = rank * (1 + noise * rng.standard_normal(rank.shape))
    alpha = alpha * (1 + noise * rng.standard_normal(alpha.shape))
    return rank.tolist(), alpha.tolist()


def log_error(detected: float, true: float) -> float:
    return abs(math.log10(1 + detected) - math.log10(1 + true))


def bracket(grid: np.ndarray, true: float) -> float:
    """The log-step width of the checkpoint interval holding ``true``: no detector can place an extremum between
    two checkpoints more finely than that (the data are a straight line there)."""
    x, t = np.log10(1.0 + grid), math.log10(1 + true)
    i = int(np.searchsorted(x, t))
    return float(x[min(i, len(x) - 1)] - x[max(i - 1, 0)])


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize(("low", "peak"), SHAPES)
@pytest.mark.parametrize(("noise", "slack"), [(0.0, 0.1), (0.02, 0.2)])
def test_boundaries_are_found_within_a_stated_log_step_tolerance(grid, low, peak, noise, slack):
    # Tolerance, in decades of steps: `slack` (0.1 exact, 0.2 with 2% noise; the default smoothing is 0.2 decades)
    # plus the width of the checkpoint interval that holds the true boundary.
    steps = GRIDS[grid]
    for seed in range(3 if noise else 1):
        rank, alpha = paper_curves(steps, low, peak, noise, seed)
        phases = detect_phases(steps.tolist(), rank, alpha)
        assert [p.name for p in phases] == [WARMUP, ENTROPY_SEEKING, COMPRESSION_SEEKING]
        warm, seek, compress = phases
        assert warm.start == 0 and compress.end == END
        assert warm.end == seek.start and seek.end == compress.start
        assert log_error(seek.start, low) <= slack + bracket(steps, low), (seek.start, low)
        assert log_error(seek.end, peak) <= slack + bracket(steps, peak), (seek.end, peak)


def test_the_few_early_points_grid_needs_the_log_axis():
    # Checkpoints every 1000 steps plus 10, 100, 500: the warm-up minimum at 400 and the peak at 20k are both placed
    # within 0.1 decades (a moving window of a tenth of the points, in linear steps, spans 10k steps and the first
    # four checkpoints together)
    steps = GRIDS["few early points"]
    rank, alpha = paper_curves(steps, 400, 20000)
    warm, seek, _ = detect_phases(steps.tolist(), rank, alpha)
    assert log_error(warm.end, 400) < 0.1 and log_error(seek.end, 20000) < 0.1


def test_alpha_is_optional_and_contradicting_alpha_drops_the_phase():
    steps = GRIDS["log-spaced"]
    rank, alpha = paper_curves(steps, 300, 6000)
    with_alpha = detect_phases(steps.tolist(), rank, alpha)
    without = detect_phases(steps.tolist(), rank)
    assert [p.name for p in without] == [WARMUP, ENTROPY_SEEKING, COMPRESSION_SEEKING]
    assert without == with_alpha
    rising_alpha = [1.0 + 0.5 * i / len(steps) for i in range(len(steps))]  # alpha rises throughout
    assert [p.name for p in detect_phases(steps.tolist(), rank, rising_alpha)] == [WARMUP, COMPRESSION_SEEKING]
    falling_alpha = [1.5 - 0.5 * i / len(steps) for i in range(len(steps))]  # alpha falls throughout
    assert [p.name for p in detect_phases(steps.tolist(), rank, falling_alpha)] == [WARMUP, ENTROPY_SEEKING]
    partly_logged = [a if i % 3 else math.nan for i, a in enumerate(alpha)]  # NaN: not logged at that step
    assert [p.name for p in detect_phases(steps.tolist(), rank, partly_logged)] == [p.name for p in with_alpha]


def test_nothing_is_reported_that_the_curve_does_not_show():
    steps = list(range(0, 5000, 100))
    assert detect_phases(steps, [10.0] * 50, [1.0] * 50) == []  # flat
    assert detect_phases(steps[:4], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]) == []  # too short
    assert detect_phases(steps, [math.nan] * 50, [1.0] * 50) == []
    assert detect_phases(steps, [0.0] * 50) == []
    # only a fall: a collapse cannot be told from compression without the rise between them
    assert detect_phases(steps, [60.0 - s / 100 for s in steps], [1.0] * 50) == []
    rising = detect_phases(steps, [10.0 + s / 100 for s in steps], [2.0 - s / 1e4 for s in steps])
    assert [(p.name, p.start, p.end) for p in rising] == [(ENTROPY_SEEKING, 0.0, 4900.0)]
    wiggle = [50.0 + 0.5 * math.sin(s / 300) for s in steps]  # 1% wiggles: under the 5% that counts
    assert detect_phases(steps, wiggle) == []


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="increasing"):
        detect_phases([0, 2, 1, 3, 4], [1.0] * 5)
    with pytest.raises(ValueError, match="increasing and >= 0"):
        detect_phases([-1, 0, 1, 2, 3], [1.0] * 5)
    with pytest.raises(ValueError, match="one value per step"):
        detect_phases([0, 1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="tol"):
        detect_phases([0, 1, 2, 3, 4], [1.0] * 5, tol=0.0)


@given(
    values=st.lists(st.floats(-100, 100), min_size=1, max_size=30),
    cells=st.integers(1, 20),
)
@settings(max_examples=60, deadline=None)
def test_resample_averages_each_cell_and_interpolates_between(values, cells):
    # points at the cell centres: each cell's value is exactly the mean of its points (here: one point per cell)
    edges = np.linspace(0.0, 1.0, cells + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    y = np.resize(np.asarray(values, dtype=np.float64), cells)
    np.testing.assert_allclose(resample(centres, y, edges), y, rtol=1e-12, atol=1e-12)
    # the same values at 2 points per cell placed symmetrically: same means
    offset = (edges[1] - edges[0]) / 4
    x2 = np.sort(np.concatenate([centres - offset, centres + offset]))
    y2 = np.repeat(y, 2) + np.tile([1.0, -1.0], cells)
    np.testing.assert_allclose(resample(x2, y2, edges), y, rtol=1e-12, atol=1e-9)
