"""RankMe (Garrido et al., ICML 2023) and alpha-ReQ tracking dimensional collapse in self-supervised training.

Run: ``python examples/ssl_rankme.py`` (about a minute on a laptop CPU; ``--steps 150``: a few seconds a run).
``--figure ssl.png`` draws RankMe and alpha-ReQ of both runs over training.

Two VICReg-style runs (Bardes, Ponce & LeCun, ICLR 2022) on augmented views of scikit-learn's bundled digits
(``load_digits``: 1,797 8 x 8 images, no download). Each image gives two views: shifted by up to one pixel,
rescaled in intensity by 0.6-1.4, plus Gaussian noise (std 0.05). A ``backbone`` MLP ``64 -> 256 -> 256`` and a
``projector`` ``256 -> 512 -> 256`` (linear, batch norm, ReLU; no activation at the end); Adam 1e-3, batches of
256 images (512 views), seed 0. The loss on the two views' embeddings ``z1, z2`` is

- ``no_covariance`` (the collapse): invariance ``25 · mse(z1, z2)`` plus the variance hinge
  ``25 · mean_d relu(1 - std_d(z))`` for each view. Every coordinate keeps its variance, but nothing stops the
  coordinates from copying one another: the embedding collapses onto a few directions (dimensional collapse, the
  ablation in the VICReg paper's Table 5);
- ``vicreg`` (the fix): the same plus VICReg's covariance term ``Σ_{i≠j} cov(z)_ij² / D`` for each view, which
  decorrelates the coordinates.

geomon watches both without labels: ``Monitor(embedding_modules=["backbone", "projector"])`` hooks the two
modules' outputs on every ``--every``-th training step (both views, in training mode) and reports
``geomon/rankme/<module>`` and ``geomon/alpha_req/<module>`` (D = 256 > 100) each time a window of ``4 x D = 1024``
rows is full: a step brings 512 rows, so the window also takes the step before each measured one (a fill step, see
docs/guides/monitoring.md#windows-that-fill) and a value comes every measured step from step 5. The
``rank_collapse`` rule watches them with a floor of 10% of D (``--alert-ratio``; the default rule's 1% is meant for
LM residual streams, and its relative test, half of a running baseline, lets a slow, steady fall like this one
through).

What it printed here (torch 2.x, one CPU thread), RankMe of the first window (steps 0, 4 and 5) -> step 1000:

- projector: ``no_covariance`` 144 -> 6.6, ``vicreg`` 158 -> 82; ``rank_collapse`` fires on the collapse at step
  115 (RankMe 24.9 < 25.6), never on ``vicreg`` (torch 2.14.1, re-run on 2026-12-06: ``no_covariance`` 144 -> 6.8,
  firing at step 120 with RankMe 24.6, ``vicreg`` 158 -> 81.4);
- projector alpha-ReQ: ``no_covariance`` 1.28 -> 0.77 (0.80 on torch 2.14.1), ``vicreg`` 1.30 -> 3.09. Read with
  care: the fit starts at rank 11, beyond the handful of directions the collapsed embedding has left, so it sees a
  flat noise floor (small alpha) where the healthy run has a steep, still-informative decay. alpha-ReQ does not
  see this collapse; RankMe, which weighs the top directions most, does;
- backbone: ``no_covariance`` 182 -> 128, ``vicreg`` 183 -> 157: the collapse is mostly in the projector (as Jing
  et al., ICLR 2022, found for contrastive learning); the backbone, which a linear probe reads, loses less.

An invariance-only loss (no variance term either) collapses completely instead: the embeddings shrink onto one
point. Uncentred RankMe is scale-free and reads that as the mean direction taking over, so it falls slowly
(166 -> 78 in 600 steps); the dimensional collapse above is the case RankMe was made for.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomon import Monitor
from geomon.alerts import NonFinite, RankCollapse

#: run name -> covariance term on
RUNS = {"no_covariance": False, "vicreg": True}
PROBES = ("projector", "backbone")
INVARIANCE, VARIANCE, COVARIANCE = 25.0, 25.0, 1.0


def load_images() -> Tensor:
    """scikit-learn's bundled digits as images ``[1797, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """One random view per image: shift by up to one pixel (zero fill), rescale the intensity, add noise."""
    n = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = (torch.randint(0, 3, (n,), generator=generator) for _ in range(2))
    grid = torch.arange(8)
    rows = (dy[:, None] + grid).view(n, 1, 8, 1).expand(n, 1, 8, 10)
    view = padded.gather(2, rows)
    cols = (dx[:, None] + grid).view(n, 1, 1, 8).expand(n, 1, 8, 8)
    view = view.gather(3, cols) * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator))
    return (view + 0.05 * torch.randn(view.shape, generator=generator)).flatten(1)


class Encoder(nn.Module):
    def __init__(self, width: int = 256, hidden: int = 512, dim: int = 256) -> None:
        super().__init__()

        def block(n_in: int, n_out: int) -> list[nn.Module]:
            return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU()]

        self.backbone = nn.Sequential(*block(64, width), *block(width, width))
        self.projector = nn.Sequential(*block(width, hidden), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


def vicreg_loss(z1: Tensor, z2: Tensor, covariance: bool) -> Tensor:
    """Invariance + variance hinge (+ covariance) of VICReg on the two views' embeddings ``[B, D]``."""
    loss = INVARIANCE * F.mse_loss(z1, z2)
    for z in (z1, z2):
        loss = loss + VARIANCE * F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()
        if covariance:
            centred = z - z.mean(dim=0)
            cov = centred.T @ centred / (z.shape[0] - 1)
            loss = loss + COVARIANCE * (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    return loss


def train(name: str, args: argparse.Namespace, images: Tensor) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = Encoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # a stricter floor than the default rule's 1% of D (made for LM residual streams): RankMe below 10% of an SSL
    # embedding's width is worth an alert; the default relative rule (half the running baseline) stays on
    rules = [RankCollapse(min_ratio=args.alert_ratio), NonFinite()]
    monitor = Monitor(every_n_steps=args.every, attention=False, head=None, embedding_modules=list(PROBES),
                      alerts=rules)  # fmt: skip
    monitor.attach(model)
    generator = torch.Generator().manual_seed(args.seed)  # the example's own stream: batches and augmentations
    history: dict[str, list[tuple[int, float]]] = {}
    alerts: list[tuple[int, str, str]] = []
    losses = []
    for step in range(args.steps + 1):
        batch = images[torch.randint(0, len(images), (args.batch,), generator=generator)]
        views = torch.cat([augment(batch, generator), augment(batch, generator)])
        with monitor.step(step):
            z = model(views)
        loss = vicreg_loss(*z.chunk(2), covariance=RUNS[name])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if monitor.is_scheduled(step):
            for key, value in monitor.compute(step).items():
                if key.startswith(("geomon/rankme/", "geomon/alpha_req/")):
                    history.setdefault(key, []).append((step, float(value)))
            alerts += [(event.step, event.rule, event.key) for event in monitor.events if event.kind == "fired"]
    return {"history": history, "alerts": alerts, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def draw(results: dict[str, dict[str, Any]], path: Path) -> None:
    """RankMe (left) and alpha-ReQ (right) of the projector output, both runs per axis, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, sharex=True)
    colours = {"no_covariance": "tab:red", "vicreg": "tab:blue"}
    labels = {"no_covariance": "no covariance term (collapses)", "vicreg": "VICReg (with covariance term)"}
    for name, result in results.items():
        for probe, style in (("projector", "-"), ("backbone", "--")):
            for ax, metric in ((left, "rankme"), (right, "alpha_req")):
                points = [(s, v) for s, v in result["history"].get(f"geomon/{metric}/{probe}", []) if math.isfinite(v)]
                if points:
                    ax.plot(*zip(*points, strict=True), style, color=colours.get(name),
                            label=f"{labels.get(name, name)}, {probe}")  # fmt: skip
        for step in sorted({s for s, rule, key in result["alerts"] if rule == "rank_collapse"})[:1]:
            left.axvline(step, color=colours.get(name), linestyle=":", linewidth=1,
                         label=f"rank_collapse alert ({name}), step {step}")  # fmt: skip
    left.set_yscale("log")
    left.set_title("RankMe (effective rank, of D = 256)", fontsize=10)
    left.set_ylabel("RankMe (log scale)")
    right.set_title("alpha-ReQ (eigenvalue decay over ranks 11-100)", fontsize=10)
    right.set_ylabel("alpha")
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=7)
    figure.suptitle("Dimensional collapse in a VICReg-style run on sklearn digits (geomon.Monitor)", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, pil_kwargs={"optimize": True})


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps a run (1000; 150 is a quick look)")
    parser.add_argument("--every", type=int, default=5, help="measure every N steps (a value each time)")
    parser.add_argument("--batch", type=int, default=256, help="images a step (two views each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--alert-ratio", type=float, default=0.1, help="rank_collapse when RankMe < ratio x D")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for this model)")
    parser.add_argument("--figure", type=Path, help="write a PNG of RankMe and alpha-ReQ over training here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    images = load_images()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = {name: train(name, args, images) for name in args.runs}
    finally:
        torch.set_num_threads(threads)
    if not args.quiet:
        print(f"{'run':<15}{'probe':<11}{'RankMe first -> last':>22}{'alpha-ReQ first -> last':>26}  rank_collapse")
        for name, result in results.items():
            history = result["history"]
            for probe in PROBES:
                rank = history[f"geomon/rankme/{probe}"]
                alpha = history.get(f"geomon/alpha_req/{probe}", [(0, math.nan)])
                fired = [s for s, rule, key in result["alerts"] if rule == "rank_collapse" and key.endswith(probe)]
                print(f"{name:<15}{probe:<11}{rank[0][1]:>10.1f} -> {rank[-1][1]:>7.1f}"
                      f"{alpha[0][1]:>14.2f} -> {alpha[-1][1]:>7.2f}  {fired[0] if fired else 'none'}")  # fmt: skip
    if args.figure is not None:
        draw(results, args.figure)
        if not args.quiet:
            print(f"figure: {args.figure}")
    return results


if __name__ == "__main__":
    main()
