"""Compute-time cost of the logit-map norms: the exact QR + SVD form against warm-started power iteration.

Every compute of a monitored model takes ``σ(W_Q,hᵀ W_K,h)·scale`` of every head of every attention layer
(:mod:`geomon.probes.logit_map`). This script times both ways side by side in one run, on GPT-2-small shapes by
default (12 layers, 12 heads of 64, width 768, weights drawn like GPT-2's initialisation, std 0.02): the exact form
:func:`~geomon.probes.logit_map.logit_map_sigma` (float64 thin QRs and an SVD per head) and
:func:`~geomon.probes.logit_map.logit_map_sigma_power` from the previous compute's vectors (the probe's default:
blocks of ``LogitMapProbe.power_steps`` power steps, repeated while an estimate still moves by more than
``LogitMapProbe.power_tol``). Between computes every weight drifts by ``--drift`` times its size in a random
direction, as a training step moves it, so the power path has something to track. The two arms alternate in ABBA
order over ``--reps`` computes; each prints its median time per compute (all layers) and their ratio, and the largest
relative error of the power estimate against the exact value over the run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/logit_map_cost.py --threads 1
    .venv/bin/python benchmarks/logit_map_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from geomon.probes.logit_map import LogitMapProbe, logit_map_sigma, logit_map_sigma_power


def _timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--drift", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.heads, args.head_dim, args.width)
    weights = [[0.02 * torch.randn(shape, generator=g, device=device) for _ in range(2)] for _ in range(args.layers)]
    scale = args.head_dim**-0.5
    vectors = [logit_map_sigma_power(w_q, w_k, scale)[1] for w_q, w_k in weights]  # the first compute: cold

    def exact():
        return [logit_map_sigma(w_q, w_k, scale) for w_q, w_k in weights]

    def power():
        out = []
        for i, (w_q, w_k) in enumerate(weights):
            sigma, vectors[i] = logit_map_sigma_power(w_q, w_k, scale, vectors[i], steps=LogitMapProbe.power_steps,
                                                      tol=LogitMapProbe.power_tol)  # fmt: skip
            out.append(sigma)
        return out

    times: dict[str, list[float]] = {"exact": [], "power": []}
    worst = 0.0
    for rep in range(args.reps):
        for w in (w for pair in weights for w in pair):
            w.add_(args.drift * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=g, device=device))
        order = ("exact", "power") if rep % 2 == 0 else ("power", "exact")
        results = {}
        for arm in order:
            seconds, results[arm] = _timed(exact if arm == "exact" else power, device)
            times[arm].append(seconds)
        for e, p in zip(results["exact"], results["power"], strict=True):
            worst = max(worst, float(((e - p).abs() / e).max()))
    t_exact, t_power = (statistics.median(times[arm]) for arm in ("exact", "power"))
    shapes = f"{args.layers} layers x {args.heads} heads of {args.head_dim}, width {args.width}"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; {shapes}; "
          f"{args.reps} computes, drift {args.drift:g}")  # fmt: skip
    print(f"exact (float64 QR + SVD):   median {1e3 * t_exact:8.2f} ms per compute")
    print(f"power (warm, steps {LogitMapProbe.power_steps}, tol {LogitMapProbe.power_tol}): median "
          f"{1e3 * t_power:8.2f} ms per compute")  # fmt: skip
    print(f"ratio exact / power: {t_exact / t_power:.1f}x; largest relative error of the power estimate: {worst:.1e}")


if __name__ == "__main__":
    main()
