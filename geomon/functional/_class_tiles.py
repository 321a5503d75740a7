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

#: Relative error bounds of one fast score ``s̃ = fl32(Σ_k x̂_k ŵ_k + fl32(b))``, by how the operands enter the
#: product: ``operand`` bounds the rounding of each operand to the multiplier's format (TF32 keeps 10 mantissa bits:
#: 2^-11 when rounded to nearest, 2^-10 when truncated, as tensor cores may; bf16 keeps 7: 2^-7 truncated; IEEE
#: fp32 products round once, 2^-24, charged here as an operand error), and every fp32 addition of the accumulation
#: is charged 2^-23 (truncation or round-to-nearest, in any order or blocking).
OPERAND_ROUNDOFF = {"tf32": 2.0**-10, "bf16": 2.0**-7, "ieee": 2.0**-24, "exact": 0.0}
SUM_ROUNDOFF = 2.0**-23
#: Below this magnitude an fp32 value may be flushed to zero (subnormals): an absolute error per operation.
_FLUSH = 2.0**-126
#: Rows whose ``|x|·max|w|`` or ``max|b|`` reach this may overflow fp32 in a partial sum: always re-checked.
_OVERFLOW = 2.0**126


def score_error_bound(features: Tensor, rows: Tensor, offset: Tensor, operands: str) -> Tensor:
    """``[N]`` float64 ``E_i`` with ``|s̃_ic - s_ic| <= E_i`` for every class ``c`` of finite offset, where ``s`` is the
    exact score ``x_i·w_c + b_c`` of the given values and ``s̃`` the fp32 score of the fast product (``operands``: a key
    of ``OPERAND_ROUNDOFF``); ``inf`` for rows that may overflow fp32. Derivation (``u`` operand, ``v`` sum roundoff,
    ``P = Σ_k |x_k w_k| <= |x|·|w|`` by Cauchy-Schwarz, ``γ_D = D·v / (1 - D·v)``):

    - operands: ``|x̂ŵ - xw| <= (2u + u²)|xw|`` term by term;
    - accumulation of ``D`` exact products in fp32: ``<= γ_D (1+u)² P``; so ``|dot̃ - dot| <= κ P`` with
      ``κ = 2u + u² + γ_D (1+u)²``;
    - the offset rounded to fp32 (``2^-24 |b|``) and the final fp32 addition (``2^-24 (|dot̃| + |b̂|)``);
    - flushed subnormals: at most ``_FLUSH`` per product and per addition, ``2(D + 2)·_FLUSH`` in all.

    So ``E_i = (κ + 2^-24 (1 + κ)) |x_i| W + (2^-24 + 2^-24 (1 + 2^-24)) B + 2(D + 2)·_FLUSH`` with
    ``W = max_c |w_c|`` and ``B = max_c |b_c|`` over the classes of finite offset, inflated by 1% for the float64
    rounding of the norms. A row whose fast best beats its fast second best by more than ``2 E_i`` has the same
    argmax as the exact scores: every other class ``c`` has
    ``s_c <= s̃_c + E_i <= s̃_2nd + E_i < s̃_best - E_i <= s_best``.
    """
    dim = features.shape[1]
    wider = torch.float64 in (features.dtype, rows.dtype)  # float64 values rounded to fp32 first: one more 2^-24
    u, v, r = OPERAND_ROUNDOFF[operands] + (2.0**-24 if wider else 0.0), SUM_ROUNDOFF, 2.0**-24
    gamma = dim * v / (1 - dim * v)
    kappa = 2 * u + u * u + gamma * (1 + u) ** 2
    scored = torch.isfinite(offset)
    b = (
        torch.where(scored, offset.double().abs(), 0.0).max()
        if offset.numel()
        else offset.new_zeros((), dtype=torch.float64)
    )
    row_norms = torch.linalg.vector_norm(rows.double(), dim=1)
    w = torch.where(scored, row_norms, 0.0).max() if rows.shape[0] else row_norms.new_zeros(())
    x = torch.linalg.vector_norm(features.double(), dim=1)
    product = x * w
    bound = 1.01 * ((kappa + r * (1 + kappa)) * product + (r + r * (1 + r)) * b) + 2 * (dim + 2) * _FLUSH
    safe = (product < _OVERFLOW) & (b < _OVERFLOW) & torch.isfinite(bound)
    return torch.where(safe, bound, math.inf)


def decided(best: Tensor, second: Tensor, bound: Tensor) -> Tensor:
    """``[N]`` bool: the fast best is the exact argmax (its lead over the second best exceeds twice the bound)."""
    best, second = best.double(), second.double()
    return torch.isfinite(best) & (best - second > 2 * bound)  # NaN and inf compare False: re-checked


def tiled_argmax(features: Tensor, rows: Tensor, offset: Tensor, backend: Backend = "torch") -> Tensor:
    """``argmax_c (features @ rows[c] + offset[c])`` per sample, ties to the lowest ``c`` (as ``torch.argmax``),
    the same decisions as the float64 scores of the given values. A NaN score counts as ``-inf`` (a row with
    nothing else gets class 0).

    Float64 features are searched in float64. Otherwise a fast fp32 search (TF32 tensor cores in the kernel) keeps
    each row's best and second-best score; rows whose lead is within ``2 x score_error_bound`` are searched again in
    float64 (few rows, unless the classes are nearly tied). The torch path's re-check selects those rows (a host
    sync on CUDA; the kernel path has none).

    Args:
        features: ``[N, D]``. rows: ``[C, D]``. offset: ``[C]`` (``-inf`` excludes a class; float64 is used as is).
        backend: ``"triton"`` runs the fused kernels (float32/float16/bfloat16 features), see ``_dispatch``.
    """
    unsupported = "float64 features are searched by the torch path only" if features.dtype == torch.float64 else None
    if choose_backend(backend, "nc4 decisions", features, rows, unsupported=unsupported) == "triton":
        from geomon.kernels.class_argmax import tiled_argmax_triton

        return tiled_argmax_triton(features, rows, offset)
    if features.dtype == torch.float64:
        return _exact_search(features, rows, offset)
    h = features.float()
    best, best_index, second = _search(h, rows, offset)
    redo = ~decided(best, second, score_error_bound(h, rows, offset, _torch_operands(features.device)))
    rows_to_redo = redo.nonzero().squeeze(1)
    if rows_to_redo.numel() == 0:
        return best_index
    return best_index.index_copy(0, rows_to_redo, _exact_search(h[rows_to_redo], rows, offset))


def _exact_search(features: Tensor, rows: Tensor, offset: Tensor) -> Tensor:
    """The float64 argmax, every score summed over the features by one reduction of the same length, so that equal
    class rows score equal (a blocked matmul may sum two equal rows in different orders); ties to the lowest class."""
    n, dim = features.shape
    h = features.double()
    best = torch.full((n,), -math.inf, dtype=torch.float64, device=h.device)
    best_index = torch.zeros(n, dtype=torch.int64, device=h.device)
    tile = max(1, TILE_ELEMENTS // max(1, n * dim))
    for start in range(0, rows.shape[0], tile):
        block = rows[start : start + tile].double()
        scores = (h[:, None, :] * block[None, :, :]).sum(dim=2) + offset[start : start + tile].double()
        value, index = _skip_nan(scores).max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + start, best_index)
    return best_index


def _skip_nan(scores: Tensor) -> Tensor:
    """NaN scores (from NaN or infinite features or rows) as ``-inf``, in place: they never win, and a row with no
    other score keeps class 0 - the kernels' rule. ``max`` would return the NaN and drop the tile's real maximum."""
    return scores.masked_fill_(scores.isnan(), -math.inf)


def _torch_operands(device: torch.device) -> str:
    """How torch's fp32 matmul rounds its operands here (``torch.set_float32_matmul_precision``, or the per-backend
    ``fp32_precision`` settings of newer torch, which make the legacy getter raise); unknown settings read as the
    coarsest rounding (bf16), so the bound stays an upper bound."""
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # the new API was used: read this device's own setting
        mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
        backend = torch.backends.cuda.matmul if device.type == "cuda" else mkldnn
        setting = getattr(backend, "fp32_precision", "none")
        if setting == "none":
            setting = getattr(torch.backends, "fp32_precision", "none")
        return {"ieee": "ieee", "none": "ieee", "tf32": "tf32"}.get(setting, "bf16")
    if precision == "medium":
        return "bf16"
    if precision == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return "ieee"


def _search(features: Tensor, rows: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(best score, its class, second-best score)`` per sample in the features' dtype (``rows`` and ``offset`` are
    converted tile by tile), class tile by tile; ties to the lowest class. The second best is the best of the other
    classes (equal to the best on a tie)."""
    n, c = features.shape[0], rows.shape[0]
    best = torch.full((n,), -math.inf, dtype=features.dtype, device=features.device)
    second = best.clone()
    best_index = torch.zeros(n, dtype=torch.int64, device=features.device)
    tile = max(1, TILE_ELEMENTS // max(1, n))
    for start in range(0, c, tile):
        with autocast_off(features.device):  # in the features' dtype even inside the model's autocast region
            block = rows[start : start + tile].to(features.dtype)
            scores = _skip_nan(features @ block.T + offset[start : start + tile].to(features.dtype))
        value, index = scores.max(dim=1)  # the first maximum
        runner_up = scores.scatter_(1, index[:, None], -math.inf).max(dim=1).values
        better = value > best  # strict: an earlier tile keeps a tie
        second = torch.where(better, torch.maximum(best, runner_up), torch.maximum(second, value))
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + start, best_index)
    return best, best_index, second


def nearest_centre(features: Tensor, means: Tensor, backend: Backend = "torch") -> Tensor:
    """``argmin_c |h - μ_c|`` per sample over the classes whose mean row is finite (NaN rows are skipped)."""
    known = means.isfinite().all(dim=1)
    centres = torch.where(known[:, None], means, 0.0)
    # |h - μ|² = |h|² - 2 h·μ + |μ|²: minimising it is maximising 2 h·μ - |μ|² (in float64, so that the decisions
    # are those of the float64 distances; 2μ is exact in the means' dtype)
    offset = torch.where(known, -(centres.double() ** 2).sum(dim=1), -math.inf)
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


def pair_sums(
    centred_means: Tensor, variances: Tensor, exponent: float, scales: Tensor, has_direction: Tensor
) -> PairSums:
    """One tiled pass over class pairs giving every pairwise neural-collapse statistic.

    Sums are shifted by their simplex-ETF values (``cos = -1/(C-1)``, ``g = -½ log(2C/(C-1))``) so that the
    variances computed from them do not cancel catastrophically near collapse. ``scales`` are the ``s_c`` of
    ``COINCIDENT``: the scale against which two means coincide. ``has_direction`` (``[C]`` bool): False for a mean
    at the global mean (to rounding), whose direction is noise: its cosines are NaN (so ``nc2_*`` read NaN) and its
    pairs are left out of the ``g`` sums.
    """
    c = centred_means.shape[0]
    norms = centred_means.norm(dim=1)
    sq_norms = norms**2
    unit = torch.where(has_direction[:, None], centred_means / norms[:, None], math.nan)
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
