"""Neural collapse (Papyan, Han & Donoho 2020) in the terminal phase of training, watched by geomon.

Run: ``python examples/neural_collapse.py`` (under a minute on a laptop CPU; ``--epochs 20``: a few seconds).
``--figure nc.png`` draws the NC curves over training.

A small classifier is trained far past zero training error on scikit-learn's bundled handwritten digits
(``load_digits``: 1,797 8 x 8 images, 10 classes, no download): an MLP body ``64 -> 256 -> 256 -> 64`` (linear,
batch norm, ReLU) and a linear ``classifier`` head. SGD with momentum 0.9, learning rate 0.01 on a cosine schedule,
weight decay 1e-2, batches of 128, seed 0. Weight decay and batch norm matter: in a trial without batch norm (weight
decay 5e-4) NC1 stalled near 0.4.

``geomon.Monitor(neural_collapse=True)`` finds the head by its name and measures the features entering it. Every
``--every`` epochs the whole training set goes through the model once in eval mode inside ``monitor.step(epoch,
labels=y)`` (Papyan et al. measure on the training set after an epoch; one pass is one window of ``N`` rows),
and ``monitor.compute()`` returns ``geomon/nc/<stat>/classifier.input``. ``nc4`` compares the classifier with the
class means of the previous measurement, so the first one has none.

What it printed here (torch 2.x, one CPU thread), epoch 0 -> 20 -> 200:

- training error 90% -> 0.06% -> 0 (a few samples come and go until epoch 145, zero from then on);
- ``nc1`` (within-class spread against between-class spread) 1.68 -> 0.067 -> 0.027;
- ``nc2_equinorm`` 0.23 -> 0.072 -> 0.053 and ``nc2_equiangular`` 0.30 -> 0.083 -> 0.057: the centred class means
  approach a simplex equiangular tight frame (equal norms, every pairwise cosine -1/9);
- ``nc3`` (classifier rows against class means, 0 = self-dual) 2.02 -> 0.15 -> 0.030;
- ``nc4`` (classifier decision differs from the nearest class centre) 0.59 at epoch 5 -> 0 from epoch 15 on
  (a few samples now and then until the terminal phase).

Re-run on torch 2.14.1 (2026-12-06, the figure in docs/figures/nc_digits.png): ``nc1`` 1.68 -> 0.067 -> 0.029,
``nc2_equinorm`` 0.23 -> 0.072 -> 0.048, ``nc2_equiangular`` 0.30 -> 0.083 -> 0.050, ``nc3`` 2.02 -> 0.15 -> 0.029;
``nc4`` 0.59 at epoch 5, at most 0.005 (9 samples, epoch 75) from epoch 15 on, 0 from epoch 145 on.

The first few epochs do most of it; the terminal phase keeps shrinking NC1 and NC3 while the training error is
already zero, as Papyan et al. observed.

Alert rules are off (``alerts=()``): neural collapse concentrates the head's input onto a few directions on
purpose (the ``C - 1 = 9`` of the class-mean frame plus the mean), which is not an incident here. The monitor also
reports RankMe of that input (last column): 18 at initialisation, 36 after five epochs, 22 at the end.
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

#: The NC statistics the example follows (METRICS.md §6), in the order they are printed and drawn.
STATS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4")
HEAD = "classifier"


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as ``(x [1797, 64] in [0, 1], y [1797])``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target, dtype=torch.long)


def make_model(width: int = 256, features: int = 64, classes: int = 10) -> nn.Sequential:
    def block(n_in: int, n_out: int) -> list[nn.Module]:
        return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU()]

    model = nn.Sequential()
    model.add_module("body", nn.Sequential(*block(64, width), *block(width, width), *block(width, features)))
    model.add_module(HEAD, nn.Linear(features, classes))
    return model


def measure(model: nn.Module, monitor: Monitor, epoch: int, x: Tensor, y: Tensor) -> dict[str, float]:
    """One eval-mode pass over the training set inside ``monitor.step``: the NC values and the training error."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), monitor.step(epoch, labels=y):
        logits = model(x)
    model.train(was_training)
    values = monitor.compute()
    # nc4 is not logged in the first window (no previous class means): nan here
    row = {stat: float(values.get(f"geomon/nc/{stat}/{HEAD}.input", math.nan)) for stat in STATS}
    row["rankme"] = float(values[f"geomon/rankme/{HEAD}.input"])
    row["train_error"] = float((logits.argmax(dim=1) != y).float().mean())
    row["train_loss"] = float(F.cross_entropy(logits, y))
    row["epoch"] = epoch
    return row


def train(args: argparse.Namespace) -> list[dict[str, float]]:
    x, y = load_digits_tensors()
    torch.manual_seed(args.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(x) / args.batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    # every monitor.step is a measurement pass (the loop below picks the epochs): one pass over the training set =
    # one window; the head is found by its name
    monitor = Monitor(every_n_steps=1, attention=False, neural_collapse=True, window_rows=len(x), alerts=())
    monitor.attach(model)
    assert monitor.head == HEAD
    generator = torch.Generator().manual_seed(args.seed)  # the example's own stream for the batch order
    history = []
    for epoch in range(args.epochs + 1):
        if epoch % args.every == 0 or epoch == args.epochs:
            history.append(measure(model, monitor, epoch, x, y))
            if not args.quiet:
                row = history[-1]
                print(f"{epoch:>6}{row['train_error']:>8.4f}{row['train_loss']:>10.2e}"
                      + "".join(f"{row[stat]:>10.4f}" for stat in STATS) + f"{row['rankme']:>8.2f}")  # fmt: skip
        if epoch == args.epochs:
            break
        for index in torch.randperm(len(x), generator=generator).split(args.batch):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return history


def terminal_phase_start(history: list[dict[str, float]]) -> float | None:
    """The first measured epoch from which the training error stays zero (the terminal phase), if any."""
    start = None
    for row in history:
        start = (row["epoch"] if start is None else start) if row["train_error"] == 0 else None
    return start


def draw(history: list[dict[str, float]], path: Path) -> None:
    """NC1-NC4 and the training error over epochs, 2 x 2 panels, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    zero_error = terminal_phase_start(history)
    figure = Figure(figsize=(8.6, 5.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    panels = [
        ("NC1: within- vs between-class variability", [("nc1", "nc1 (Tr(Σ_W Σ_B⁺) / C)")], True),
        ("NC2: class means -> simplex ETF", [("nc2_equinorm", "equinorm (std/mean of norms)"),
                                              ("nc2_equiangular", "equiangular (std of cosines)"),
                                              ("nc2_maxangle", "maxangle (mean |cos + 1/(C-1)|)")], True),
        ("NC3: classifier rows vs class means", [("nc3", "nc3 (0 = self-dual)")], True),
        ("NC4: classifier vs nearest class centre", [("nc4", "nc4 (fraction where they disagree)"),
                                                      ("train_error", "training error")], False),
    ]  # fmt: skip
    for ax, (title, series, log) in zip(axes, panels, strict=True):
        for key, label in series:
            points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if math.isfinite(row[key])]
            ax.plot(*zip(*points, strict=True), label=label)
        if log:
            ax.set_yscale("log")
        else:  # fractions that reach exactly 0: linear below 1e-3, logarithmic above
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
        if zero_error is not None:
            ax.axvline(zero_error, color="grey", linestyle=":", linewidth=1, label="terminal phase (error 0 from here)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both" if log else "major")
        ax.legend(fontsize=7)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("value (log scale)")
    axes[2].set_ylabel("value (log scale)")
    axes[3].set_ylabel("fraction of training samples (symlog)")
    figure.suptitle("Neural collapse of an MLP on sklearn digits (geomon.Monitor, head 'classifier')", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, pil_kwargs={"optimize": True})


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200, help="training epochs (200; 20 is a quick look)")
    parser.add_argument("--every", type=int, default=5, help="measure every N epochs (and after the last)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for this model)")
    parser.add_argument("--figure", type=Path, help="write a PNG of the NC curves here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if not args.quiet:
        print(f"{'epoch':>6}{'error':>8}{'loss':>10}" + "".join(f"{s.replace('nc2_', ''):>10}" for s in STATS)
              + f"{'rankme':>8}")  # fmt: skip
    try:
        history = train(args)
    finally:
        torch.set_num_threads(threads)
    if args.figure is not None:
        draw(history, args.figure)
        if not args.quiet:
            print(f"figure: {args.figure}")
    return history


if __name__ == "__main__":
    main()
