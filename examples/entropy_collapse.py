"""Attention-entropy collapse (Zhai et al., ICML 2023) reproduced on a CPU, caught by geomon, prevented by σReparam.

Run: ``python examples/entropy_collapse.py`` (about two minutes on a laptop CPU; ``--fast``: a few seconds a run).
``--figure entropy.png`` draws the normalised attention entropy and the max attention logit of every layer over
training for the runs, with the first alert and the loss spike marked.
Three Lightning fits of the same character-level GPT (``geomon._tiny_gpt.TinyGPT``: d_model 64, 2 layers, 4 heads,
context 32, on Python's documentation text; Adam, constant learning rate, no warm-up, batch 32, seed 0), each with
``GeomonCallback(every_n_steps=10)`` and geomon's default alert rules, logging to CSV and, when wandb is installed,
to an offline W&B run:

1. ``collapse``: learning rate 3e-2. Attention logits grow fast (max logit > 100 by step 50), heads go one-hot
   (normalised entropy -> 0): geomon fires ``entropy_collapse`` within the first 100 steps, ERROR once most heads
   are gone; the model keeps learning slowly until the loss spikes, more than a thousand steps later.
2. ``sigma_reparam``: the same model and learning rate, its attention and MLP linears converted with
   :func:`geomon.reparam.sigma_reparam` (Ŵ = γ W / σ(W)). With Adam, a weight matrix's spectral norm can grow by
   up to about ``lr x sqrt(rows x cols)`` a step, the scalar γ only by about ``lr``: the logits stay bounded.
   The output head is left alone: it does not feed attention, and its logits over the vocabulary must be free to
   sharpen (the paper's entropy bound is about ``W_Q W_K``; a reparametrised head only slows the fit).
3. ``healthy``: the same model at 1e-3 (nanoGPT's learning rate for its character-level model): no alert.

A loss *spike* is the first step whose mean loss over the last 20 steps is more than 1.2 x the lowest earlier such
mean, or a non-finite loss (single batches are too noisy for a raw-loss rule). Alert steps are read back from the
``geomon_alerts.csv`` the callback writes beside the CSV log (and are in the W&B run as alerts, and in the log).

What it printed here (torch 2.x, one CPU thread; other CPUs and versions may move the steps a little):

- collapse: ``max_logit`` at step 50 (WARN); ``entropy_collapse`` INFO at step 60 (1 of 8 heads below 0.1), grown
  to WARN at 130 (half of layer 1's heads) and ERROR at 450 (4 of 8 heads), layer 0 ERROR at 690; the loss spikes
  at step 1349 (20-step mean from about 1.6 to 2.3); lowest head 0.0001. The same recipe with seed 2
  (``benchmarks/alerts``, scenario ``logit_growth_seed2``) spikes at 974 after WARN at 20 and ERROR at 170.
- sigma_reparam: no alert, lowest head 0.19, no spike, final loss 1.47.
- healthy: no alert, lowest head 0.125, no spike, final loss 1.57.

Reading the levels: a collapsed head is INFO; WARN once half of a layer's heads or a quarter of all heads are
collapsed; ERROR from half of all heads, and an episode that grows fires again at its new level. A character model
grows a sharp head even at a sane learning rate (the healthy run's sharpest head reaches 0.125 at step 1500 and
crosses 0.1 later): one head is worth a look (INFO), not an emergency; a collapse takes most heads, and WARN and
ERROR say so. ``benchmarks/alerts`` measures these defaults on more unstable and healthy runs.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus
from geomon.callback import GeomonCallback
from geomon.reparam import sigma_reparam
from geomon.tools.demo import CorpusWindows

#: run name -> (learning rate, σReparam)
RUNS = {"collapse": (3e-2, False), "sigma_reparam": (3e-2, True), "healthy": (1e-3, False)}
#: σReparam on every linear of the attention and MLP blocks; the head stays a plain nn.Linear (see above).
REPARAM_LAYERS = ["blocks.*.attn.*", "blocks.*.mlp.*"]
ENTROPY_KEY = "geomon/attention/entropy_normalized/"


class CharGPT(pl.LightningModule):
    def __init__(self, model: TinyGPT, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        self.losses: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.losses.append(loss.detach())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)  # constant learning rate, no warm-up


class WorstHead(pl.Callback):
    """After each measurement, the lowest per-head normalised entropy of the model (what the rule compares)."""

    def __init__(self, geomon: GeomonCallback) -> None:
        self.geomon, self.seen, self.values = geomon, None, []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        details = self.geomon.monitor.details
        if details is not self.seen:  # a new compute happened on this step
            self.seen = details
            heads = [value.min() for key, value in details.items() if key.startswith(ENTROPY_KEY)]
            if heads:
                self.values.append(float(torch.stack(heads).min()))


def spike_step(losses: list[float], window: int = 20, ratio: float = 1.2) -> int | None:
    """First step whose ``window``-step mean loss exceeds ``ratio`` x the lowest earlier mean, or is not finite.

    Example:
        >>> spike_step([3.0] * 30 + [5.0] * 30, window=5)
        31
    """
    best = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            return step
        if step + 1 >= window:
            mean = sum(losses[step + 1 - window : step + 1]) / window
            if mean > ratio * best:
                return step
            best = min(best, mean)
    return None


def read_alerts(path: Path) -> list[dict[str, str]]:
    """The fired events in a ``geomon_alerts.csv`` (none when the file was never written)."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["kind"] == "fired"]


def train(name: str, args: argparse.Namespace, data: Tensor, vocab: int) -> dict[str, Any]:
    lr, reparam = RUNS[name]
    torch.manual_seed(args.seed)
    model = TinyGPT(vocab, d_model=64, n_layer=2, n_head=4, context=args.context)
    if reparam:
        sigma_reparam(model, include=REPARAM_LAYERS)  # before the optimizer is built: each layer gains a γ
    module = CharGPT(model, lr)
    # neural collapse of a 100-way character head is beside the point here
    geomon = GeomonCallback(every_n_steps=args.every, on_alert=args.on_alert, neural_collapse=False, media=False)
    worst = WorstHead(geomon)
    loggers: list[Any] = [pl.loggers.CSVLogger(args.out, name=name)]
    if not args.no_wandb and importlib.util.find_spec("wandb"):
        loggers.append(pl.loggers.WandbLogger(project="geomon-examples", name=name, save_dir=str(args.out / name),
                                              offline=True))  # fmt: skip
    trainer = pl.Trainer(
        max_steps=args.steps, logger=loggers, callbacks=[geomon, worst], accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=10,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|does not have many workers).*")
        trainer.fit(module, torch.utils.data.DataLoader(CorpusWindows(data, args.context, args.batch, args.seed), None))
    wandb_run = None
    if len(loggers) > 1:
        wandb_run = next(Path(loggers[1].experiment.dir).parent.glob("run-*.wandb"), None)
        loggers[1].experiment.finish()
    fired = read_alerts(Path(loggers[0].log_dir) / "geomon_alerts.csv")
    losses = torch.stack(module.losses).tolist()
    return {
        "lr": lr,
        "alerts": [(int(row["step"]), row["rule"], row["level"]) for row in fired],
        "entropy_alert_steps": [int(row["step"]) for row in fired if row["rule"] == "entropy_collapse"],
        "spike_step": spike_step(losses),
        "min_entropy": min(worst.values, default=math.nan),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "steps": len(losses),
        "alerts_csv": Path(loggers[0].log_dir) / "geomon_alerts.csv",
        "metrics_csv": Path(loggers[0].log_dir) / "metrics.csv",
        "wandb_run": wandb_run,
    }


def read_curves(path: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """``{module: [(step, value), ...]}`` of the logged keys ``<prefix><module>`` in a Lightning ``metrics.csv``."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith(prefix) and value not in ("", None):
                    curves.setdefault(key[len(prefix) :], []).append((int(row["step"]), float(value)))
    return curves


def draw(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Normalised attention entropy (left), max attention logit (middle) and the logit-map spectral norm (right) per
    layer over steps, every run, as a PNG; the first entropy_collapse alert of each run as a dotted line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right, spectral = figure.subplots(1, 3, sharex=True)
    colours = {"collapse": "tab:red", "sigma_reparam": "tab:blue", "healthy": "tab:green"}
    styles = ["-", "--", "-.", ":"]
    for name, result in results.items():
        label = f"{name} (lr {result['lr']:.0e})"
        panels = (left, ENTROPY_KEY), (right, "geomon/attention/max_logit/"), (spectral, "geomon/spectral/logit_sigma/")
        for ax, prefix in panels:
            for layer, (module, points) in enumerate(sorted(read_curves(result["metrics_csv"], prefix).items())):
                ax.plot(*zip(*points, strict=True), styles[layer % len(styles)], color=colours.get(name),
                        linewidth=1, label=f"{label}, {module.removeprefix('model.')}")  # fmt: skip
        if result["entropy_alert_steps"]:
            step = result["entropy_alert_steps"][0]
            left.axvline(step, color=colours.get(name), linestyle=":", linewidth=1,
                         label=f"{name}: first entropy_collapse alert (step {step})")  # fmt: skip
        if result["spike_step"] is not None:
            spike = result["spike_step"]
            for ax in (left, right, spectral):
                ax.axvline(spike, color=colours.get(name), linestyle=(0, (1, 3)), linewidth=1.5,
                           label=f"{name}: loss spike (step {spike})" if ax is right else None)  # fmt: skip
    left.set_title("mean normalised attention entropy H / log n, per layer", fontsize=10)
    left.set_ylabel("H / log n (1 = uniform, 0 = one-hot)")
    left.set_ylim(0, 1)
    right.set_title("max attention logit, per layer", fontsize=10)
    right.set_ylabel("max logit (log scale)")
    right.set_yscale("log")
    right.axhline(100, color="grey", linewidth=0.8, linestyle="--", label="max_logit rule threshold (100)")
    spectral.set_title("logit-map spectral norm max_h σ(W_Q,hᵀ W_K,h)·scale", fontsize=10)
    spectral.set_ylabel("σ of the applied weights (log scale)")
    spectral.set_yscale("log")
    for ax in (left, right, spectral):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both")
    legend = dict(zip(*reversed(left.get_legend_handles_labels()), strict=True))  # the curves are in both panels
    legend.update(zip(*reversed(right.get_legend_handles_labels()), strict=True))
    figure.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=3, fontsize=7)
    figure.suptitle("Attention-entropy collapse in a character-level GPT: Adam 3e-2 without vs with σReparam, and 1e-3",
                    fontsize=10.5)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    from PIL import Image  # matplotlib's own dependency: a 256-colour palette keeps the PNG small

    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="150 steps a run: the alert, not the later spike")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=10, help="measure every N steps (default 10)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--on-alert", choices=["warn", "stop"], default="warn", help="'stop': end each run at its first alert"
    )
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, default=Path("runs/entropy_collapse"))
    parser.add_argument("--no-wandb", action="store_true", help="do not write offline W&B runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for this model, exact)")
    parser.add_argument(
        "--figure", type=Path, help="write a PNG of entropy, max logit and logit-map σ per layer over steps here"
    )
    args = parser.parse_args(argv)
    if args.fast:
        args.steps = 150
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    text = load_corpus()
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = {name: train(name, args, data, len(tokenizer)) for name in args.runs}
    finally:
        torch.set_num_threads(threads)
    print(f"\n{'run':<14}{'lr':>6}  {'entropy_collapse (step level)':<31}{'other alerts':<24}{'spike':>6}"
          f"{'min H/log n':>13}{'final loss':>12}")  # fmt: skip
    for name, r in results.items():
        entropy = ", ".join(f"{s} {lv}" for s, rule, lv in r["alerts"] if rule == "entropy_collapse") or "none"
        other = ", ".join(f"{rule}@{s}" for s, rule, _ in r["alerts"] if rule != "entropy_collapse") or "none"
        other = other if len(other) < 23 else other[:19] + "..."
        spike = "none" if r["spike_step"] is None else str(r["spike_step"])
        print(f"{name:<14}{r['lr']:>6.0e}  {entropy:<31}{other:<24}{spike:>6}{r['min_entropy']:>13.4f}"
              f"{r['final_loss']:>12.3f}")  # fmt: skip
    print(
        "(steps are global steps; spike: the 20-step mean loss > 1.2 x its lowest earlier value, or non-finite;"
        " min H/log n: the lowest per-head normalised entropy measured)"
    )
    if args.figure is not None:
        draw(results, args.figure)
        print(f"figure: {args.figure}")
    return results


if __name__ == "__main__":
    main()
