"""The three representation-geometry phases of pretraining, read from a RankMe curve on a log-step axis.

The "Tracing the Representation Geometry of Language Models" study (Li et al.; METRICS.md §2) reads three phases
from the covariance RankMe (``geomon/rankme_cov/``) and alpha-ReQ, plotted against log steps: a *warm-up collapse*
where RankMe falls early; an *entropy-seeking* phase, RankMe rising to a peak while alpha-ReQ falls (the spectrum
flattens); and a *compression-seeking* phase after the peak, RankMe falling while alpha-ReQ rises (variance
concentrates in few directions).

Checkpoints are usually dense in linear steps and sparse early (or log-spaced), and the phases happen on very
different time scales (the collapse in the first hundreds of steps, the peak thousands later), so the curves are
first put on a uniform log-step axis. The steps:

1. ``x = log10(1 + step)``; the points are binned on a uniform grid of ``resolution`` decades (a cell holding
   points takes their mean, which averages the dense late checkpoints of a linear grid) and the cells between
   points are linearly interpolated in ``x``;
2. the gridded curves are smoothed by a centred moving average ``smoothing`` decades wide (shrinking at the ends);
3. *entropy-seeking* is the largest rise of RankMe: the peak ``p`` and the lowest point ``m`` before it that
   maximise ``R(p) - R(m)``; *warm-up collapse* is the fall from the highest point before ``m`` down to ``m``;
   *compression-seeking* runs from the peak to the end when RankMe falls after it. A rise or fall counts when it
   is at least ``tol`` times the curve's largest value (default 5%);
4. where alpha-ReQ is given, entropy-seeking is kept only if alpha did not rise over it, and compression-seeking
   only if alpha did not fall (by ``tol`` times its own largest value); the warm-up is read from RankMe alone.

A curve that only falls has no phase (without the rise a collapse cannot be told from compression); one that only
rises is entropy-seeking throughout. No span is returned for fewer than 5 finite points. The boundaries are as
accurate as the checkpoints allow: between two checkpoints the curve is a straight line in log steps, so an
extremum is placed at (or, after smoothing, near) a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WARMUP, ENTROPY_SEEKING, COMPRESSION_SEEKING = "warm-up collapse", "entropy-seeking", "compression-seeking"
PHASES = (WARMUP, ENTROPY_SEEKING, COMPRESSION_SEEKING)


@dataclass(frozen=True)
class Phase:
    """A detected phase: its name (one of :data:`PHASES`) and the step span it covers."""

    name: str
    start: float
    end: float


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, the window shrinking at both ends.

    Example:
        >>> smooth(np.array([0.0, 3.0, 0.0, 3.0]), 3).tolist()
        [1.5, 1.0, 2.0, 1.5]
    """
    half = window // 2
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    lo = np.clip(np.arange(len(values)) - half, 0, len(values))
    hi = np.clip(np.arange(len(values)) + half + 1, 0, len(values))
    return (sums[hi] - sums[lo]) / (hi - lo)


def log_step(steps: np.ndarray | Sequence[float]) -> np.ndarray:
    """The log-step axis, ``log10(1 + step)`` (step 0 is 0, step 999 is 3)."""
    return np.log10(1.0 + np.asarray(steps, dtype=np.float64))


def resample(x: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``values`` at points ``x`` on the grid of cells ``edges``: the mean of the points in a cell, linearly
    interpolated (in ``x``) across cells without a point; one value per cell, at its centre.

    Example:
        >>> edges = np.linspace(0.0, 3.0, 4)  # cells centred on 0.5, 1.5, 2.5
        >>> resample(np.array([0.5, 1.4, 1.6, 2.5]), np.array([1.0, 2.0, 4.0, 7.0]), edges).tolist()
        [1.0, 3.0, 7.0]
        >>> resample(np.array([0.5, 2.5]), np.array([1.0, 5.0]), edges).tolist()
        [1.0, 3.0, 5.0]
    """
    cells = len(edges) - 1
    index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, cells - 1)
    counts = np.bincount(index, minlength=cells)
    filled = counts > 0
    mean_x = np.bincount(index, weights=x, minlength=cells)[filled] / counts[filled]
    mean_value = np.bincount(index, weights=values, minlength=cells)[filled] / counts[filled]
    return np.interp((edges[:-1] + edges[1:]) / 2, mean_x, mean_value)


def detect_phases(
    steps: Sequence[float],
    rankme: Sequence[float],
    alpha: Sequence[float] | None = None,
    *,
    smoothing: float = 0.2,
    tol: float = 0.05,
    resolution: float = 0.025,
) -> list[Phase]:
    """Spans of the three phases in a RankMe curve (and, optionally, the alpha-ReQ curve on the same ``steps``).

    Args:
        steps: increasing steps ``>= 0``; ``rankme`` and ``alpha`` hold one value per step (NaN: not logged there).
        rankme: RankMe values, preferably the covariance RankMe (``geomon/rankme_cov/``) the study reads.
        alpha: alpha-ReQ values, or ``None``: then the phases are read from RankMe alone.
        smoothing: width of the moving average, in decades of steps.
        tol: the smallest rise or fall that counts, as a fraction of the curve's largest absolute value.
        resolution: grid spacing, in decades of steps.

    Returns:
        The phases in step order; empty when none is detectable.

    Example:
        >>> steps = [0, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
        >>> rankme = [40, 30, 18, 12, 25, 40, 55, 60, 55, 50]
        >>> [(p.name, round(p.start), round(p.end)) for p in detect_phases(steps, rankme)]
        [('warm-up collapse', 0, 89), ('entropy-seeking', 89, 9829), ('compression-seeking', 9829, 100000)]
    """
    if not smoothing >= 0 or not resolution > 0 or not 0 < tol < 1:
        raise ValueError(f"need smoothing >= 0, resolution > 0 and 0 < tol < 1, got {smoothing}, {resolution}, {tol}")
    t, r = np.asarray(steps, dtype=np.float64), np.asarray(rankme, dtype=np.float64)
    a = None if alpha is None else np.asarray(alpha, dtype=np.float64)
    if t.shape != r.shape or (a is not None and a.shape != t.shape):
        raise ValueError(f"steps, rankme and alpha must have one value per step, got {t.shape}, {r.shape}")
    if len(t) and (np.any(np.diff(t) <= 0) or t[0] < 0):
        raise ValueError("steps must be increasing and >= 0")
    keep = np.isfinite(r)
    if keep.sum() < 5:
        return []
    x, first, last = log_step(t[keep]), float(t[keep][0]), float(t[keep][-1])
    cells = max(2, int(np.ceil((x[-1] - x[0]) / resolution)))
    edges = np.linspace(x[0], x[-1], cells + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    window = max(1, round(smoothing / ((x[-1] - x[0]) / cells)))
    curve = smooth(resample(x, r[keep], edges), window)
    scale = float(np.abs(curve).max())
    if not scale > 0:
        return []
    significant = tol * scale

    prefix_low = np.zeros(cells, dtype=int)  # index of the lowest point up to each cell
    for i in range(1, cells):
        prefix_low[i] = i if curve[i] < curve[prefix_low[i - 1]] else prefix_low[i - 1]
    peak = int(np.argmax(curve - curve[prefix_low]))
    low = int(prefix_low[peak])
    if curve[peak] - curve[low] < significant:
        return []
    top = int(np.argmax(curve[: low + 1]))  # where the warm-up fall starts
    bottom = peak + int(np.argmin(curve[peak:]))  # the lowest point after the peak

    alpha_curve = _alpha_curve(t, a, edges, window)
    alpha_tol = None if alpha_curve is None else tol * float(np.abs(alpha_curve).max())

    def at(i: int) -> float:
        return float(10 ** centres[i] - 1)

    phases = []
    if curve[top] - curve[low] >= significant:
        phases.append(Phase(WARMUP, first if top == 0 else at(top), at(low)))
    if alpha_curve is None or alpha_curve[peak] - alpha_curve[low] < alpha_tol:
        phases.append(Phase(ENTROPY_SEEKING, first if low == 0 else at(low), last if peak == cells - 1 else at(peak)))
    if curve[peak] - curve[bottom] >= significant and (
        alpha_curve is None or alpha_curve[bottom] - alpha_curve[peak] > -alpha_tol
    ):
        phases.append(Phase(COMPRESSION_SEEKING, at(peak), last))
    return phases


def _alpha_curve(t: np.ndarray, a: np.ndarray | None, edges: np.ndarray, window: int) -> np.ndarray | None:
    """alpha-ReQ on the same grid as RankMe, or ``None`` when it has fewer than 5 finite points."""
    if a is None or np.isfinite(a).sum() < 5:
        return None
    keep = np.isfinite(a)
    curve = smooth(resample(log_step(t[keep]), a[keep], edges), window)
    return curve if float(np.abs(curve).max()) > 0 else None
