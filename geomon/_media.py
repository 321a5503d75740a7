"""Per-head values and spectra as media, one small writer per tracker (the only tracker-specific code of geomon).

Scalars go through every Lightning logger unchanged; this module adds, on rank zero at logging steps:

- every logger with a directory (CSV, TensorBoard, W&B's run files): ``geomon_heads.csv`` (``step,key,head,value``)
  with every per-head value, so that ``geomon report`` can draw the layer x head heatmaps from any run;
- W&B: a layer x head heatmap of normalised entropy and the singular-value spectra as images on the trainer's
  global step, and ``define_metric`` summaries (min entropy, max logit);
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

HEADS_FILE = "geomon_heads.csv"
ENTROPY_NORMALIZED = keys.prefix(keys.ENTROPY_NORMALIZED)

#: W&B run summaries: (key glob, summary) - the worst value a run reached is what a dashboard should show.
WANDB_SUMMARIES = (
    (keys.pattern(keys.ENTROPY), "min"),
    (keys.pattern(keys.ENTROPY_NORMALIZED), "min"),
    (keys.pattern(keys.MAX_LOGIT), "max"),
    (keys.pattern(keys.RANKME), "min"),
)


def logger_directory(logger: Any) -> str | None:
    """Where a Lightning logger writes its files (W&B: the run's ``files`` directory), or ``None``."""
    if type(logger).__name__ == "WandbLogger":
        return getattr(logger.experiment, "dir", None)
    if type(logger).__name__ in ("CSVLogger", "TensorBoardLogger"):
        return logger.log_dir
    return None


def define_wandb_summaries(loggers: list[Any]) -> None:
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            run = logger.experiment
            for pattern, summary in WANDB_SUMMARIES:
                run.define_metric(pattern, step_metric="trainer/global_step", summary=summary)


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
    return type(logger).__name__ in ("WandbLogger", "TensorBoardLogger")


def heatmap_figure(heads: dict[str, Tensor], step: int) -> Any:
    """Layer x head normalised entropy at one step (NaN where a layer has fewer heads or no valid row)."""
    from matplotlib.figure import Figure

    layers = [key[len(ENTROPY_NORMALIZED) :] for key in heads if key.startswith(ENTROPY_NORMALIZED)]
    width = max(len(heads[ENTROPY_NORMALIZED + layer]) for layer in layers)
    grid = [heads[ENTROPY_NORMALIZED + layer].tolist() + [math.nan] * width for layer in layers]
    figure = Figure(figsize=(1.2 + 0.45 * width, 1.0 + 0.35 * len(layers)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow([row[:width] for row in grid], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(layers)), layers, fontsize=7)
    axes.set_xticks(range(width))
    axes.set_title(f"normalised attention entropy, step {step}", fontsize=9)
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
    for logger in loggers:
        directory = logger_directory(logger)
        if directory is not None and heads:
            write_heads(directory, step, heads)
    images = _images(heads, spectra, step) if any(takes_images(logger) for logger in loggers) else {}
    for logger in loggers:
        kind = type(logger).__name__
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
                    writer.add_histogram(key, values[values.isfinite()], global_step=step)


def _images(heads: dict[str, Tensor], spectra: dict[str, Tensor], step: int) -> dict[str, Any]:
    """This step's heatmap and spectra, each drawn once and rendered to an RGB array that every logger shares."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("geomon: matplotlib is not installed, so no heatmaps or spectra are drawn", stacklevel=3)
        return {}
    images = {}
    if any(key.startswith(ENTROPY_NORMALIZED) for key in heads):
        images["entropy_heatmap"] = render_rgb(heatmap_figure(heads, step))
    if spectra:
        images["spectra"] = render_rgb(spectrum_figure(spectra, step))
    return images
