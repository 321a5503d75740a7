"""Per-step cost of filling the head input's windows between measured steps: a ViT classifier trained with and
without a default :class:`geomon.Monitor`, side by side.

A classifier has one head-input row per image, so a RankMe / neural-collapse window of ``4 x D`` rows needs many
steps; the monitor's hooks on the head (and only those: no attention capture) then also run on the steps before each
measured step (:meth:`geomon.Monitor.fills`), each adding the rows' float64 Gram, row sum, class sums and ``nc4``
decisions on the device. This script measures what such a *fill step* costs against a plain training step.

Two identically initialised copies of a torchvision ``VisionTransformer`` (``--hidden``, 4 layers, 32 px images,
patch 4: 65 tokens; 10 classes) each train with SGD on the same batches of ``--batch`` images. The arms are
interleaved in blocks of ``BLOCK`` steps in ABBA order (plain, monitored, monitored, plain, ...), so that both see
the same background load; each arm's step numbers, hence the monitor's schedule, run on from its own previous block.
A step is timed from ``zero_grad`` to the end of ``optimizer.step`` (and ``compute`` on measured steps), batch in
memory. The monitored arm's steps are told apart by what the monitor does on them: measured (``every_n_steps``),
fill, or nothing.

Reported: the **fill-step ratio**, median fill-step time / median plain step time (with a 95% bootstrap interval
over pairs of blocks); the **mean ratio** over the whole run (measured steps included); the step of the first
RankMe; and whether the weights end bit-identical (they must, on the CPU).

Usage (from the repository root)::

    .venv/bin/python benchmarks/window_fill.py --threads 1           # about 8 minutes on one busy CPU core
    .venv/bin/python benchmarks/window_fill.py --quick               # smoke test, a few seconds

Results go to ``benchmarks/results/<cpu>-window-fill-<YYYY-MM-DD>.md`` (``--out`` overrides; ``--quick`` writes to
the temporary directory unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_model, loadavg

from geomon import Monitor

BLOCK, BOOTSTRAP, SEED, CLASSES = 10, 2000, 0, 10
RESULTS = Path(__file__).resolve().parent / "results"
KEY = "geomon/rankme/heads.head.input"


def vit(hidden: int) -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(SEED)
    return VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=hidden,
                             mlp_dim=4 * hidden, num_classes=CLASSES)  # fmt: skip


class Arm:
    def __init__(self, model: torch.nn.Module, monitor: Monitor | None) -> None:
        self.model, self.monitor = model, None if monitor is None else monitor.attach(model)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        self.next_step = 0
        self.first_value: int | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, str]:
        step, self.next_step = self.next_step, self.next_step + 1
        monitor = self.monitor
        kind = "plain"
        if monitor is not None:
            kind = "measured" if monitor.is_scheduled(step) else "fill" if monitor.fills(step) else "idle"
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if monitor is not None:
            with monitor.step(step, labels=y):
                logits = self.model(x)
        else:
            logits = self.model(x)
        F.cross_entropy(logits, y).backward()
        self.optimizer.step()
        if kind == "measured":
            values = {key: float(value) for key, value in monitor.compute(step).items()}  # type: ignore[union-attr]
            if KEY in values and self.first_value is None:
                self.first_value = step
        return time.perf_counter() - start, kind


def bootstrap(pairs: list[tuple[list[float], list[float]]], rng: random.Random) -> tuple[float, float]:
    """95% interval of median(monitored fill steps) / median(plain steps), resampling pairs of blocks."""
    ratios = []
    for _ in range(BOOTSTRAP):
        picked = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        fill = [t for block in picked for t in block[0]]
        plain = [t for block in picked for t in block[1]]
        if fill and plain:
            ratios.append(statistics.median(fill) / statistics.median(plain))
    ratios.sort()
    return ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="timed steps per arm (default 600)")
    parser.add_argument("--hidden", type=int, default=192, help="ViT width D (default 192: a window of 768 rows)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny model, 60 steps")
    parser.add_argument("--out", type=Path, help="results file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.hidden = 60, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    plain_model = vit(args.hidden)
    monitored_model = copy.deepcopy(plain_model)
    plain, monitored = Arm(plain_model, None), Arm(monitored_model, Monitor())
    data = torch.Generator().manual_seed(SEED)
    blocks = -(-args.steps // BLOCK)
    batches = [(torch.randn(BLOCK, args.batch, 3, 32, 32, generator=data),
                torch.randint(0, CLASSES, (BLOCK, args.batch), generator=data)) for _ in range(blocks)]  # fmt: skip
    times: dict[str, list[float]] = {"plain": [], "measured": [], "fill": [], "idle": []}
    pairs: list[tuple[list[float], list[float]]] = []
    started = time.perf_counter()
    for index, (xs, ys) in enumerate(batches):
        order = (plain, monitored) if index % 4 in (0, 3) else (monitored, plain)
        block: dict[str, list[float]] = {"plain": [], "fill": []}
        for arm in order:
            for x, y in zip(xs, ys, strict=True):
                seconds, kind = arm.step(x, y)
                if arm.next_step > 1:  # step 0 (probes created, first measurement) is warm-up
                    times[kind].append(seconds)
                    if kind in block:
                        block[kind].append(seconds)
        pairs.append((block["fill"], block["plain"]))
    elapsed = time.perf_counter() - started
    identical = all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(),
                                                      monitored_model.state_dict().values(), strict=True))  # fmt: skip
    median = {kind: statistics.median(values) if values else float("nan") for kind, values in times.items()}
    fill_ratio = median["fill"] / median["plain"]
    low, high = bootstrap(pairs, random.Random(SEED))
    monitored_all = times["measured"] + times["fill"] + times["idle"]
    mean_ratio = statistics.mean(monitored_all) / statistics.mean(times["plain"])
    d, window = args.hidden, 4 * args.hidden
    summary = (f"fill-step ratio {fill_ratio:.3f} [{low:.3f}, {high:.3f}], mean ratio {mean_ratio:.3f} "
               f"({len(times['fill'])} fill, {len(times['measured'])} measured, {len(times['idle'])} idle steps; "
               f"first RankMe at step {monitored.first_value}; weights bit-identical: {identical})")  # fmt: skip
    print(summary)
    today = datetime.date.today().isoformat()
    out = args.out or (Path(tempfile.gettempdir()) if args.quick else RESULTS) / f"cpu-window-fill-{today}.md"
    lines = [
        "# geomon window fill: per-step cost of feeding the head input's windows between measured steps (CPU)",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"load average {loadavg()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {today}; {elapsed:.0f} s",
        f"- model: torchvision VisionTransformer, D = {d}, 4 layers, 32 px, patch 4 (65 tokens), {CLASSES} classes; "
        f"batch {args.batch} images, SGD; `Monitor()` defaults (every 50 steps, window 4 x D = {window} rows)",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        "| steps per arm | fill-step ratio (median) [95% CI] | mean ratio, whole run | plain step (median) "
        "| fill step | measured step | first RankMe | bit-identical |",
        "|---|---|---|---|---|---|---|---|",
        f"| {args.steps} | {fill_ratio:.3f} [{low:.3f}, {high:.3f}] | {mean_ratio:.3f} | "
        f"{median['plain'] * 1e3:.1f} ms | {median['fill'] * 1e3:.1f} ms | {median['measured'] * 1e3:.1f} ms | "
        f"step {monitored.first_value} | {'yes' if identical else 'NO'} |",
        "",
        "Ratios: monitored / plain, measured interleaved (ABBA blocks of 10 steps). A fill step adds the head input's "
        f"float64 Gram (2·B·D² = {2 * args.batch * d * d:,} FLOPs), row and class sums and the nc4 decisions "
        f"(4·B·C·D = {4 * args.batch * CLASSES * d:,} FLOPs), plus registering and removing two forward hooks.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
