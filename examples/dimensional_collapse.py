"""RankMe and alpha-ReQ telling a healthy embedding from a dimensionally collapsed one, streamed over batches.

Run: ``python examples/dimensional_collapse.py``. Three synthetic "encoders" map the same inputs to 256-D
embeddings: a healthy one (a broad, slowly decaying spectrum), one collapsed onto 8 directions, and one whose
spectrum decays fast. The metrics stream over batches (update many times, compute once) as they would in training.
"""

from __future__ import annotations

import argparse

import torch

from geomon.metrics import AlphaReQ, RankMe


def embeddings(kind: str, batch: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    dim = mixing.shape[0]
    if kind == "healthy":
        scales = torch.arange(1, dim + 1) ** -0.5
    elif kind == "collapsed":
        scales = torch.zeros(dim)
        scales[:8] = 1.0
        scales = scales + 1e-3  # a little noise in the dead directions, as in a real network
    else:  # "fast decay"
        scales = torch.arange(1, dim + 1) ** -1.5
    return (batch * scales) @ mixing


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    dim = 256
    generator = torch.Generator().manual_seed(0)
    mixing, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    results = {}
    for kind in ("healthy", "collapsed", "fast decay"):
        rankme, alpha = RankMe(num_features=dim), AlphaReQ(num_features=dim)
        for _ in range(args.batches):
            z = embeddings(kind, torch.randn(args.batch_size, dim, generator=generator), mixing)
            rankme.update(z)
            alpha.update(z)
        results[kind] = (float(rankme.compute()), float(alpha.compute()))
        print(f"{kind:>11}: RankMe {results[kind][0]:6.1f} of {dim}   alpha-ReQ {results[kind][1]:.2f}")
    return results


if __name__ == "__main__":
    main()
