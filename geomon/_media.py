"""Per-head values and spectra as media, one small writer per tracker (the only tracker-specific code of geomon).

Scalars go through every Lightning logger unchanged; this module adds, on rank zero at logging steps:

- every logger with a directory (CSV, TensorBoard, W&B's run files): ``geomon_heads.csv`` (``step,key,head,value``)
  with every per-head value, so that ``geomon report`` can draw the layer x head heatmaps from any run;
- W&B: a layer x head heatmap of normalised entropy and the singular-value spectra as images on the trainer's
  global step (summaries, the overview section and the per-head tables: :mod:`geomon.integrations.wandb_dashboard`);
- TensorBoard: the same images, and a histogram of each layer's per-head values.

The figures are drawn only when a logger takes images (W&B, TensorBoard), once per step for all of them, with
matplotlib's object API on an Agg canvas: geomon never switches the user's matplotlib backend nor touches pyplot's
figure registry (a notebook's inline or interactive backend stays as it was).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any

from torch import Tensor

from geomon import keys
from geomon.functional import GeomonWarning

HEADS_FILE = "geomon_heads.csv"
ALERTS_FILE = "geomon_alerts.csv"
ENTROPY_NORMALIZED = keys.prefix(keys.ENTROPY_NORMALIZED)


#: The Lightning loggers geomon writes files and media for, by class name (both import namespaces define them).
KNOWN_LOGGERS = ("WandbLogger", "TensorBoardLogger", "CSVLogger")


def logger_kind(logger: Any) -> str | None:
    """Which of :data:`KNOWN_LOGGERS` ``logger`` is, its own class or a base (a subclass of ``WandbLogger`` is
    one), else ``None``.

    Example:
        >>> class Base: ...
        >>> WandbLogger = type("WandbLogger", (Base,), {})
        >>> logger_kind(type("MyLogger", (WandbLogger,), {})()), logger_kind(Base())
        ('WandbLogger', None)
    """
    return next((c.__name__ for c in type(logger).__mro__ if c.__name__ in KNOWN_LOGGERS), None)


def logger_directory(logger: Any) -> str | None:
    """Where a Lightning logger writes its files (W&B: the run's ``files`` directory), or ``None``."""
    kind = logger_kind(logger)
    if kind == "WandbLogger":
        return getattr(logger.experiment, "dir", None)
    if kind in ("CSVLogger", "TensorBoardLogger"):
        return logger.log_dir
    return None


def logger_directories(loggers: list[Any]) -> list[str]:
    """The distinct directories of ``loggers`` (:func:`logger_directory`), in order: a CSV and a TensorBoard logger
    given one version directory share it, and its sidecar files must get each row once."""
    found: dict[str, str] = {}
    for logger in loggers:
        directory = logger_directory(logger)
        if directory is not None:
            found.setdefault(os.path.realpath(directory), directory)
    return list(found.values())


def forget_from(path: str | os.PathLike[str], step: int) -> None:
    """On a resume: move the rows of the sidecar CSV ``path`` (a ``step`` column first) whose step is ``step`` or
    later out of it, into ``<name>.superseded.csv`` beside it: the resumed run writes those steps again, and
    appending would leave each twice; the moved rows (the abandoned branch: a rollback's reason) stay readable.
    Nothing to do when the file does not exist; rows whose step is not a number are kept. The file is replaced in
    one step (a temporary file, then ``os.replace``), so a crash leaves the old one or the new one."""
    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    later, kept = [], []
    for row in body:
        (later if row and row[0].lstrip("-").isdigit() and int(row[0]) >= step else kept).append(row)
    if not later:
        return
    stem, ext = os.path.splitext(os.fspath(path))
    moved = f"{stem}.superseded{ext}"
    new = not os.path.exists(moved)
    with open(moved, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *later] if new else later)
    temporary = f"{os.fspath(path)}.tmp"
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *kept])
    os.replace(temporary, path)


def write_heads(directory: str, step: int, heads: dict[str, Tensor]) -> None:
    """Append every per-head value of this step to ``<directory>/geomon_heads.csv``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, HEADS_FILE)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["step", "key", "head", "value"])
        for key, values in heads.items():
            for head, value in enumerate(values.tolist()):
                writer.writerow([step, key, head, value])


def takes_images(logger: Any) -> bool:
    """Whether geomon hands this Lightning logger images (W&B and TensorBoard do)."""
    return logger_kind(logger) in ("WandbLogger", "TensorBoardLogger")


def heatmap_figure(heads: dict[str, Tensor], step: int) -> Any:
    """Layer x head normalised entropy at one step (NaN where a layer has fewer heads or no valid row).

    The figure grows with the grid (about 0.4 inch per head and 0.3 per layer, plus room for the longest layer
    name) and is never narrower than its title, so the title and the step are never clipped."""
    from matplotlib.figure import Figure

    layers = [key[len(ENTROPY_NORMALIZED) :] for key in heads if key.startswith(ENTROPY_NORMALIZED)]
    width = max(len(heads[ENTROPY_NORMALIZED + layer]) for layer in layers)
    grid = [heads[ENTROPY_NORMALIZED + layer].tolist() + [math.nan] * width for layer in layers]
    label = max(len(layer) for layer in layers) * 0.065  # inches of the longest y tick label at 7 pt
    figure = Figure(
        figsize=(max(5.0, 2.2 + label + 0.4 * width), max(2.6, 1.6 + 0.3 * len(layers))), layout="constrained"
    )
    axes = figure.add_subplot()
    image = axes.imshow([row[:width] for row in grid], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(layers)), layers, fontsize=7)
    axes.set_xticks(range(width), [str(h) for h in range(width)], fontsize=7 if width <= 32 else 5)
    figure.suptitle(f"normalised attention entropy H / log n\nstep {step}", fontsize=9)
    figure.colorbar(image, ax=axes, label="H / log n")
    return figure


def spectrum_figure(spectra: dict[str, Tensor], step: int) -> Any:
    """Singular values against rank, log-log, one line per embedding."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.add_subplot()
    for key, values in spectra.items():
        positive = values[values > 0].tolist()
        axes.loglog(range(1, len(positive) + 1), positive, label=key.removeprefix(keys.prefix(keys.RANKME)))
    axes.set_xlabel("rank k")
    axes.set_ylabel("singular value σ_k")
    axes.set_title(f"embedding spectra, step {step}", fontsize=9)
    axes.legend(fontsize=7)
    return figure


def render_rgb(figure: Any) -> Any:
    """The figure as an ``[height, width, 3]`` uint8 numpy array, drawn on its own Agg canvas (no pyplot)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def log_media(loggers: list[Any], step: int, heads: dict[str, Tensor], spectra: dict[str, Tensor]) -> None:
    """Write the per-head values and embedding spectra of one logging step to every logger that can take them."""
    for directory in logger_directories(loggers) if heads else []:
        write_heads(directory, step, heads)
    images = _images(heads, spectra, step) if any(takes_images(logger) for logger in loggers) else {}
    for logger in loggers:
        kind = logger_kind(logger)
        if kind == "WandbLogger" and images:
            import wandb

            media = {keys.key(keys.MEDIA, name): wandb.Image(rgb) for name, rgb in images.items()}
            logger.log_metrics(media, step=step)
        elif kind == "TensorBoardLogger":
            writer = logger.experiment
            for name, rgb in images.items():
                writer.add_image(keys.key(keys.MEDIA, name), rgb, global_step=step, dataformats="HWC")
            for key, values in heads.items():
                if values.isfinite().any():
                    writer.add_histogram(keys.heads_histogram(key), values[values.isfinite()], global_step=step)


def _images(heads: dict[str, Tensor], spectra: dict[str, Tensor], step: int) -> dict[str, Any]:
    """This step's heatmap and spectra, each drawn once and rendered to an RGB array that every logger shares."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("geomon: matplotlib is not installed, so no heatmaps or spectra are drawn", GeomonWarning,
                      stacklevel=3)  # fmt: skip
        return {}
    images = {}
    if any(key.startswith(ENTROPY_NORMALIZED) for key in heads):
        images["entropy_heatmap"] = render_rgb(heatmap_figure(heads, step))
    if spectra:
        images["spectra"] = render_rgb(spectrum_figure(spectra, step))
    return images
