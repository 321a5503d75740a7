"""Quickstart: watch a small GPT's geometry while Lightning trains it, with ``GeomonCallback()`` and a CSV log.

Run: ``python examples/quickstart.py`` (300 steps of 16 x 64 characters, about three minutes on a 2-core CPU;
``--steps 20 --every 10`` for seconds; ``--wandb`` adds an offline W&B run). It trains a character-level GPT
(``geomon._tiny_gpt.TinyGPT``: 2 layers, 4 heads, d_model 128, context 64) on Python's own documentation text,
which ships with Python, so nothing is downloaded.

What to look at: ``<out>/csv/version_*/metrics.csv``, one row per logged step, a column per key:

- ``geomon/attention/entropy/model.blocks.{0,1}.attn``: attention entropy in nats, between 0 (every query looks at one
  key) and ``log n`` (uniform over the ``n`` keys it may see; causal, so at most ``log 64``), and
  ``entropy_normalized`` (divided by ``log n``: 1 = uniform), ``max_logit``;
- ``geomon/rankme/model.head.input``: effective rank of the features entering the output head (1 to 128), and
  ``alpha_req``, the decay of their spectrum;
- ``geomon/nc/*/model.head.input``: neural collapse of those features against the next character (labels are the
  batch's targets);
- ``geomon/spectral/logit_sigma/*``, ``geomon/alerts/*``: the logit maps' spectral norms; how often each alert rule
  fired.

``geomon report <out>`` draws them; ``geomon inspect examples/quickstart.py:build_model`` lists what the callback
watches on this model and what it costs, without training.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from geomon import GeomonCallback
from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch

TEXT = load_corpus()
TOKENIZER = CharTokenizer(TEXT)


def build_model() -> TinyGPT:
    """The model (a factory with no arguments, so that ``geomon inspect`` can build it too)."""
    return TinyGPT(vocab_size=len(TOKENIZER), d_model=128, n_layer=2, n_head=4, context=64)


class Windows(torch.utils.data.IterableDataset):
    """Endless random windows of the corpus and their next-character targets: ``(x, y)`` batches."""

    def __init__(self, batch_size: int, context: int, seed: int) -> None:
        self.data, self.batch_size, self.context, self.seed = TOKENIZER.encode(TEXT), batch_size, context, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield random_batch(self.data, self.batch_size, self.context, generator)


class CharGPT(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.model, self.lr = build_model(), lr

    def training_step(self, batch, batch_idx):
        x, y = batch  # GeomonCallback takes y as the labels of neural collapse (default_labels)
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Lightning + GeomonCallback on a small GPT (CPU).")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="measure every N steps (GeomonCallback's default)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--wandb", action="store_true", help="also log to an offline W&B run (needs wandb)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    module = CharGPT(args.lr)
    loggers = [pl.loggers.CSVLogger(args.out, name="csv")]
    if args.wandb:
        loggers.append(pl.loggers.WandbLogger(project="geomon-quickstart", save_dir=str(args.out), offline=True))
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[GeomonCallback(every_n_steps=args.every)],  # everything else at its default
        logger=loggers,
        log_every_n_steps=min(10, args.steps),
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(Windows(args.batch_size, module.model.context, args.seed), batch_size=None)
    trainer.fit(module, loader)

    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("geomon/")}
    csv = Path(loggers[0].log_dir) / "metrics.csv"
    print(f"\ngeomon values measured at step {trainer.global_step - 1 - (trainer.global_step - 1) % args.every}:")
    for key in sorted(values):
        print(f"  {key:<58} {values[key]:.4f}")
    print(f"\nevery measured step is in {csv} (one column per key); `geomon report {args.out}` draws them")
    if args.wandb:
        print(f"offline W&B run: {loggers[1].experiment.dir} (`wandb sync` uploads it)")
        loggers[1].experiment.finish()
    return {"values": values, "csv": csv, "log_dir": Path(loggers[0].log_dir), "context": module.model.context,
            "loss": float(trainer.callback_metrics.get("train_loss", math.nan))}  # fmt: skip


if __name__ == "__main__":
    main()
