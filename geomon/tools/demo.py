"""geomon's main job: a real monitored training run on the CPU, logged to local trackers, summarised at the end.

``geomon demo`` (or ``python -m geomon.tools.demo``; ``make demo``) trains a small character GPT on Python's own
documentation text with Lightning and :class:`geomon.GeomonCallback`, every probe on: attention entropy, normalised
entropy and max logit per layer (per head as media), RankMe / alpha-ReQ and neural collapse of the features entering
the output head, σ(W) and stable rank of the attention qkv projections and the head. Values go to a CSV log and,
when installed, TensorBoard and an offline W&B run under ``--out``; the run ends with a per-layer table and, when
the ``report`` module is available, an HTML report.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from geomon import keys
from geomon._media import logger_kind
from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch


def _lightning() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as error:
            raise SystemExit("geomon demo needs Lightning: pip install 'geomon[cli]'") from error
    return pl


class CorpusWindows(torch.utils.data.IterableDataset):
    """Endless random windows of the corpus and their next-character targets, from a private generator."""

    def __init__(self, data: Tensor, context: int, batch: int, seed: int) -> None:
        self.data, self.context, self.batch, self.seed = data, context, batch, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield random_batch(self.data, self.batch, self.context, generator)


def build_module(pl: Any, vocab: int, lr: float) -> Any:
    class CharGPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyGPT(vocab)
            self.lr = lr

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

    return CharGPT()


def make_loggers(pl: Any, out: Path, wandb: bool) -> list[Any]:
    loggers = [pl.loggers.CSVLogger(out, name="csv")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(pl.loggers.TensorBoardLogger(out, name="tensorboard"))
    if wandb and importlib.util.find_spec("wandb"):
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(pl.loggers.WandbLogger(project="geomon-demo", save_dir=str(out), offline=True))
    return loggers


def summary_rows(values: dict[str, float]) -> list[tuple[str, ...]]:
    """Per attention layer: entropy, normalised entropy, max logit, σ(W_qkv); then each RankMe probe."""
    prefix = keys.prefix(keys.ENTROPY)
    rows = []
    for key in sorted(k for k in values if k.startswith(prefix)):
        layer = key[len(prefix) :]
        sigma = values.get(keys.key(keys.SIGMA, f"{layer}.qkv"), math.nan)
        rows.append((layer, f"{values[key]:.3f}", f"{values[keys.key(keys.ENTROPY_NORMALIZED, layer)]:.3f}",
                     f"{values[keys.key(keys.MAX_LOGIT, layer)]:.2f}", f"{sigma:.2f}"))  # fmt: skip
    return rows


def print_summary(values: dict[str, float], step: int) -> None:
    header = ("layer", "entropy (nats)", "normalised", "max logit", "σ(W_qkv)")
    rows = summary_rows(values)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"attention geometry at step {step}")
        for column in header:
            table.add_column(column, justify="left" if column == "layer" else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    except ImportError:
        print(f"attention geometry at step {step}")
        for row in (header, *rows):
            print("  " + "".join(f"{cell:>16}" for cell in row))
    for key in sorted(k for k in values if k.startswith((keys.prefix(keys.RANKME), keys.prefix(keys.ALPHA_REQ)))):
        print(f"{key}: {values[key]:.3f}")
    nc_prefix = keys.ROOT + keys.nc("")  # geomon/nc/<stat>/<probe>
    nc = {keys.split(k)[0].removeprefix(keys.nc("")): v for k, v in values.items() if k.startswith(nc_prefix)}
    if nc:
        print("neural collapse: " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(nc.items())))
    print(alerts_line(values))


def alerts_line(values: dict[str, float]) -> str:
    """What the alert rules fired over the run (their ``geomon/alerts/<rule>`` counters), and where to read them."""
    alert_prefix = keys.prefix(keys.ALERTS)
    fired = {k.removeprefix(alert_prefix): int(v) for k, v in values.items() if k.startswith(alert_prefix) and v > 0}
    if not fired:
        return "alerts: none fired"
    counts = ", ".join(f"{rule} x{n}" for rule, n in sorted(fired.items()))
    return f"alerts fired: {counts} (which heads and when: geomon_alerts.csv beside the CSV logs, and the report)"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="geomon demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--every", type=int, default=50, help="measure every N steps (default 50)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the logs go (default runs/demo)")
    parser.add_argument("--no-wandb", action="store_true", help="do not write an offline W&B run")
    parser.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("steps", "every", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer")

    pl = _lightning()
    from geomon.callback import GeomonCallback

    torch.manual_seed(args.seed)
    text = load_corpus()
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    module = build_module(pl, len(tokenizer), args.lr)
    callback = GeomonCallback(every_n_steps=args.every, spectral_modules=["model.blocks.*.attn.qkv", "model.head"])
    loggers = make_loggers(pl, args.out, wandb=not args.no_wandb)
    trainer = pl.Trainer(
        max_steps=args.steps, max_epochs=1, logger=loggers, callbacks=[callback], accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.quiet,
        log_every_n_steps=min(10, args.steps),
    )  # fmt: skip
    # endless windows: the run is max_steps long, in one epoch (the progress bar reads "Epoch 0/0", not "0/-2")
    loader = torch.utils.data.DataLoader(CorpusWindows(data, module.model.context, args.batch, args.seed), None)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"training a {n_params / 1e3:.0f}k-parameter GPT on {len(text) / 1e3:.0f} kB of text, measuring every "
          f"{args.every} steps")  # fmt: skip
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|does not have many workers).*")
        trainer.fit(module, loader)
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if keys.is_geomon(k)}
    values["train_loss"] = float(trainer.callback_metrics.get("train_loss", math.nan))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; train loss {values['train_loss']:.3f}")
    measured = (trainer.global_step - 1) // args.every * args.every  # the last step measured: the values' step
    print_summary(values, measured)
    print("\nwhere to look:")
    for logger in loggers:
        if logger_kind(logger) == "WandbLogger":
            run_dir = Path(logger.experiment.dir).parent
            logger.experiment.finish()
            print(f"  {'W&B (offline)':<18} {run_dir}  (wandb sync {run_dir} uploads it)")
        else:
            print(f"  {type(logger).__name__:<18} {logger.log_dir}")
    if not args.no_report and importlib.util.find_spec("matplotlib"):
        from geomon.tools.report import build_report

        report = build_report(loggers[0].log_dir, Path(args.out) / "report", progress=not args.quiet)
        print(f"  report             {report.html} ({len(report.figures)} figures)")
    return values


if __name__ == "__main__":
    main()
