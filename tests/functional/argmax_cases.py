"""Adversarial inputs for the class searches of ``nc4``, with their float64 reference decisions."""

from __future__ import annotations

import math

import numpy as np
import torch


def reference_argmax(features, rows, offset) -> torch.Tensor:
    """The argmax of the correctly rounded float64 scores of the given values (``math.fsum`` of the exact products
    and the offset: equal rows score equal), ties to the lowest class as ``torch.argmax``."""
    products = (features.double().cpu()[:, None, :] * rows.double().cpu()[None, :, :]).numpy()  # exact
    bias = offset.double().cpu().tolist()
    scores = [[math.fsum([*products[i, c], bias[c]]) for c in range(len(bias))] for i in range(len(products))]
    return torch.tensor(scores, dtype=torch.float64).argmax(dim=1)


def near_ties(n: int, dim: int, seed: int, scale: float = 1.0):
    """``(features [n, D], rows [2n + 3, D], offset)``: sample ``i`` scores highest on its own pair of classes, two
    fp32 rows one ulp apart in one coordinate (score gap ~1e-8 relative: below fp32 / TF32 rounding, far above
    float64's), in random order; class ``2n + 1`` duplicates a pair row (an exact tie, a later class), and class
    ``2n + 2`` is excluded (offset -inf) although it would win."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    rows = np.zeros((2 * n + 3, dim), np.float32)
    for i in range(n):
        base = (x[i] * np.float32(2.0)).astype(np.float32)
        other = base.copy()
        k = int(np.argmax(np.abs(x[i])))
        other[k] = np.nextafter(other[k], np.float32(np.inf if rng.random() < 0.5 else -np.inf))
        first, second = (base, other) if rng.random() < 0.5 else (other, base)
        rows[2 * i], rows[2 * i + 1] = first, second
    rows[2 * n] = 0.1 * rng.standard_normal(dim)
    rows[2 * n + 1] = rows[2 * (n // 2)]
    rows[2 * n + 2] = 10 * x[0]
    offset = np.zeros(2 * n + 3, np.float32)
    offset[2 * n + 2] = -np.inf
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    return t(x) * scale, t(rows) * scale, t(offset)


def exact_ties(dim: int, seed: int):
    """Duplicated class rows: the winner appears at classes 3, 40 and 70 (one and two 64-class tiles apart)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(100, dim, generator=g)
    direction = torch.randn(dim, generator=g)
    features = direction + 0.1 * torch.randn(5, dim, generator=g)
    rows[[3, 40, 70]] = 4 * direction
    return features, rows, torch.zeros(100)
