"""geomon on a ``torch.compile``'d model: ``Monitor.measure_forward`` measures it by an extra eager forward pass.

Run: ``python examples/compiled_model.py`` (200 steps; ``--steps 20 --every 10`` for a quick look; ``--backend
aot_eager`` where no C++ compiler is at hand). The character GPT of ``examples/plain_loop.py``, compiled, learns
Python's documentation text with AdamW. A compiled graph runs no hooks, so on every ``--every``-th step the monitor
runs the model once more before the training step, without gradients and with the compiled code run eagerly, and
measures that pass; training is unchanged (the RNG state is restored and the buffers are copies), and each measured
step costs one more forward pass.

The loop's geomon API::

    compiled = torch.compile(model)
    monitor = Monitor(every_n_steps=50).attach(compiled)
    for step, (x, y) in enumerate(batches):
        monitor.measure_forward(step, compiled, x, labels=y)   # off schedule: nothing
        loss = loss_fn(compiled(x), y)
        ...                                                    # backward, optimizer step
        if monitor.is_scheduled(step):
            values = monitor.compute(step)

In Lightning: ``GeomonCallback(measure_forward=lambda module, batch: module(batch[0]))``; with the Hugging Face
Trainer, ``TrainingArguments(torch_compile=True)`` is measured this way without any argument.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from geomon import Monitor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import CONTEXT, batches, build_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="geomon.Monitor on a torch.compile'd model (CPU).")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="measure every N steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_model()
    compiled = torch.compile(model, backend=args.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    monitor = Monitor(every_n_steps=args.every).attach(compiled)
    history: dict[int, dict[str, float]] = {}
    data = batches(args.batch_size, args.seed)
    for step in range(args.steps):
        x, y = next(data)
        monitor.measure_forward(step, compiled, x, labels=y)  # before the training forward: its weights and batch
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if monitor.is_scheduled(step):
            history[step] = {key: float(value) for key, value in monitor.compute(step).items()}  # a host sync
            entropy = [v for k, v in history[step].items() if k.startswith("geomon/attention/entropy_normalized/")]
            rank = history[step].get("geomon/rankme/head.input", math.nan)
            print(f"step {step}  loss {loss.item():.3f}  normalised attention entropy "
                  f"{', '.join(f'{v:.3f}' for v in entropy)}  RankMe {rank:.1f}")  # fmt: skip
    print(f"\nmeasured steps: {sorted(history)} (context {CONTEXT}, {len(history)} extra forward passes)")
    return {"history": history, "model": model, "loss": loss.item()}


if __name__ == "__main__":
    main()
