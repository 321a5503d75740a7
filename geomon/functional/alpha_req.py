"""alpha-ReQ: the decay exponent of the embedding eigenspectrum (Agrawal et al., "α-ReQ: Assessing
representation quality in self-supervised learning by measuring eigenspectrum decay", NeurIPS 2022).

``λ_i`` are the eigenvalues of the covariance of the centred ``Z``, sorted descending (``i`` from 1). ``α`` is
minus the slope of the weighted least-squares fit ``log λ_i = -α log i + c`` with weights ``1 / i`` over the ranks
``fit_range[0]..fit_range[1]`` inclusive. Streaming form: ``Σz``, ``Σzzᵀ``, ``N`` give the covariance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geomon.functional._common import check_flag, nan, rescale_extreme, warn
from geomon.functional._embedding import EmbeddingStats, _covariance_eigenvalues, _embedding_update, _sums_problem

_alpha_req_update = _embedding_update


def _check_fit_range(fit_range: tuple[int, int]) -> tuple[int, int]:
    ok = (
        isinstance(fit_range, tuple | list)
        and len(fit_range) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in fit_range)
        and 1 <= fit_range[0] < fit_range[1]
    )
    if not ok:
        raise ValueError(f"fit_range must be two integer ranks (first, last) with 1 <= first < last, got {fit_range!r}")
    return int(fit_range[0]), int(fit_range[1])


def _power_law_fit(eigenvalues: Tensor, fit_range: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Weighted least-squares ``(α, R²)`` of ``log λ_i = -α log i + c`` with weights ``1/i`` (float64)."""
    first, last = fit_range
    ranks = torch.arange(first, last + 1, dtype=torch.float64, device=eigenvalues.device)
    x = ranks.log()
    y = eigenvalues[first - 1 : last].double().log()
    w = 1.0 / ranks
    x_mean = (w * x).sum() / w.sum()
    y_mean = (w * y).sum() / w.sum()
    slope = (w * (x - x_mean) * (y - y_mean)).sum() / (w * (x - x_mean) ** 2).sum()
    residual = y - (y_mean + slope * (x - x_mean))
    r2 = 1 - (w * residual**2).sum() / (w * (y - y_mean) ** 2).sum()
    return -slope, r2


def _alpha_req_compute(
    stats: EmbeddingStats, *, fit_range: tuple[int, int] = (11, 100), eigenvalues: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(α, R²)`` from accumulated :class:`EmbeddingStats`; both NaN (with a warning) when not computable.

    ``eigenvalues``: ``_covariance_eigenvalues(stats)`` when the caller already has them (one eigenproblem).
    """
    fit_range = _check_fit_range(fit_range)
    device = stats.gram.device
    n = int(stats.n.item())
    dim = stats.gram.shape[-1]
    if n < 2:
        warn(f"alpha_req needs at least 2 rows for a covariance, got {n}; returning NaN")
        return nan(device), nan(device)
    problem = _sums_problem(stats, "alpha_req")
    if problem is not None:
        warn(f"{problem}; returning NaN")
        return nan(device), nan(device)
    if eigenvalues is None:
        eigenvalues = _covariance_eigenvalues(stats)  # the zeros past min(N, D) are never fitted (see below)
    nonzero = int((eigenvalues > 0).sum().item())
    if nonzero <= fit_range[1]:
        warn(
            f"alpha_req needs more than fit_range[1] = {fit_range[1]} non-zero covariance eigenvalues, found {nonzero} "
            f"(N = {n} rows, D = {dim}); accumulate more rows, use wider embeddings or a smaller fit_range; "
            "returning NaN"
        )
        return nan(device), nan(device)
    return _power_law_fit(eigenvalues, fit_range)


def alpha_req(
    z: Tensor, *, fit_range: tuple[int, int] = (11, 100), return_r2: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Eigenspectrum decay coefficient α of embeddings, as alpha-ReQ defines it.

    Args:
        z: embeddings ``[N, D]``, any floating dtype.
        fit_range: first and last 1-based eigenvalue rank of the fit, inclusive.
        return_r2: also return the weighted R² of the fit (how power-law-like the spectrum is).

    Returns:
        ``α`` (float64 scalar), or ``(α, R²)``. NaN with a :class:`~geomon.GeomonWarning` when the covariance has
        no more than ``fit_range[1]`` non-zero eigenvalues (too few rows or too narrow embeddings).

    Example:
        >>> import torch
        >>> z = torch.randn(4096, 128, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 129) ** -0.5
        >>> 0.9 < float(alpha_req(z)) < 1.1
        True
    """
    z, _ = rescale_extreme(z)  # scale-invariant: keep a float64 Gram of extreme data finite and normal
    check_flag(return_r2, "return_r2")
    alpha, r2 = _alpha_req_compute(_alpha_req_update(z), fit_range=fit_range)
    return (alpha, r2) if return_r2 else alpha
