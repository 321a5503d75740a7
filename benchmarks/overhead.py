"""Whole-training-step overhead of geomon: a GPT trained with and without a :class:`geomon.Monitor`, side by side.

Two identically initialised copies of the model (:class:`geomon._tiny_gpt.TinyGPT`, attention through SDPA), each
with its own AdamW, train on the same batches in the same order; one of them has a monitor attached. The loop is the
plain PyTorch loop the Lightning callback amounts to::

    optimizer.zero_grad()
    with monitor.step(step, labels=y):          # a no-op off schedule
        logits = model(x)
    cross_entropy(logits, y).backward(); optimizer.step()
    if monitor.is_scheduled(step):
        values = {k: float(v.float()) for k, v in monitor.compute().items()}   # as a logger would

The plain arm runs exactly the same code without the two monitor lines. The arms are interleaved in blocks of
``BLOCK`` steps in ABBA order (plain, monitored, monitored, plain, ...), so that both see the same background load
and drift; each arm's step numbers, and hence the monitor's schedule, run on from its own previous block. A step is
timed from ``zero_grad`` to the end of ``optimizer.step`` (and ``compute``) with its batch already in memory
(batches are drawn, and moved to the GPU, outside the timed region); on CUDA ``torch.cuda.synchronize()`` brackets
each timed step. Warm-up steps (step 0, which is on every schedule and creates the probes, among them) are not
timed. At the end the two models' weights are compared: geomon must not change training, so on the CPU they are
bit-identical.

Reported per configuration (monitored / plain):

* **median ratio**: of the per-step times. With ``every_n_steps=50`` only 1 step in 50 is measured, so the median
  is the cost of an *off-schedule* step and hides the measured steps' cost;
* **mean ratio**: of the mean step times, which includes the measured steps: the cost over a whole run;
* 95% percentile-bootstrap intervals for both, resampling the pairs of blocks (the unit of interleaving);
* the median time of the measured (scheduled) steps.

Configurations: (1) ``Monitor()`` (every 50 steps, attention, RankMe + neural collapse of the head's input, labels
passed); (2) every probe on every step, ``Monitor(every_n_steps=1, embedding_modules=["blocks.*"],
spectral_modules=["*"])`` (``blocks.*`` matches every submodule of every block); (3) as (2) with ``query_rows=16``.
(1) runs ``--steps`` steps per arm; (2) and (3), where every step is measured, a fraction of that (``SHAPES``: 1/8
on the CPU, 1/50 on CUDA, where a GPT-2-small step that feeds some 120 RankMe windows of D = 768..3072 takes
seconds).
Media (spectra, heatmaps) are not produced, as with ``GeomonCallback(media=False)``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/overhead.py                  # CPU: TinyGPT d 128, 4 layers, context 128, batch 16
    .venv/bin/python benchmarks/overhead.py --device cuda    # GPT-2-small shape, bf16 autocast
    .venv/bin/python benchmarks/overhead.py --quick          # smoke test, a few seconds

On a CPU shared with other processes pass ``--threads 1``: two OpenMP threads on two busy cores wait on each other
and make steps several times slower and erratic. The CPU default step takes about 0.2-0.35 s on one core of the
2-core machine of the committed results, so the default run takes about 6 minutes there.
The vocabulary is the corpus's characters (about 100), so on CUDA the head is much smaller than GPT-2's 50k: the
step is a little cheaper than GPT-2's, which makes the ratios a little pessimistic. Results go to
``benchmarks/results/<cpu|gpu name>-overhead-<YYYY-MM-DD>.md`` (``--out`` overrides; ``--quick`` writes to the
temporary directory unless ``--out`` is given, so that a smoke test never overwrites real results).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _machine import cpu_model, loadavg, write_results

from geomon import Monitor
from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch

BLOCK = 2  #: steps per arm per block; pairs of blocks alternate their order (ABBA)
BOOTSTRAP, SEED = 2000, 0
#: d_model, layers, heads, context, batch; steps per arm, the every-step configurations' share of them, warm-up steps
SHAPES = {
    "cpu": (128, 4, 4, 128, 16, 300, 1 / 8, 2),
    "cuda": (768, 12, 12, 1024, 8, 1000, 1 / 50, 6),
    "quick": (32, 2, 2, 32, 4, 100, 1 / 8, 2),
}


def configurations(steps: int, every_step_share: float) -> list[tuple[str, dict[str, Any], int]]:
    every = max(4 * BLOCK, round(steps * every_step_share / BLOCK) * BLOCK)
    all_probes = {"every_n_steps": 1, "embedding_modules": ["blocks.*"], "spectral_modules": ["*"]}
    return [
        ("default: Monitor()", {}, steps),
        ("every probe, every step", all_probes, every),
        ("every probe, every step, query_rows=16", {**all_probes, "query_rows": 16}, every),
    ]


class Arm:
    """One model, its optimizer and (for the monitored arm) its monitor; ``step`` is the timed training step."""

    def __init__(self, model: torch.nn.Module, monitor: Monitor | None, device: str) -> None:
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        self.monitor = None if monitor is None else monitor.attach(model)
        self.next_step = 0
        self.measured: list[float] = []  # times of the monitor's scheduled steps (timed ones only)
        self.values: dict[str, float] = {}  # the latest computed values, as a logger gets them

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, bool]:
        step, self.next_step = self.next_step, self.next_step + 1
        monitor = self.monitor
        scheduled = monitor is not None and monitor.is_scheduled(step)
        cuda = self.device == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            if monitor is not None:
                with monitor.step(step, labels=y):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        self.optimizer.step()
        if monitor is not None and monitor.is_scheduled(step):
            self.values = {key: float(value.float()) for key, value in monitor.compute().items()}
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, scheduled


def run_configuration(
    options: dict[str, Any],
    steps: int,
    warmup: int,
    shape: tuple[int, ...],
    device: str,
    data: torch.Tensor,
    vocab: int,
) -> dict[str, Any]:
    d_model, layers, heads, context, batch = shape
    torch.manual_seed(SEED)
    model = TinyGPT(vocab, d_model=d_model, n_layer=layers, n_head=heads, context=context).to(device)
    plain = Arm(model, None, device)
    monitored = Arm(copy.deepcopy(model), Monitor(**options), device)
    generator = torch.Generator().manual_seed(SEED)
    pairs: list[tuple[list[float], list[float]]] = []
    for index in range(-(-warmup // BLOCK) + steps // BLOCK):
        timed = index >= -(-warmup // BLOCK)
        batches = [random_batch(data, batch, context, generator) for _ in range(BLOCK)]
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        times: dict[int, list[float]] = {0: [], 1: []}
        for arm_index in (0, 1) if index % 2 == 0 else (1, 0):
            arm = (plain, monitored)[arm_index]
            for x, y in batches:
                seconds, scheduled = arm.step(x, y)
                times[arm_index].append(seconds * 1e3)
                if scheduled and timed:
                    arm.measured.append(seconds * 1e3)
        if timed:
            pairs.append((times[0], times[1]))
    with torch.no_grad():
        delta = max(
            (a - b).abs().max().item()
            for a, b in zip(plain.model.parameters(), monitored.model.parameters(), strict=True)
        )
    return {"pairs": pairs, "measured": monitored.measured, "delta": delta}


def _ratio(pairs: list[tuple[list[float], list[float]]], stat: Callable[[list[float]], float]) -> float:
    return stat([t for _, m in pairs for t in m]) / stat([t for p, _ in pairs for t in p])


def _interval(pairs: list[tuple[list[float], list[float]]], stat: Callable[[list[float]], float]) -> tuple[float, ...]:
    """95% percentile-bootstrap interval of the ratio, resampling pairs of blocks."""
    rng = random.Random(SEED)
    samples = sorted(_ratio(rng.choices(pairs, k=len(pairs)), stat) for _ in range(BOOTSTRAP))
    return samples[int(0.025 * BOOTSTRAP)], samples[int(0.975 * BOOTSTRAP) - 1]


def summarise(name: str, result: dict[str, Any]) -> dict[str, Any]:
    pairs = result["pairs"]
    plain = [t for p, _ in pairs for t in p]
    monitored = [t for _, m in pairs for t in m]
    return {
        "name": name,
        "steps": len(plain),
        "measured": len(result["measured"]),
        "plain_ms": statistics.median(plain),
        "monitored_ms": statistics.median(monitored),
        "median": _ratio(pairs, statistics.median),
        "median_ci": _interval(pairs, statistics.median),
        "mean": _ratio(pairs, statistics.fmean),
        "mean_ci": _interval(pairs, statistics.fmean),
        "measured_ms": statistics.median(result["measured"]) if result["measured"] else float("nan"),
        "delta": result["delta"],
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["configuration", "steps/arm", "measured steps", "plain ms (median)", "geomon ms (median)",
            "median ratio [95% CI]", "mean ratio [95% CI]", "measured-step ms (median)", "max abs Δweight"]  # fmt: skip
    body = [
        [
            r["name"],
            str(r["steps"]),
            str(r["measured"]),
            f"{r['plain_ms']:.1f}",
            f"{r['monitored_ms']:.1f}",
            f"{r['median']:.3f} [{r['median_ci'][0]:.3f}, {r['median_ci'][1]:.3f}]",
            f"{r['mean']:.3f} [{r['mean_ci'][0]:.3f}, {r['mean_ci'][1]:.3f}]",
            f"{r['measured_ms']:.1f}",
            f"{r['delta']:.1e}",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return [line(head), rule, *(line(b) for b in body)]


def _without_notes(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("--note"):
            kept.append(arg)
        skip = arg == "--note"
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--steps", type=int, help="timed steps per arm of the default configuration (cpu 300, cuda 1000)"
    )
    parser.add_argument("--d-model", type=int, help="cpu 128, cuda 768")
    parser.add_argument("--layers", type=int, help="cpu 4, cuda 12")
    parser.add_argument("--heads", type=int, help="cpu 4, cuda 12")
    parser.add_argument("--context", type=int, help="cpu 128, cuda 1024")
    parser.add_argument("--batch", type=int, help="cpu 16, cuda 8")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny model, 100 steps, a few seconds")
    parser.add_argument("--note", action="append", default=[], help="a line for the results file's notes")
    parser.add_argument("--out", type=Path, help="markdown results (default: benchmarks/results/...-overhead-DATE.md)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    *defaults, default_steps, every_step_share, warmup = SHAPES["quick" if args.quick else args.device]
    given = (args.d_model, args.layers, args.heads, args.context, args.batch)
    shape = tuple(d if g is None else g for g, d in zip(given, defaults, strict=True))
    steps = args.steps or default_steps
    if steps < 4 * BLOCK:
        parser.error(f"--steps must be at least {4 * BLOCK}")
    steps -= steps % BLOCK

    text = load_corpus()
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    load_start, start = loadavg(), time.perf_counter()
    d_model, layers, heads, context, batch = shape
    print(f"TinyGPT d_model {d_model}, {layers} layers, {heads} heads, context {context}, batch {batch}, "
          f"vocab {len(tokenizer)} on {gpu or 'cpu'}; threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    rows = []
    for name, options, n in configurations(steps, every_step_share):
        result = run_configuration(options, n, warmup, shape, args.device, data, len(tokenizer))
        rows.append(summarise(name, result))
        r = rows[-1]
        print(f"{name}: median ratio {r['median']:.3f} [{r['median_ci'][0]:.3f}, {r['median_ci'][1]:.3f}], "
              f"mean ratio {r['mean']:.3f} [{r['mean_ci'][0]:.3f}, {r['mean_ci'][1]:.3f}] "
              f"({r['steps']} steps/arm, plain {r['plain_ms']:.1f} ms, measured steps {r['measured_ms']:.1f} ms, "
              f"max |Δweight| {r['delta']:.1e})", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - start
    lines = table(rows)
    print("\n" + "\n".join(lines))

    params = sum(p.numel() for p in TinyGPT(len(tokenizer), d_model, layers, heads, context).parameters())
    machine = f"{cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}"
    if gpu:
        machine = f"{gpu} (CUDA {torch.version.cuda}); host {machine}"
    header = [
        f"# geomon overhead on a whole training step: {gpu or 'CPU'}",
        "",
        f"- machine: {machine}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{shlex.join(['python', 'benchmarks/overhead.py', *_without_notes(sys.argv[1:])])}`"
        + (" (the `--note` lines are below)" if args.note else ""),
        f"- load average (1, 5, 15 min) at start: {load_start}; at end: {loadavg()}; total run {elapsed:.0f} s",
        f"- model: TinyGPT d_model {d_model}, {layers} layers, {heads} heads, context {context}, batch {batch}, "
        f"vocab {len(tokenizer)} (characters), {params / 1e6:.2f} M parameters, AdamW"
        + (", bf16 autocast" if args.device == "cuda" else ", float32"),
        f"- two identically initialised copies train on the same batches, interleaved in blocks of {BLOCK} steps "
        f"(ABBA order); {warmup} warm-up steps per arm (untimed, step 0 among them); ratios are geomon / plain, "
        f"95% intervals from {BOOTSTRAP} bootstrap resamples of the block pairs",
        "- median ratio: the typical step (with every_n_steps=50, an off-schedule step); mean ratio: the whole run, "
        "measured steps included; measured-step ms: median time of the monitored arm's scheduled steps; "
        "max abs Δweight: between the two models at the end (0 = geomon did not change training)",
        *(f"- note: {note}" for note in args.note),
        "",
    ]
    out = write_results([*header, *lines], "overhead", out=args.out, quick=args.quick, gpu=gpu)
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
