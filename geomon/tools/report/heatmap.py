"""Layer x head heatmaps of normalised attention entropy, from the ``geomon_heads.csv`` sidecar."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geomon.tools.report.keys import NORMALIZED
from geomon.tools.report.run import RunData, natural_key

HEAD_KEY = NORMALIZED  #: per-head rows of the normalised entropy


def head_steps(run: RunData) -> list[int]:
    """The steps at which the sidecar holds per-head normalised entropy."""
    return sorted({step for step, key, _, _ in run.heads if key.startswith(HEAD_KEY)})


def nearest(present: Sequence[int], wanted: int) -> int:
    """The present step closest to ``wanted`` (the earlier one on a tie).

    Example:
        >>> nearest([0, 10, 20], 14), nearest([0, 10, 20], 15), nearest([0, 10, 20], 99)
        (10, 10, 20)
    """
    return min(present, key=lambda step: (abs(step - wanted), step))


def heatmap_steps(run: RunData, wanted: Sequence[int] | None = None) -> list[tuple[int, int | None]]:
    """The heatmap panels: ``(step, requested)`` pairs, ``requested`` set where the nearest step was used instead.

    Without ``wanted``: the first, middle and last step present (fewer if fewer are present).
    """
    present = head_steps(run)
    if not present:
        return []
    if not wanted:
        picks = sorted({present[0], present[len(present) // 2], present[-1]})
        return [(step, None) for step in picks]
    chosen: dict[int, int | None] = {}
    for step in wanted:
        found = nearest(present, step)
        chosen.setdefault(found, None if found == step else step)
    return sorted(chosen.items())


def head_matrix(
    run: RunData, step: int, modules: list[str] | None = None, n_heads: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Module names (depth order) and the [module, head] matrix of normalised entropy at ``step`` (NaN: missing).

    ``modules`` and ``n_heads`` fix the rows and columns (to share them between panels); by default they are the
    ones present at ``step``.
    """
    cells = {
        (key[len(HEAD_KEY) :], head): value
        for s, key, head, value in run.heads
        if s == step and key.startswith(HEAD_KEY)
    }
    modules = modules if modules is not None else sorted({module for module, _ in cells}, key=natural_key)
    n_heads = n_heads if n_heads is not None else max((head + 1 for _, head in cells), default=0)
    matrix = np.full((len(modules), n_heads), np.nan)
    rows = {module: i for i, module in enumerate(modules)}
    for (module, head), value in cells.items():
        if module in rows and head < n_heads:
            matrix[rows[module], head] = value
    return modules, matrix


def head_heatmap(run: RunData, chosen: list[tuple[int, int | None]]) -> object:
    """One panel per chosen step (rows: modules by depth, columns: heads), shared colour bar 0..1."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    steps = {step for step, _ in chosen}
    cells = [(key[len(HEAD_KEY) :], head) for s, key, head, _ in run.heads if s in steps and key.startswith(HEAD_KEY)]
    modules = sorted({module for module, _ in cells}, key=natural_key)
    n_modules, n_heads = len(modules), max(head for _, head in cells) + 1
    matrices = [head_matrix(run, step, modules, n_heads) for step, _ in chosen]
    width = min(20.0, 2.5 + len(chosen) * max(2.5, 0.35 * n_heads) + 2.0)
    figure = Figure(figsize=(width, max(3.5, 1.5 + 0.3 * n_modules)), layout="constrained")
    axes = figure.subplots(1, len(chosen), squeeze=False)[0]
    cmap = colormaps["magma"].with_extremes(bad="#d8d8d8")
    image = None
    for ax, (step, requested), (modules, matrix) in zip(axes, chosen, matrices, strict=True):
        image = ax.imshow(
            np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto", interpolation="nearest"
        )
        ax.set_title(f"step {step}" + (f" (nearest to {requested})" if requested is not None else ""))
        ax.set_xlabel("head")
        ax.set_xticks(range(0, matrix.shape[1], matrix.shape[1] // 17 + 1))
        rows = list(range(0, len(modules), len(modules) // 25 + 1))  # thin the labels of deep models
        ax.set_yticks(rows, [modules[i] for i in rows])
        if ax is not axes[0]:
            ax.tick_params(labelleft=False)
    axes[0].set_ylabel("layer (module)")
    figure.colorbar(image, ax=list(axes), label="normalised entropy (0 = one token, 1 = uniform)")
    figure.suptitle("Per-head normalised attention entropy")
    return figure
