"""geomon in a 2-process Lightning DDP run on a CPU (gloo): what each rank measures, what rank zero logs.

Run: ``python examples/ddp.py`` (200 steps: about 15 s on a 2-core CPU; ``--steps 4 --every 2`` for a quick look).
``--devices 1`` runs the same fit in one process: with the same ``--global-batch`` it logs the same values.

A character-level GPT (``geomon._tiny_gpt.TinyGPT`` on Python's documentation text) trains with
``Trainer(strategy="ddp", accelerator="cpu", devices=2)``; Lightning starts the second process by running this
script again, and the two join a gloo process group. Every ``--every`` steps ``GeomonCallback``:

1. captures, on each rank, that rank's half of the global batch: the attention of both layers, the features entering
   the output head (RankMe; neural collapse against the next-character labels) and the output of ``model.ln_f``;
2. computes on every rank (a collective): the statistics are summed over the ranks first, so the values are those
   of the whole global batch, identical on both ranks; σ(W) of the chosen weights needs no communication (every DDP
   rank holds the whole weight);
3. logs from rank zero (here to a CSV file; the rows are printed at the end).

Rank ``r`` reads rows ``[r·B/2, (r+1)·B/2)`` of each global batch of ``B`` windows (``use_distributed_sampler=False``
and a per-rank slice), so a one-process run on the same global batches sees the same rows: its logged values are
the same up to floating-point rounding (tests/test_examples_distributed.py checks this).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import warnings
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch
from geomon.callback import GeomonCallback


class CharGPT(pl.LightningModule):
    """The GPT and its data: ``steps`` global batches drawn up front, each rank taking its slice of every one."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        text = load_corpus()
        self.tokens = CharTokenizer(text).encode(text)
        torch.manual_seed(args.seed)
        self.model = TinyGPT(len(CharTokenizer(text)), d_model=args.d_model, n_layer=2, n_head=4, context=args.context)

    def train_dataloader(self) -> Any:
        world, rank = self.trainer.world_size, self.global_rank
        if self.args.global_batch % world:
            raise ValueError(f"--global-batch {self.args.global_batch} does not split over {world} processes")
        per_rank = self.args.global_batch // world
        generator = torch.Generator().manual_seed(self.args.seed)
        batches = [random_batch(self.tokens, self.args.global_batch, self.args.context, generator)
                   for _ in range(self.args.steps)]  # fmt: skip
        x = torch.cat([x[rank * per_rank : (rank + 1) * per_rank] for x, _ in batches])
        y = torch.cat([y[rank * per_rank : (rank + 1) * per_rank] for _, y in batches])
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=per_rank)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("loss", loss, sync_dist=True)  # the mean over the ranks: the loss of the global batch
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.args.lr)


def read_logged(directory: Path) -> dict[tuple[int, str], float]:
    """``{(step, key): value}`` of every ``geomon/`` value in a CSVLogger's ``metrics.csv``."""
    with open(directory / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {(int(row["step"]), key): float(value) for row in rows for key, value in row.items()
            if key.startswith("geomon/") and value}  # fmt: skip


def show(logged: dict[tuple[int, str], float]) -> None:
    """One block per logged step: the values under short names."""
    for step in sorted({step for step, _ in logged}):
        print(f"step {step}")
        for (at, key), value in sorted(logged.items()):
            if at == step:
                print(f"  {key.removeprefix('geomon/'):<58} {value:.5g}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="processes (1: the same fit without DDP)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--every", type=int, default=20, help="measure every this many steps")
    parser.add_argument("--global-batch", type=int, default=32, help="windows per step over all processes")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="log directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    # Lightning runs this script again for rank 1 with the same arguments: both ranks must log to the same place
    out = args.out or Path(os.environ.setdefault("GEOMON_DDP_EXAMPLE_OUT", mkdtemp(prefix="geomon-ddp-")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))  # one process per core share
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory
    callback = GeomonCallback(
        every_n_steps=args.every,
        embedding_modules=["model.ln_f"],
        spectral_modules=["model.blocks.*.attn.qkv", "model.head"],
        window_rows=args.global_batch * args.context,  # RankMe and neural collapse report on every measured step
    )
    logger = pl.loggers.CSVLogger(out, name="ddp" if args.devices > 1 else "single", version=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",  # gloo: Lightning's choice for CPU processes
        max_steps=args.steps,
        logger=logger,
        callbacks=[callback],
        use_distributed_sampler=False,  # each rank takes its own slice (train_dataloader)
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(CharGPT(args))
    if not trainer.is_global_zero:
        return {}
    logged = read_logged(Path(logger.log_dir))
    show(logged)
    # nc4 compares a window's class means with the previous window's: the first window has none (not logged)
    odd = sorted({key for (_, key), value in logged.items() if not math.isfinite(value)})
    print(f"{len(logged)} values logged by rank zero of {trainer.world_size} processes; not finite: {odd or 'none'}")
    print(f"log: {logger.log_dir}/metrics.csv")
    return {"logged": logged, "log_dir": Path(logger.log_dir), "world_size": trainer.world_size}


if __name__ == "__main__":
    main()
