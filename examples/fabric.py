"""geomon in a Lightning Fabric loop on a CPU: the monitor attached to what ``fabric.setup`` returns.

Run: ``python examples/fabric.py`` (one process, 100 steps: a few seconds) or ``python examples/fabric.py
--devices 2`` (two processes, ``strategy="ddp"`` over gloo; Fabric starts the second one by running this script
again).

A character-level GPT (``geomon._tiny_gpt.TinyGPT`` on Python's documentation text) trains in a hand-written loop.
``fabric.setup(model, optimizer)`` wraps the model in a ``_FabricModule`` (and, with two processes, the model inside
it in ``DistributedDataParallel``); ``Monitor.attach`` takes that wrapper and watches the model inside it, so the keys
name the modules as on the GPT itself (``geomon/attention/entropy/blocks.0.attn``, never
``_forward_module.module.blocks.0.attn``). Every ``--every`` steps every rank calls ``monitor.compute(step)`` (a
collective: the statistics of the whole global batch) and ``fabric.log_dict`` writes them from rank zero to a CSV file.

Rank ``r`` reads rows ``[r·B/2, (r+1)·B/2)`` of each global batch of ``B`` windows, so a one-process run on the same
global batches sees the same rows and logs the same values up to rounding (tests/test_wrappers.py checks this).
"""

from __future__ import annotations

import argparse
import csv
import os
import warnings
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger

from geomon import Monitor
from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch


def read_logged(directory: Path) -> dict[tuple[int, str], float]:
    """``{(step, key): value}`` of every ``geomon/`` value in a CSVLogger's ``metrics.csv``."""
    with open(directory / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {(int(row["step"]), key): float(value) for row in rows for key, value in row.items()
            if key.startswith("geomon/") and value}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1, help="processes (2: strategy='ddp' over gloo)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--every", type=int, default=20, help="measure every this many steps")
    parser.add_argument("--global-batch", type=int, default=16, help="windows per step over all processes")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="log directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    # Fabric runs this script again for rank 1 with the same arguments: both ranks must agree on the directory
    out = args.out or Path(os.environ.setdefault("GEOMON_FABRIC_EXAMPLE_OUT", mkdtemp(prefix="geomon-fabric-")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
    warnings.filterwarnings("ignore", ".*is deprecated.*")

    logger = CSVLogger(out, name="fabric", version=args.devices)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    loggers=logger)  # fmt: skip
    fabric.launch()
    world, rank = fabric.world_size, fabric.global_rank
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} does not split over {world} processes")
    rows = slice(rank * args.global_batch // world, (rank + 1) * args.global_batch // world)

    text = load_corpus()
    tokens = CharTokenizer(text).encode(text)
    torch.manual_seed(args.seed)
    model = TinyGPT(len(CharTokenizer(text)), d_model=args.d_model, n_layer=2, n_head=4, context=args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    if fabric.is_global_zero:
        print(f"fabric.setup returned a {type(model).__name__} around a {type(model._forward_module).__name__}")
    monitor = Monitor(
        every_n_steps=args.every,
        spectral_modules=["blocks.*.attn.qkv", "head"],  # names of the GPT itself, not of Fabric's wrapper
        window_rows=args.global_batch * args.context,  # RankMe and neural collapse report on every measured step
    ).attach(model)

    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        x, y = random_batch(tokens, args.global_batch, args.context, generator)  # the same on every rank
        x, y = fabric.to_device((x[rows], y[rows]))  # this rank's rows
        with monitor.step(step, labels=y):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        if monitor.is_scheduled(step):
            values = monitor.compute(step)  # on every rank: a collective under DDP
            fabric.log_dict({key: float(value) for key, value in values.items()}, step=step)  # rank zero writes
    fabric.barrier()
    for each in fabric.loggers:
        each.finalize("success")
    if not fabric.is_global_zero:
        return {}
    logged = read_logged(Path(logger.log_dir))
    for (step, key), value in sorted(logged.items()):
        print(f"step {step:>4}  {key.removeprefix('geomon/'):<52} {value:.5g}")
    print(f"{len(logged)} values logged by rank zero of {world} processes to {logger.log_dir}/metrics.csv")
    return {"logged": logged, "log_dir": Path(logger.log_dir), "world_size": world}


if __name__ == "__main__":
    main()
