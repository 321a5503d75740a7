"""What reading attention written by hand at its own softmax costs: one attention layer that forms its scores and
calls ``softmax`` itself (the layout of Hugging Face DeBERTa / GPT-Neo or timm's TNT), its forward timed plain and
inside a measured :class:`geomon.Monitor` step, side by side.

Per shape ``[B, H, N, Dh]`` (``Dh`` 64, width ``H·Dh``), with a right-padding mask filled with ``-1e9``:

- **measured forward / plain forward**: the layer's whole forward (projections, scores, mask, softmax, ``@ v``,
  output projection) inside a measured step, the monitor reading its softmax (``compute`` runs after, untimed),
  against the same forward without a monitor;
- **every row / softmax**: geomon's reduction of *all* the scores' rows and their padding
  (:func:`geomon.capture.softmax.rows_of`, as with ``query_rows=None``) against ``torch.softmax`` of the same
  scores. The measured forward reads the default ``query_rows="auto"`` rows (128 here).

Arms alternate call by call (ABBA), under ``no_grad``, one CPU thread by default; reported are medians of
``--reps`` calls and their ratio. Results go to ``benchmarks/results/cpu-softmax-read-<date>.md`` (``--quick``: tiny
shapes, a temporary file, for the smoke test). ``--device cuda`` times the same on a GPU, in bfloat16, at larger
shapes, each call bracketed by ``torch.cuda.synchronize()`` (``make bench-gpu`` runs it as one of its parts).

Usage (from the repository root)::

    .venv/bin/python benchmarks/softmax_read_cost.py            # about a minute on one CPU core
    .venv/bin/python benchmarks/softmax_read_cost.py --quick
    python benchmarks/softmax_read_cost.py --device cuda --out results.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_model, loadavg, write_results
from torch import nn

from geomon import Monitor
from geomon.capture.softmax import rows_of

DIM_HEAD = 64


class HandWritten(nn.Module):
    """Attention written by hand, the way many model zoos write it."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(heads * DIM_HEAD, 3 * heads * DIM_HEAD)
        self.proj = nn.Linear(heads * DIM_HEAD, heads * DIM_HEAD)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, DIM_HEAD)).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(DIM_HEAD)
        scores = scores.masked_fill(~keep[:, None, None, :], -1e9)
        return self.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2))


class Net(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.attn = HandWritten(heads)

    def forward(self, x, keep):
        return self.attn(x, keep)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    """``fn`` as a call that returns its own duration in seconds (the device's queued work included)."""

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    return run


def _pairs(first, second, reps: int) -> tuple[float, float]:
    """Medians of the durations ``first()`` and ``second()`` return, called in ABBA order."""
    a, b = [], []
    for i in range(reps):
        if i % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return statistics.median(a), statistics.median(b)


def measure(batch: int, heads: int, n: int, reps: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    torch.manual_seed(0)
    model = Net(heads).eval().to(device, dtype)
    x = torch.randn(batch, n, heads * DIM_HEAD, device=device, dtype=dtype)
    keep = torch.ones(batch, n, dtype=torch.bool, device=device)
    keep[-1, -n // 4 :] = False
    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False, alerts=[]).attach(model)
    step = [0]

    def forward() -> None:
        with torch.no_grad():
            model(x, keep)

    def measured() -> float:  # the forward timed; compute (a logging step's work, not the forward's) after it
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), monitor.step(step[0]):
            model(x, keep)
        _sync(device)
        elapsed = time.perf_counter() - start
        monitor.compute(step[0])
        step[0] += 1
        return elapsed

    forward()  # warm-up: kernels loaded, caches filled
    measured()  # the first compute agrees the plan: not counted
    plain_s, measured_s = _pairs(_timed(forward, device), measured, reps)
    with torch.no_grad():
        q, k, _ = model.attn.qkv(x).unflatten(-1, (3, heads, DIM_HEAD)).permute(2, 0, 3, 1, 4)
        scores = ((q @ k.transpose(-1, -2)) / math.sqrt(DIM_HEAD)).masked_fill(~keep[:, None, None, :], -1e9)
    softmax_s, read_s = _pairs(
        _timed(lambda: scores.softmax(-1), device), _timed(lambda: rows_of("attn", scores), device), reps
    )
    return {"plain": plain_s, "measured": measured_s, "softmax": softmax_s, "read": read_s}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few calls (a smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        shapes = [(2, 2, 32)]
    elif cuda:
        shapes = [(8, 12, 1024), (4, 16, 4096)]
    else:
        shapes = [(4, 12, 256), (2, 12, 1024)]
    reps = 3 if args.quick else args.reps
    gpu = torch.cuda.get_device_name(device) if cuda else None
    machine = f"{gpu}, {str(dtype).removeprefix('torch.')}" if cuda else f"{cpu_model()}, {args.threads} thread(s)"
    shown = " ".join(["python benchmarks/softmax_read_cost.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        f"# Reading attention written by hand at its own softmax: cost on the {'GPU' if cuda else 'CPU'}",
        "",
        f"- machine: {machine}, load average before the run {loadavg()}",
        f"- torch {torch.__version__}, Python {sys.version.split()[0]}; command: `{shown.strip()}`; medians of {reps} "
        "calls, ABBA order",
        "",
        "| B, H, N, Dh | plain forward ms | measured forward ms (default query_rows) | measured / plain | softmax ms "
        "| reading every row ms | every row / softmax |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, heads, n in shapes:
        t = measure(batch, heads, n, reps, device, dtype)
        lines.append(
            f"| {batch}, {heads}, {n}, {DIM_HEAD} | {t['plain'] * 1e3:.2f} | {t['measured'] * 1e3:.2f} "
            f"| {t['measured'] / t['plain']:.2f} | {t['softmax'] * 1e3:.2f} | {t['read'] * 1e3:.2f} "
            f"| {t['read'] / t['softmax']:.2f} |"
        )
        print(lines[-1], flush=True)
    out = write_results(lines, "softmax-read", out=args.out, quick=args.quick, gpu=gpu)
    print(f"written to {out}")
    return out


if __name__ == "__main__":
    main()
