"""The three representation-geometry phases of pretraining, read from RankMe and alpha-ReQ curves.

The "Tracing the Representation Geometry" study describes (METRICS.md §2): a *warm-up collapse* where RankMe falls
early; an *entropy-seeking* phase, RankMe rising while alpha-ReQ falls (the spectrum flattens); and a
*compression-seeking* phase, alpha-ReQ rising while RankMe falls (variance concentrates in few directions).

The segmentation here is deliberately simple and documented rather than clever:

1. both curves are taken on their common steps and smoothed by a centred moving average (``window`` points,
   default ``max(3, n // 10)``, shrinking at the ends);
2. each point gets a trend per curve, the sign of the smoothed slope, where the slope is measured in units of the
   curve's range per length of the run and counts as flat when below ``tol`` (a curve that moves by less than
   ``1e-6`` of its size is flat throughout);
3. entropy-seeking where RankMe rises and alpha falls, compression-seeking where alpha rises and RankMe falls;
   the warm-up collapse is the stretch before the first entropy-seeking point where RankMe falls, if it starts in
   the first tenth of the run;
4. runs of one label shorter than ``min_points`` (default ``max(2, window // 2)``) are dropped, neighbours with the
   same label merged, and each span reaches half-way to the neighbouring points.

No span is returned when the curves are too short (under 5 common steps) or nothing matches.
"""

from __future__ import annotations

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


def trend(steps: np.ndarray, values: np.ndarray, window: int, tol: float) -> np.ndarray:
    """Per point: +1 rising, -1 falling, 0 flat, from the slope of the smoothed curve (see the module docs)."""
    smoothed = smooth(values, window)
    size = float(smoothed.max() - smoothed.min())
    if size <= 1e-6 * max(float(np.abs(smoothed).max()), 1e-12):
        return np.zeros(len(values), dtype=int)
    relative = np.gradient(smoothed, steps) * float(steps[-1] - steps[0]) / size
    return np.where(np.abs(relative) > tol, np.sign(relative), 0).astype(int)


def detect_phases(
    steps: list[int],
    rankme: list[float],
    alpha: list[float],
    *,
    window: int | None = None,
    tol: float = 0.2,
    min_points: int | None = None,
) -> list[Phase]:
    """Spans of the three phases in a pair of RankMe / alpha-ReQ curves logged on the same ``steps``.

    Args:
        steps: increasing steps; ``rankme`` and ``alpha`` hold one value per step (NaN points are dropped).
        rankme: RankMe values.
        alpha: alpha-ReQ values.
        window: moving-average width in points.
        tol: slope below which a curve counts as flat (curve ranges per run length).
        min_points: the fewest points a span must cover.

    Returns:
        The phases in step order; empty when none is detectable.

    Example:
        >>> steps = list(range(100))
        >>> rankme = [50 - s for s in range(20)] + [30 + s for s in range(80)]
        >>> alpha = [1.0] * 20 + [1.0 - 0.01 * s for s in range(80)]
        >>> [(p.name, round(p.start), round(p.end)) for p in detect_phases(steps, rankme, alpha)]
        [('warm-up collapse', 0, 20), ('entropy-seeking', 20, 99)]
    """
    t, r, a = (np.asarray(x, dtype=np.float64) for x in (steps, rankme, alpha))
    keep = np.isfinite(r) & np.isfinite(a)
    t, r, a = t[keep], r[keep], a[keep]
    n = len(t)
    if n < 5 or not np.all(np.diff(t) > 0):
        return []
    window = window or max(3, n // 10)
    min_points = min_points or max(2, window // 2)
    rank_trend, alpha_trend = trend(t, r, window, tol), trend(t, a, window, tol)
    labels: list[str | None] = [None] * n
    for i in range(n):
        if rank_trend[i] > 0 and alpha_trend[i] < 0:
            labels[i] = ENTROPY_SEEKING
        elif rank_trend[i] < 0 and alpha_trend[i] > 0:
            labels[i] = COMPRESSION_SEEKING
    if ENTROPY_SEEKING in labels:
        first = labels.index(ENTROPY_SEEKING)
        falling = [i for i in range(first) if rank_trend[i] < 0]
        if falling and falling[0] <= n // 10:
            for i in range(falling[0], first):
                labels[i] = WARMUP if rank_trend[i] < 0 or labels[i] is None else labels[i]
    return _spans(t, labels, min_points)


def _spans(t: np.ndarray, labels: list[str | None], min_points: int) -> list[Phase]:
    runs: list[list] = []  # [label, first index, last index]
    for i, label in enumerate(labels):
        if runs and runs[-1][0] == label:
            runs[-1][2] = i
        else:
            runs.append([label, i, i])
    kept: list[list] = []
    for label, first, last in runs:
        if label is None or last - first + 1 < min_points:
            continue
        if kept and kept[-1][0] == label:
            kept[-1][2] = last
        else:
            kept.append([label, first, last])
    edges = np.concatenate([[t[0]], (t[1:] + t[:-1]) / 2, [t[-1]]])
    return [Phase(label, float(edges[first]), float(edges[last + 1])) for label, first, last in kept]
