"""``geomon report``: a self-contained HTML page and PNG figures from any run geomon logged to.

Reads Lightning CSV logs, TensorBoard event files, offline W&B runs and long ``step,key,value`` CSVs
(:mod:`geomon.tools.report.readers`), draws the figures the run has data for
(:mod:`geomon.tools.report.figures`) and writes ``index.html`` with every PNG embedded, plus the PNGs beside it.
Needs matplotlib (and rich for progress bars).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from geomon.tools.report.readers import read_run
from geomon.tools.report.run import Alert, ReportError, RunData

__all__ = ["Alert", "Report", "ReportError", "RunData", "build_report", "read_run"]


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    run: RunData
    out: Path
    html: Path
    figures: list[Path]


def default_out(run_path: Path) -> Path:
    """``<RUN>/geomon-report`` for a run directory, beside the file for a run file."""
    return (run_path if run_path.is_dir() else run_path.parent) / "geomon-report"


def build_report(
    run_path: str | Path, out: str | Path | None = None, *, steps: Sequence[int] | None = None, progress: bool = False
) -> Report:
    """Read the run at ``run_path`` and write ``index.html`` and one PNG per figure into ``out``.

    Args:
        run_path: a run directory or data file (see :func:`geomon.tools.report.readers.read_run`).
        out: output directory; default ``<run_path>/geomon-report``.
        steps: steps for the per-head heatmap (the nearest logged steps are used); default first, middle, last.
        progress: show progress bars on a terminal.

    Raises:
        ReportError: the run is missing, unreadable, or has no ``geomon/...`` values.
    """
    from geomon.tools.report.figures import plan_figures
    from geomon.tools.report.html import render_html
    from geomon.tools.report.plots import render_png
    from geomon.tools.report.progress import track

    run_path = Path(run_path)
    run = read_run(run_path, progress=progress)
    if not run.geomon_keys() and not run.heads:
        keys = run.keys()
        found = ", ".join(keys[:10]) + (f" ... ({len(keys)} keys)" if len(keys) > 10 else "") if keys else "none"
        raise ReportError(f"{run_path}: no geomon/... values in this run (keys found: {found})")
    out = Path(out) if out is not None else default_out(run_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        figures, written = [], []
        for plan in track(plan_figures(run, steps), "drawing figures", enabled=progress):
            png = render_png(plan.draw())
            (out / plan.name).write_bytes(png)
            figures.append((plan, png))
            written.append(out / plan.name)
        html = out / "index.html"
        html.write_text(render_html(run, figures), encoding="utf-8")
    except OSError as error:
        raise ReportError(f"cannot write the report to {out}: {error.strerror or error}") from None
    return Report(run, out, html, written)
