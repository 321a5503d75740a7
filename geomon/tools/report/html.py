"""The report page: one self-contained ``index.html`` (figures embedded as base64 PNG data URIs)."""

from __future__ import annotations

import base64
import math
from html import escape

import numpy as np

from geomon.tools.report.figures import FigurePlan
from geomon.tools.report.heatmap import head_matrix, head_steps
from geomon.tools.report.keys import ALPHA, ENTROPY, MAX_LOGIT, NORMALIZED, RANKME, RANKME_COV
from geomon.tools.report.run import RunData, natural_key

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; font-family: monospace; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; } .meta { color: #555; }
"""


def fmt(value: float) -> str:
    """A value for a table cell: 4 significant digits, a dash when missing.

    Example:
        >>> fmt(1.23456), fmt(float("nan")), fmt(250.0)
        ('1.235', '–', '250')
    """
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are escaped here."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def layer_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """Per attention layer: last entropy, normalised entropy, max logit (and the lowest head's normalised entropy)."""
    modules = sorted({*run.names(ENTROPY), *run.names(NORMALIZED), *run.names(MAX_LOGIT)}, key=natural_key)
    header = ["layer", "entropy (nats)", "normalised entropy", "max logit", "last step"]
    lowest: dict[str, float] = {}
    steps = head_steps(run)
    if steps:
        names, matrix = head_matrix(run, steps[-1])
        lowest = {
            name: float(np.nanmin(row)) for name, row in zip(names, matrix, strict=True) if np.isfinite(row).any()
        }
        header.append(f"lowest head norm. entropy (step {steps[-1]})")
    rows = []
    for module in modules:
        keys = [prefix + module for prefix in (ENTROPY, NORMALIZED, MAX_LOGIT)]
        last_step = max((run.series(key)[0][-1] for key in keys if run.series(key)[0]), default=None)
        row = [module, *(fmt(run.last(key)) for key in keys), "" if last_step is None else str(last_step)]
        if steps:
            row.append(fmt(lowest.get(module, math.nan)))
        rows.append(row)
    return header, rows


def probe_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """Per embedding probe: last RankMe, covariance RankMe and alpha-ReQ."""
    probes = sorted({*run.names(RANKME), *run.names(RANKME_COV), *run.names(ALPHA)}, key=natural_key)
    columns = [(RANKME, "RankMe"), (RANKME_COV, "RankMe (covariance)"), (ALPHA, "alpha-ReQ")]
    columns = [(prefix, label) for prefix, label in columns if run.names(prefix)]
    rows = [[probe, *(fmt(run.last(prefix + probe)) for prefix, _ in columns)] for probe in probes]
    return ["probe", *(label for _, label in columns)], rows


def render_html(run: RunData, figures: list[tuple[FigurePlan, bytes]]) -> str:
    """The whole page: header, summary tables, alerts table, figures with captions."""
    span = run.step_range()
    steps = "no steps" if span is None else f"steps {span[0]} to {span[1]}"
    parts = [
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>geomon report: {escape(run.path.name)}"
        f"</title><style>{STYLE}</style></head><body>\n<h1>geomon report</h1>\n",
        f"<p class='meta'>Run: <code>{escape(str(run.path))}</code> ({escape(run.source)}), {steps}; "
        f"{len(run.geomon_keys())} geomon series. Files read: "
        + ", ".join(f"<code>{escape(str(file))}</code>" for file in run.files)
        + "</p>\n",
    ]
    header, rows = layer_rows(run)
    if rows:
        parts += ["<h2>Attention layers (last values)</h2>\n", table(header, rows)]
    header, rows = probe_rows(run)
    if rows:
        parts += ["<h2>Embedding probes (last values)</h2>\n", table(header, rows)]
    alerts = run.alerts()
    parts.append(f"<h2>Alerts ({len(alerts)})</h2>\n")
    if alerts:
        rows = [[str(a.step), a.rule, a.level, a.kind, a.key, a.text] for a in alerts]
        parts.append(table(["step", "rule", "level", "kind", "key", "message"], rows))
    else:
        parts.append("<p>No alert fired.</p>\n")
    parts.append("<h2>Figures</h2>\n")
    for plan, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure id='{escape(plan.name)}'><img alt='{escape(plan.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>{escape(plan.title)}.</b> {escape(plan.caption)}</figcaption></figure>\n"
        )
    if not figures:
        parts.append("<p>The run holds no series that a figure is drawn for.</p>\n")
    parts.append("</body></html>\n")
    return "".join(parts)
