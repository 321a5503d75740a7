"""geomon in a hand-written PyTorch loop: ``geomon.Monitor`` with attach, step, compute, state_dict, detach.

Run: ``python examples/plain_loop.py`` (300 steps, about a minute and a half on a 2-core CPU;
``--steps 20 --every 10`` for a few seconds). A character-level GPT (``geomon._tiny_gpt.TinyGPT``, d_model 64)
learns Python's documentation text with AdamW; every ``--every`` steps the monitor watches the forward pass and
prints what it measured:

- ``geomon/attention/entropy/blocks.{i}.attn`` (nats; 0 = one-hot, ``log n`` = uniform over the ``n`` keys a causal
  query sees), ``entropy_normalized`` (``H / log n``, in [0, 1]) and ``max_logit`` per attention layer: they fall as
  heads specialise;
- ``geomon/rankme/head.input``: effective rank (1 to 64) of the features entering the output head;
- ``geomon/nc/*/head.input``: neural collapse of those features against the targets (``nc4`` is not logged in the first
  window: it compares against the previous window's class means);
- ``geomon/spectral/logit_sigma/*`` and ``geomon/alerts/*``.

The loop's whole geomon API::

    monitor = Monitor(every_n_steps=10).attach(model)
    for step, (x, y) in enumerate(batches):
        with monitor.step(step, labels=y):       # off-schedule steps: no hooks, no work (fill steps aside)
            loss = loss_fn(model(x), y)
        ...                                        # backward, optimizer step
        if monitor.is_scheduled(step):
            values = monitor.compute(step)         # {key: 0-d tensor}; per-head vectors in monitor.details
    torch.save(monitor.state_dict(), path)         # open windows, alert baselines: a resumed run continues them
    monitor.detach()
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from geomon import Monitor
from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch

TEXT = load_corpus()
TOKENIZER = CharTokenizer(TEXT)
CONTEXT = 32


def build_model() -> TinyGPT:
    return TinyGPT(vocab_size=len(TOKENIZER), d_model=64, n_layer=2, n_head=4, context=CONTEXT)


def batches(batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless random windows of the corpus and their next-character targets."""
    data, generator = TOKENIZER.encode(TEXT), torch.Generator().manual_seed(seed)
    while True:
        yield random_batch(data, batch_size, CONTEXT, generator)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="geomon.Monitor in a plain PyTorch training loop (CPU).")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="measure every N steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    monitor = Monitor(every_n_steps=args.every).attach(model)
    history: dict[int, dict[str, float]] = {}
    data = batches(args.batch_size, args.seed)
    for step in range(args.steps):
        x, y = next(data)
        with monitor.step(step, labels=y):  # y: one label per position, the features' next character
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if monitor.is_scheduled(step):
            values = {key: float(value) for key, value in monitor.compute(step).items()}  # a host sync, once here
            history[step] = values
            print(f"step {step}  loss {loss.item():.3f}")
            for key in sorted(values):
                print(f"  {key} = {values[key]:.6g}")

    state = monitor.state_dict()  # for a checkpoint: torch.save({"model": ..., "geomon": state}, path)
    resumed = Monitor(every_n_steps=args.every).attach(build_model())
    resumed.load_state_dict(state)  # a restarted run picks the windows and alert baselines up from here
    monitor.detach()
    last = max(history)
    print(f"\nmeasured steps: {sorted(history)}; at step {last}:")
    for layer in sorted(k for k in history[last] if k.startswith("geomon/attention/entropy_normalized/")):
        print(f"  {layer.rsplit('/', 1)[1]}: normalised entropy {history[last][layer]:.3f} (1 = uniform)")
    print(f"  RankMe of the head's input: {history[last].get('geomon/rankme/head.input', math.nan):.1f} of 64")
    return {"history": history, "state": state, "resumed": resumed, "model": model, "loss": loss.item()}


if __name__ == "__main__":
    main()
