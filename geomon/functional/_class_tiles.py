"""Tiled class-geometry passes for neural collapse at vocabulary scale.

Nothing here forms an ``N x C`` or ``C x C`` matrix: classes (or class pairs) are visited in row tiles of at most
``TILE_ELEMENTS`` entries, keeping running sums or a running best per sample.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from geomon.functional._common import TILE_ELEMENTS, autocast_off
from geomon.functional._dispatch import Backend, choose_backend


def tiled_argmax(features: Tensor, rows: Tensor, offset: Tensor, backend: Backend = "torch") -> Tensor:
    """``argmax_c (features @ rows[c] + offset[c])`` per sample, ties to the lowest ``c`` (as ``torch.argmax``).

    Args:
        features: ``[N, D]``. rows: ``[C, D]``. offset: ``[C]`` (``-inf`` excludes a class).
        backend: ``"triton"`` runs the fused kernel (float32/float16/bfloat16 features), see ``_dispatch``.
    """
    unsupported = "float64 features are searched by the torch path only" if features.dtype == torch.float64 else None
    if choose_backend(backend, "nc4 decisions", features, rows, unsupported=unsupported) == "triton":
        from geomon.kernels.class_argmax import tiled_argmax_triton

        return tiled_argmax_triton(features, rows, offset)
    n, c = features.shape[0], rows.shape[0]
    best_value = torch.full((n,), -math.inf, dtype=features.dtype, device=features.device)
    best_index = torch.zeros(n, dtype=torch.int64, device=features.device)
    tile = max(1, TILE_ELEMENTS // max(1, n))
    for start in range(0, c, tile):
        with autocast_off(features.device):  # in the features' dtype even inside the model's autocast region
            scores = features @ rows[start : start + tile].T + offset[start : start + tile]
        value, index = scores.max(dim=1)
        better = value > best_value  # strict: an earlier tile keeps a tie
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + start, best_index)
    return best_index


def nearest_centre(features: Tensor, means: Tensor, backend: Backend = "torch") -> Tensor:
    """``argmin_c |h - μ_c|`` per sample over the classes whose mean row is finite (NaN rows are skipped)."""
    known = means.isfinite().all(dim=1)
    centres = torch.where(known[:, None], means, 0.0)
    # |h - μ|² = |h|² - 2 h·μ + |μ|²: minimising it is maximising 2 h·μ - |μ|².
    offset = torch.where(known, -(centres * centres).sum(dim=1), -math.inf)
    return tiled_argmax(features, 2 * centres, offset, backend)


#: Two class means coincide when ``|μ_c - μ_c'|² <= COINCIDENT * (s_c + s_c')``, ``s_c = |μ_c|² + |μ_c - μ_G|²``: a
#: difference at the rounding level of the float64 means of identical float32 features (and of the distance computed
#: from the centred means). Their CDNV and ``log(1/|μ̂_c - μ̂_c'|)`` are infinite.
COINCIDENT = 1e-12


class PairSums(NamedTuple):
    """Sums over ordered pairs ``c != c'`` of seen classes (float64).

    The CDNV sum runs over the pairs whose means are apart, the ``g`` sums over the pairs whose centred-mean
    directions are apart (``COINCIDENT``): an infinite term would make the mean infinite and the variance NaN.
    """

    cos_shifted: Tensor  #: Σ (cos + 1/(C-1))
    cos_shifted_sq: Tensor  #: Σ (cos + 1/(C-1))²
    cos_shifted_abs: Tensor  #: Σ |cos + 1/(C-1)|
    log_inv_dist_shifted: Tensor  #: Σ (g - g_etf), g = log(1/|μ̂_c - μ̂_c'|), over pairs of distinct directions
    log_inv_dist_shifted_sq: Tensor  #: Σ (g - g_etf)², over the same pairs
    cdnv: Tensor  #: Σ (V_c + V_c') / (2 |μ_c - μ_c'|^exponent), over pairs of distinct means
    n_means_apart: Tensor  #: how many ordered pairs have distinct means
    n_directions_apart: Tensor  #: how many ordered pairs have distinct centred-mean directions


def pair_sums(centred_means: Tensor, variances: Tensor, exponent: float, scales: Tensor) -> PairSums:
    """One tiled pass over class pairs giving every pairwise neural-collapse statistic.

    Sums are shifted by their simplex-ETF values (``cos = -1/(C-1)``, ``g = -½ log(2C/(C-1))``) so that the
    variances computed from them do not cancel catastrophically near collapse. ``scales`` are the ``s_c`` of
    ``COINCIDENT``: the scale against which two means (or a mean and the global mean) coincide.
    """
    c = centred_means.shape[0]
    norms = centred_means.norm(dim=1)
    sq_norms = norms**2
    has_direction = sq_norms > COINCIDENT * scales  # a mean at the global mean has no direction
    unit = centred_means / norms[:, None]  # NaN for a mean exactly at the global mean: nc2_* read NaN
    cos_etf = -1.0 / (c - 1)
    g_etf = -0.5 * math.log(2 * c / (c - 1))
    zero = torch.zeros((), dtype=centred_means.dtype, device=centred_means.device)
    totals = [zero] * len(PairSums._fields)
    tile = max(1, (TILE_ELEMENTS // 8) // c)  # float64 and about eight live temporaries per tile: ~128 MiB
    for start in range(0, c, tile):
        stop = min(start + tile, c)
        off_diagonal = torch.arange(start, stop, device=unit.device)[:, None] != torch.arange(c, device=unit.device)
        cos = unit[start:stop] @ unit.T
        shifted = cos - cos_etf
        unit_dist_sq = (2 - 2 * cos).clamp(min=0)
        directions_apart = (
            off_diagonal & has_direction[start:stop, None] & has_direction[None, :] & (unit_dist_sq > 2 * COINCIDENT)
        )
        g = -0.5 * torch.log(torch.where(directions_apart, unit_dist_sq, 1.0)) - g_etf
        dist_sq = sq_norms[start:stop, None] + sq_norms[None, :] - 2 * centred_means[start:stop] @ centred_means.T
        means_apart = off_diagonal & (dist_sq > COINCIDENT * (scales[start:stop, None] + scales[None, :]))
        safe_dist_sq = torch.where(means_apart, dist_sq, 1.0)
        cdnv = (variances[start:stop, None] + variances[None, :]) / (2 * safe_dist_sq ** (exponent / 2))
        masked = (
            (shifted, off_diagonal),
            (shifted**2, off_diagonal),
            (shifted.abs(), off_diagonal),
            (g, directions_apart),
            (g**2, directions_apart),
            (cdnv, means_apart),
        )
        sums = [torch.where(mask, p, 0.0).sum() for p, mask in masked] + [means_apart.sum(), directions_apart.sum()]
        totals = [t + s for t, s in zip(totals, sums, strict=True)]
    return PairSums(*totals)
