"""Class statistics of one batch added into a float64 state: geomon's path against plain ``index_add_``.

Side by side in one run, interleaved round by round (so that the arms share the machine's load), Zipf-distributed
labels as an LM's next tokens are:

- ``geomon``: :func:`geomon.functional.neural_collapse.add_class_sums` (the Triton segment-sum kernel on CUDA, the
  torch ``index_add_`` path on the CPU), counts, sums and squared-norm sums into the state in place;
- ``index_add_``: ``state.index_add_(0, labels, features.double())`` (sums only; atomics on CUDA);
- ``dense temp``: what geomon did before: a zero ``C x D`` float64 array per batch, ``index_add_`` into it, then
  ``state + temp`` (sums only).

Prints, per arm, the median time of one update and a distribution-free 95% interval of that median (order
statistics), with the machine. ``python benchmarks/class_stats.py`` (CPU, small shapes) or ``--device cuda``
(C = 50257, D = 768, N = 8192 tokens).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from geomon.functional.neural_collapse import add_class_sums, zero_stats

try:
    from benchmarks._machine import cpu_model, loadavg
except ImportError:  # run as a script from benchmarks/
    from _machine import cpu_model, loadavg  # type: ignore[no-redef]


def zipf_labels(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """``n`` labels in ``[0, c)`` with ``P(k) ∝ 1 / (k + 1)``."""
    p = 1.0 / np.arange(1, c + 1)
    return torch.from_numpy(np.random.default_rng(seed).choice(c, size=n, p=p / p.sum()))


def median_interval(times: list[float]) -> tuple[float, float, float]:
    """Median and a distribution-free ~95% interval for it (order statistics ``n/2 ± 1.96 √n / 2``)."""
    ordered = sorted(times)
    n = len(ordered)
    half = 1.96 * math.sqrt(n) / 2
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return float(np.median(ordered)), ordered[low], ordered[high]


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    return run


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, default=None, help="C (default 50257)")
    parser.add_argument("--dim", type=int, default=None, help="D (default 768 on CUDA, 128 on the CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="N (default 8192 on CUDA, 2048 on the CPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 200 CUDA, 25 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    c = args.classes or 50257
    d = args.dim or (768 if cuda else 128)
    n = args.tokens or (8192 if cuda else 2048)
    rounds = args.rounds or (200 if cuda else 25)
    dtype = getattr(torch, args.dtype)
    device = args.device

    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=g).to(device, dtype)
    labels = zipf_labels(n, c).to(device)
    stats = zero_stats(c, d, device)
    state = torch.zeros(c, d, dtype=torch.float64, device=device)
    dense_state = torch.zeros(c, d, dtype=torch.float64, device=device)

    def dense_temp() -> None:
        nonlocal dense_state
        temp = torch.zeros(c, d, dtype=torch.float64, device=device).index_add_(0, labels, features.double())
        dense_state = dense_state + temp

    arms: dict[str, Callable[[], object]] = {
        "geomon": lambda: add_class_sums(stats, features, labels, backend="auto"),
        "index_add_": lambda: state.index_add_(0, labels, features.double()),
        "dense temp": dense_temp,
    }
    timer = _timer(device)
    for fn in arms.values():  # warm-up: compilation, first allocations
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))  # ABC CBA: no arm always runs first
        for name in order:
            times[name].append(timer(arms[name]))

    # the arms did the same work: equal sums after as many updates (float64, up to the order of the additions)
    torch.testing.assert_close(stats.feature_sum, state, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dense_state, state, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.count, torch.bincount(labels, minlength=c).double() * (rounds + 2))
    machine = torch.cuda.get_device_name() if cuda else f"{cpu_model()} ({torch.get_num_threads()} threads)"
    distinct = int(torch.unique(labels).numel())
    lines = [
        f"Class statistics, one update: C = {c}, D = {d}, N = {n} {args.dtype} tokens, Zipf labels "
        f"({distinct} distinct classes), float64 state, {rounds} interleaved rounds; the arms' sums checked equal "
        "at the end",
        f"Machine: {machine}; torch {torch.__version__}, Python {platform.python_version()}; load {loadavg()}",
        "",
        "| path | median ms | 95% interval of the median |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        median, low, high = median_interval(values)
        lines.append(f"| {name} | {median:.3f} | {low:.3f} - {high:.3f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
