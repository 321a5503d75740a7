"""Drawing: matplotlib's object API on an Agg canvas (no display, no global pyplot state).

Time-series figures put one line per module coloured by depth (viridis, shallow = dark; a colour bar instead of
legend entries past 12 layers) and the steps of the alerts about what the figure draws as red dashed vertical lines.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geomon.tools.report.keys import (
    ALPHA,
    BOUND,
    ENTROPY,
    LOGIT_THRESHOLD,
    MAX_LOGIT,
    NC,
    NORMALIZED,
    RANKME,
    RANKME_COV,
    SIGMA,
)
from geomon.tools.report.phases import PHASES, Phase, detect_phases
from geomon.tools.report.run import RunData

PHASE_COLORS = dict(zip(PHASES, ("#b0b0b0", "#9ed99e", "#f7c08a"), strict=True))
MAX_LEGEND = 12  # more layers than this get a depth colour bar instead of a legend entry each


@dataclass
class Line:
    """One series to plot."""

    label: str
    steps: list[int]
    values: list[float]
    color: object = None
    style: str = "-"


def slug(name: str) -> str:
    """A file-name-safe form of a module or probe name.

    Example:
        >>> slug("model.blocks.0/attn proj")
        'model.blocks.0_attn_proj'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def depth_colors(n: int) -> list:
    """``n`` colours from shallow (dark purple) to deep (yellow-green)."""
    from matplotlib import colormaps

    return list(colormaps["viridis"](np.linspace(0.0, 0.85, n))) if n > 1 else ["tab:blue"] * n


def render_png(figure: object, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def new_figure(width: float = 9.0, height: float = 4.8):
    """A matplotlib ``Figure`` on an Agg canvas with constrained layout (no pyplot, no window)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def draw_alerts(ax, alert_steps: Sequence[int]) -> None:
    """Each alert step as a red dashed vertical line (one legend entry for all)."""
    for i, step in enumerate(alert_steps):
        ax.axvline(step, color="red", linestyle="--", linewidth=1.2, alpha=0.85, label="alert" if i == 0 else None)


def finish_axes(ax, ylabel: str, *, xlabel: bool = True, legend: bool = False) -> None:
    """Label the axes (integer steps) and put the legend outside on the right, if it has several entries, an alert
    line, or ``legend`` is set."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step" if xlabel else "")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 1 or "alert" in labels or (legend and handles):
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def timeseries(title: str, ylabel: str, lines: list[Line], alert_steps: Sequence[int], **options) -> object:
    """One axes of lines over steps, alert lines, optional ``threshold`` (dotted) and ``logy``."""
    figure = new_figure()
    ax = figure.add_subplot()
    _plot_lines(figure, ax, lines)
    threshold = options.get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle=":", linewidth=1.5, label=f"{threshold:g} (threshold scale)")
    if options.get("logy"):
        ax.set_yscale("log")
    if options.get("unit_range"):
        ax.set_ylim(-0.02, 1.02)
    draw_alerts(ax, alert_steps)
    ax.set_title(title)
    finish_axes(ax, ylabel)
    return figure


def _plot_lines(figure, ax, lines: list[Line]) -> None:
    many = len(lines) > MAX_LEGEND
    for line in lines:
        marker = "o" if len(line.steps) < 30 else None
        ax.plot(
            line.steps,
            line.values,
            line.style,
            color=line.color,
            marker=marker,
            markersize=3,
            label=None if many else line.label,
        )
    if many:
        from matplotlib import cm
        from matplotlib.colors import ListedColormap, Normalize

        cmap = ListedColormap([line.color for line in lines])
        mappable = cm.ScalarMappable(Normalize(-0.5, len(lines) - 0.5), cmap)
        figure.colorbar(mappable, ax=ax, label=f"layer in depth order (0 = {lines[0].label})")


def layer_lines(run: RunData, prefix: str, names: list[str]) -> list[Line]:
    """One line per module, coloured by depth."""
    return [
        Line(name, *run.series(prefix + name), color)
        for name, color in zip(names, depth_colors(len(names)), strict=True)
    ]


def attention_figure(
    run: RunData, prefix: str, title: str, ylabel: str, names: list[str], alerts: Sequence[int]
) -> object:
    """Per-layer lines of one attention statistic (max logit: the threshold, dotted, once values reach half of it)."""
    lines = layer_lines(run, prefix, names)
    peak = max((v for line in lines for v in line.values if np.isfinite(v)), default=0.0)
    threshold = LOGIT_THRESHOLD if prefix == MAX_LOGIT and peak >= LOGIT_THRESHOLD / 2 else None
    return timeseries(title, ylabel, lines, alerts, threshold=threshold, unit_range=prefix == NORMALIZED)


def rank_figure(run: RunData, probe: str, alerts: Sequence[int]) -> object:
    """Covariance RankMe, RankMe and alpha-ReQ of one probe (the panels it has), detected phases shaded on each,
    steps on a log axis when they span more than two decades (the phases are read on log steps)."""
    panels = [(RANKME_COV, "RankMe (covariance)"), (RANKME, "RankMe"), (ALPHA, "alpha-ReQ α")]
    panels = [(key, label) for key, label in panels if run.series(key + probe)[0]]
    figure = new_figure(9.0, 3.0 + 2.4 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    phases = probe_phases(run, probe)
    steps = [step for key, _ in panels for step in run.series(key + probe)[0]]
    positive = [step for step in steps if step > 0]
    log_steps = bool(positive) and max(positive) >= 100 * min(positive)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for phase in phases:
            name = phase.name if ax is axes[0] else None
            ax.axvspan(phase.start, phase.end, color=PHASE_COLORS[phase.name], alpha=0.5, linewidth=0, label=name)
        ax.plot(*run.series(key + probe), "-", color="tab:blue", label=label)
        draw_alerts(ax, alerts)
        finish_axes(ax, label, xlabel=ax is axes[-1])
        if log_steps:
            ax.set_xscale("symlog", linthresh=max(1, min(positive)))
    source = "covariance RankMe" if phase_source(run, probe) == RANKME_COV else "uncentred RankMe: no rankme_cov"
    detected = f"phases from {source}" if phases else "no phase detected"
    axes[0].set_title(f"RankMe and alpha-ReQ of {probe} ({detected})")
    return figure


def phase_source(run: RunData, probe: str) -> str:
    """The RankMe the phases of ``probe`` are read from: the covariance RankMe the study uses when the run has it
    (``RANKME_COV``), else the uncentred one (``RANKME``)."""
    return RANKME_COV if run.series(RANKME_COV + probe)[0] else RANKME


def probe_phases(run: RunData, probe: str) -> list[Phase]:
    """Phases of one probe from its RankMe (:func:`phase_source`) and, where logged, alpha-ReQ."""
    steps, rank = run.series(phase_source(run, probe) + probe)
    if not steps:
        return []
    alpha = dict(zip(*run.series(ALPHA + probe), strict=True))
    aligned = [alpha.get(step, math.nan) for step in steps] if alpha else None
    try:
        return detect_phases(steps, rank, aligned)
    except ValueError:  # steps that are not increasing and >= 0 (a log read back oddly): no phase, not a crash
        return []


def nc_figure(run: RunData, alerts: Sequence[int]) -> object:
    """Every ``geomon/nc/<stat>/<probe>`` series; positive ones on a log axis, the others on a linear one."""
    from matplotlib import colormaps

    names = run.names(NC)
    probes = {name.split("/", 1)[-1] for name in names}
    lines = [Line(name.split("/")[0] if len(probes) == 1 else name, *run.series(NC + name)) for name in names]
    positive = [line for line in lines if all(v > 0 for v in line.values if np.isfinite(v))]
    other = [line for line in lines if line not in positive]
    figure = new_figure(9.0, 4.8 if not (positive and other) else 7.5)
    groups = [(group, log) for group, log in ((positive, True), (other, False)) if group]
    axes = figure.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    colors = iter((colormaps["tab10"].colors + colormaps["Dark2"].colors) * 4)
    for ax, (group, log) in zip(axes, groups, strict=True):
        for line in group:
            marker = "o" if len(line.steps) < 30 else None
            ax.plot(line.steps, line.values, "-", color=next(colors), marker=marker, markersize=3, label=line.label)
        if log:
            ax.set_yscale("log")
        draw_alerts(ax, alerts)
        finish_axes(ax, "statistic (log scale)" if log else "statistic", xlabel=ax is axes[-1], legend=True)
    axes[0].set_title("Neural-collapse statistics")
    return figure


def sigma_figure(run: RunData, alerts: Sequence[int]) -> object:
    """σ(W) of every ``geomon/spectral/sigma/<module>`` series, coloured by depth."""
    lines = layer_lines(run, SIGMA, run.names(SIGMA))
    return timeseries("Spectral norms of the weights", "σ(W), largest singular value", lines, alerts)


def bound_figure(run: RunData, alerts: Sequence[int]) -> object:
    """Measured attention entropy (solid) against the Theorem 3.1 lower bound (dashed), one colour per module."""
    names = run.names(BOUND)
    lines = []
    for name, color in zip(names, depth_colors(len(names)), strict=True):
        if run.series(ENTROPY + name)[0]:
            lines.append(Line(f"{name} measured", *run.series(ENTROPY + name), color, "-"))
        lines.append(Line(f"{name} bound", *run.series(BOUND + name), color, "--"))
    return timeseries(
        "Attention entropy (solid) against its spectral lower bound (dashed)", "entropy (nats)", lines, alerts
    )
