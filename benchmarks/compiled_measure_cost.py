"""What measuring a ``torch.compile``'d model costs: a training step with ``Monitor.measure_forward`` before it
against the same compiled step alone.

Two identically initialised copies of a GPT (``geomon._tiny_gpt.TinyGPT``, pre-LayerNorm, SDPA attention) are
compiled with the same backend and trained on the same batches with AdamW; the monitored copy runs
``monitor.measure_forward(step, compiled, x, labels=y)`` before every training step (every step measured:
``every_n_steps=1``, the default probes), then ``compute(step)``. The two arms take turns in ABBA blocks so that both
see the same background load; compilation and the first ``--warmup`` pairs are not timed. It prints the median plain
step, the median monitored step split into the extra forward and the rest (the training step and compute), their
ratios (paired within blocks, with a 95% bootstrap interval), and what the default schedule adds to a run: one
measured step in 50, plus an extra forward on each fill step (the steps before a measured one whose head-input rows
a RankMe window still needs: :meth:`geomon.Monitor.fills`), counted at the extra forward's cost.

Usage (from the repository root)::

    .venv/bin/python benchmarks/compiled_measure_cost.py --threads 1
    .venv/bin/python benchmarks/compiled_measure_cost.py --shape gpt2-small --pairs 12 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from _machine import cpu_model, loadavg

from geomon import Monitor
from geomon._tiny_gpt import TinyGPT

SHAPES = {  # vocab, d_model, layers, heads, context, batch
    "tiny": (256, 128, 4, 4, 128, 8),
    "gpt2-small": (50257, 768, 12, 12, 256, 1),
}


def _model(shape: str) -> TinyGPT:
    vocab, width, layers, heads, context, _ = SHAPES[shape]
    torch.manual_seed(0)
    return TinyGPT(vocab_size=vocab, d_model=width, n_layer=layers, n_head=heads, context=context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    vocab, _, _, _, context, batch = SHAPES[args.shape]
    arms = {}
    for name in ("plain", "measured"):
        model = _model(args.shape)
        compiled = torch.compile(model, backend=args.backend)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        monitor = Monitor(every_n_steps=1).attach(compiled) if name == "measured" else None
        arms[name] = (compiled, optimizer, monitor)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, context + 1), generator=g) for _ in range(8)]
    times: dict[str, list[float]] = {"plain": [], "measured": [], "extra": []}
    order = ["plain", "measured", "measured", "plain"]
    steps = {"plain": 0, "measured": 0}
    for pair in range(args.warmup + args.pairs):
        for name in order if pair % 2 == 0 else order[::-1]:
            compiled, optimizer, monitor = arms[name]
            tokens = batches[steps[name] % len(batches)]
            x, y = tokens[:, :-1], tokens[:, 1:]
            start = time.perf_counter()
            if monitor is not None:
                monitor.measure_forward(steps[name], compiled, x, labels=y)
                extra = time.perf_counter() - start
            loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if monitor is not None:
                monitor.compute(steps[name])
            elapsed = time.perf_counter() - start
            steps[name] += 1
            if pair >= args.warmup:
                times[name].append(elapsed)
                if monitor is not None:
                    times["extra"].append(extra)
    plain, measured, extra = (statistics.median(times[k]) for k in ("plain", "measured", "extra"))
    # paired ratios: each measured step against the plain steps of its own block
    ratios = [m / p for m, p in zip(times["measured"], times["plain"], strict=True)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    low, high = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot))]
    ratio = statistics.median(ratios)
    print(f"# compiled-model measuring cost: shape {args.shape}, backend {args.backend}, {args.pairs} timed pairs")
    print(f"{datetime.date.today()}; {cpu_model()}, {torch.get_num_threads()} thread(s), load average {loadavg()}; "
          f"torch {torch.__version__}, python {sys.version.split()[0]}")  # fmt: skip
    print("| plain step | measured step | extra forward | measured / plain [95% CI] | extra forward / plain |")
    print("|---:|---:|---:|---|---:|")
    print(f"| {plain * 1e3:.1f} ms | {measured * 1e3:.1f} ms | {extra * 1e3:.1f} ms | {ratio:.3f} "
          f"[{low:.3f}, {high:.3f}] | {extra / plain:.3f} |")  # fmt: skip
    # the default schedule, every 50 steps: its fill steps, once a measured step has shown the rows a step gives
    model = _model(args.shape)
    default = Monitor().attach(model)
    with torch.no_grad(), default.step(0, labels=batches[0][:, 1:]):
        model(batches[0][:, :-1])
    default.compute(0)
    fills = sum(default.fills(step) for step in range(51, 100))
    fill_cost = fills * extra / plain
    print(f"default schedule (1 measured step and {fills} fill steps in 50): adds {(ratio - 1 + fill_cost) / 50:.2%} "
          f"to a run [{(low - 1 + fill_cost) / 50:.2%}, {(high - 1 + fill_cost) / 50:.2%}]")  # fmt: skip


if __name__ == "__main__":
    main()
