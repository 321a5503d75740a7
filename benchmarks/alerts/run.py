"""Record the alert benchmark's scenarios: train each one, keep every step's loss and every monitored value.

Run from the repository root: ``python benchmarks/alerts/run.py`` (all scenarios and the sweep; minutes each on a
laptop CPU), ``--only NAME [NAME ...]``, ``--fast`` (a few dozen steps each: the CI smoke test). Records go to
``benchmarks/results/alerts/records/<scenario>.json``; ``python benchmarks/alerts/replay.py`` then evaluates the
alert rules over them and writes the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios import LM, SCENARIOS, SWEEP, Scenario, by_name, loss_spike, lr_at

import geomon
from geomon._tiny_gpt import CharTokenizer, load_corpus, random_batch
from geomon.reparam import sigma_reparam

RECORDS = Path(__file__).resolve().parents[1] / "results" / "alerts" / "records"
REPARAM_LAYERS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.*"]


def _floats(tensor: torch.Tensor) -> list[float]:
    return [float(x) for x in tensor.detach().double().flatten().tolist()]


def record(s: Scenario, data: torch.Tensor, vocab: int) -> dict:
    """Train ``s`` and return its record: losses per step, values (and per-head vectors) per measured step."""
    torch.manual_seed(s.seed)
    model = LM(vocab, s)
    if s.sigma_reparam:
        sigma_reparam(model, include=REPARAM_LAYERS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, eps=s.adam_eps, weight_decay=s.weight_decay)
    monitor = geomon.Monitor(
        every_n_steps=s.every, alerts=[], entropy_bound=True, spectral_modules=["blocks.*.attn.qkv", "head"]
    ).attach(model)
    generator = torch.Generator().manual_seed(s.seed)
    losses: list[float] = []
    measured: list[dict] = []
    started = time.perf_counter()
    for step in range(s.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(s, step)
        x, y = random_batch(data, s.batch, s.context, generator)
        with monitor.step(step, labels=y):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break  # diverged: nothing more to learn from this run
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if monitor.is_scheduled(step):
            values = monitor.compute(step)
            measured.append({
                "step": step,
                "values": {k: float(v) for k, v in values.items()},
                "heads": {k: _floats(v) for k, v in monitor.details.items() if v.numel() > 1},
            })  # fmt: skip
    monitor.detach()
    spike = loss_spike(losses)
    tail = [v for v in losses[-100:] if math.isfinite(v)]
    return {
        "scenario": s.as_dict(),
        "losses": losses,
        "measured": measured,
        "spike": spike,
        "final_loss": sum(tail) / len(tail) if tail else math.nan,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="scenario names (default: all and the sweep)")
    parser.add_argument("--fast", action="store_true", help="a few dozen steps per scenario (smoke test)")
    parser.add_argument("--out", type=Path, default=RECORDS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = [by_name(n) for n in args.only] if args.only else [*SCENARIOS, *SWEEP]
    if args.fast:
        chosen = [replace(s, steps=40, every=10) for s in chosen]
    text = load_corpus()
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    args.out.mkdir(parents=True, exist_ok=True)
    for s in chosen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = record(s, data, len(tokenizer))
        (args.out / f"{s.name}.json").write_text(json.dumps(result))
        print(f"{s.name:<28} {len(result['losses']):>5} steps  final loss {result['final_loss']:.3f}  "
              f"spike {result['spike']}  {result['seconds']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
