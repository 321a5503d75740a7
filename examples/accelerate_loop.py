"""geomon in a Hugging Face accelerate loop on a CPU: the monitor attached to what ``accelerator.prepare`` returns.

Run: ``python examples/accelerate_loop.py`` (one process, 100 steps: a few seconds) or, for two CPU processes over
gloo, ``accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py`` (``--multi_gpu`` starts the
processes with torchrun; the script asks for the CPU with ``Accelerator(cpu=True)``). The file is not called
``accelerate.py``: run as a script, it would shadow the ``accelerate`` package.

A character-level GPT (``geomon._tiny_gpt.TinyGPT`` on Python's documentation text) trains in a hand-written loop.
``accelerator.prepare(model, optimizer)`` returns the model itself in one process and wraps it in
``DistributedDataParallel`` in several; ``Monitor.attach`` takes either and watches the model inside, so the keys name
the modules as on the GPT itself (``geomon/attention/entropy/blocks.0.attn``, never ``module.blocks.0.attn``). Every
``--every`` steps every process calls ``monitor.compute(step)`` (a collective: the statistics of the whole global
batch) and ``accelerator.log`` hands the values to the trackers of ``log_with`` from the main process; here they also
go to a JSON file.

Process ``r`` reads rows ``[r·B/2, (r+1)·B/2)`` of each global batch of ``B`` windows, so a one-process run on the
same global batches sees the same rows and logs the same values up to rounding (tests/test_wrappers.py checks this).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from geomon import Monitor
from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--every", type=int, default=20, help="measure every this many steps")
    parser.add_argument("--global-batch", type=int, default=16, help="windows per step over all processes")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the logged values to this JSON file")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} does not split over {world} processes")
    rows = slice(rank * args.global_batch // world, (rank + 1) * args.global_batch // world)

    text = load_corpus()
    tokens = CharTokenizer(text).encode(text)
    torch.manual_seed(args.seed)
    model = TinyGPT(len(CharTokenizer(text)), d_model=args.d_model, n_layer=2, n_head=4, context=args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process:
        print(f"accelerator.prepare returned a {type(model).__name__}")
    monitor = Monitor(
        every_n_steps=args.every,
        spectral_modules=["blocks.*.attn.qkv", "head"],  # names of the GPT itself, not of the DDP wrapper
        window_rows=args.global_batch * args.context,  # RankMe and neural collapse report on every measured step
    ).attach(model)

    logged: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        x, y = random_batch(tokens, args.global_batch, args.context, generator)  # the same on every process
        x, y = x[rows].to(accelerator.device), y[rows].to(accelerator.device)  # this process's rows
        with monitor.step(step, labels=y):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        if monitor.is_scheduled(step):
            values = {key: float(value) for key, value in monitor.compute(step).items()}  # on every process
            accelerator.log(values, step=step)  # the trackers of Accelerator(log_with=...), main process only
            logged[str(step)] = values
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return {}
    for step, values in logged.items():
        for key, value in sorted(values.items()):
            print(f"step {step:>4}  {key.removeprefix('geomon/'):<52} {value:.5g}")
    print(f"{sum(map(len, logged.values()))} values computed by the main process of {world} processes")
    if args.out is not None:
        args.out.write_text(json.dumps({"world_size": world, "logged": logged}, indent=1))
    return {"logged": logged, "world_size": world}


if __name__ == "__main__":
    main()
