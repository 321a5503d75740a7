"""Which figures a run gets: :func:`plan_figures` looks at the keys, draws nothing, and returns one
:class:`FigurePlan` (file name, title, caption saying how to read it, drawing function) per figure with data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from geomon import keys
from geomon.tools.report.heatmap import head_heatmap, heatmap_steps
from geomon.tools.report.keys import ALPHA, BOUND, ENTROPY, MAX_LOGIT, NC, NORMALIZED, RANKME, RANKME_COV, SIGMA
from geomon.tools.report.plots import (
    attention_figure,
    bound_figure,
    nc_figure,
    phase_source,
    rank_figure,
    sigma_figure,
    slug,
)
from geomon.tools.report.run import RunData


@dataclass
class FigurePlan:
    """One figure the run has data for: its PNG file name, title, how to read it, and how to draw it."""

    name: str
    title: str
    caption: str
    draw: Callable[[], object]


def plan_figures(run: RunData, steps: Sequence[int] | None = None) -> list[FigurePlan]:
    """The figures ``run`` has data for, in report order; ``steps`` picks the head-heatmap steps."""
    # each figure shows the alerts about what it draws (an alert whose subject is unknown: every figure)
    attention, spectral = keys.prefix("attention"), keys.prefix("spectral")
    plans = []
    for prefix, name, title, ylabel, caption in _ATTENTION_FIGURES:
        if run.names(prefix):
            alerts = run.alert_steps((attention,))
            draw = partial(attention_figure, run, prefix, title, ylabel, run.names(prefix), alerts)
            plans.append(FigurePlan(name, title, caption, draw))
    chosen = heatmap_steps(run, steps)
    if chosen:
        title = "Per-head normalised attention entropy"
        plans.append(
            FigurePlan("head_entropy_heatmap.png", title, _HEATMAP_CAPTION, partial(head_heatmap, run, chosen))
        )
    for probe in sorted({*run.names(RANKME), *run.names(RANKME_COV), *run.names(ALPHA)}):
        draw = partial(rank_figure, run, probe, run.alert_steps((RANKME, RANKME_COV, ALPHA)))
        source = _COV_SOURCE if phase_source(run, probe) == RANKME_COV else _UNCENTRED_SOURCE
        title = f"RankMe and alpha-ReQ of {probe}"
        plans.append(FigurePlan(f"rankme_alpha_{slug(probe)}.png", title, _RANK_CAPTION + " " + source, draw))
    if run.names(NC):
        draw = partial(nc_figure, run, run.alert_steps((NC,)))
        plans.append(FigurePlan("neural_collapse.png", "Neural-collapse statistics", _NC_CAPTION, draw))
    if run.names(SIGMA):
        draw = partial(sigma_figure, run, run.alert_steps((spectral,)))
        plans.append(FigurePlan("spectral_sigma.png", "Spectral norms of the weights", _SIGMA_CAPTION, draw))
    if run.names(BOUND):
        title = "Attention entropy against its spectral lower bound"
        draw = partial(bound_figure, run, run.alert_steps((spectral, attention)))
        plans.append(FigurePlan("entropy_bound.png", title, _BOUND_CAPTION, draw))
    return plans


_ATTENTION_FIGURES = (
    (
        ENTROPY,
        "attention_entropy.png",
        "Attention entropy per layer",
        "entropy (nats)",
        "Mean attention entropy per layer, in nats (log n for uniform attention over n keys, 0 for one-hot). "
        "A layer whose entropy drops fast and keeps falling is collapsing; Zhai et al. see this before loss spikes.",
    ),
    (
        NORMALIZED,
        "attention_entropy_normalized.png",
        "Normalised attention entropy per layer",
        "H / log n",
        "Entropy divided by log(number of keys): 1 = uniform attention, near 0 = a head attends to one token: "
        "collapse. Comparable across layers, sequence lengths and causal positions.",
    ),
    (
        MAX_LOGIT,
        "attention_max_logit.png",
        "Max attention logit per layer",
        "max logit",
        "Largest pre-softmax attention logit per layer. Logits that keep growing (towards ~100, dotted when near) "
        "are the runaway-logit regime that QK-norm and QK-clip exist to stop.",
    ),
)
_HEATMAP_CAPTION = (
    "Each cell is one head's normalised attention entropy (0 = the head attends to one token: collapse, "
    "1 = uniform). Dark cells are collapsed heads; compare panels to see when they went."
)
_RANK_CAPTION = (
    "RankMe of the centred covariance eigenvalues, RankMe (effective rank) and alpha-ReQ (eigenspectrum decay), "
    "the panels the run logged. RankMe falling towards 1 is dimensional collapse. Shaded when detected, on a "
    "log-step axis: warm-up collapse (grey: the early fall to the minimum), entropy-seeking (green: the rise to the "
    "peak, alpha down), compression-seeking (orange: the fall after the peak, alpha up)."
)
_COV_SOURCE = "The phases are read from the covariance RankMe, the curve the study reads them from."
_UNCENTRED_SOURCE = (
    "This run logged no covariance RankMe (geomon/rankme_cov/), so the phases are read from the uncentred RankMe: "
    "a different number, whose phases may differ from the study's."
)
_NC_CAPTION = (
    "Neural-collapse statistics of the penultimate features; values falling towards 0 mean the features collapse "
    "onto their class means, arranged as a simplex and aligned with the classifier (late training)."
)
_SIGMA_CAPTION = (
    "Largest singular value σ(W) of each monitored weight. Fast growth in attention projections lets logits grow "
    "and attention entropy fall (Zhai et al.)."
)
_BOUND_CAPTION = (
    "Solid: measured attention entropy; dashed: the Theorem 3.1 lower bound implied by the spectral norms. The bound "
    "is a worst case; when it nears the measured entropy, the spectral norms are what allow collapse."
)
