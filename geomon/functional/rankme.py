"""RankMe: the effective rank of embeddings (Garrido et al., "RankMe: Assessing the downstream performance of
pretrained self-supervised representations by their rank", ICML 2023).

``σ_k`` are the singular values of the *uncentred* ``Z[N, D]``; ``p_k = σ_k / Σ_j σ_j + eps``;
``RankMe = exp(-Σ_k p_k log p_k)``, over the ``min(N, D)`` singular values the SVD gives. Streaming form:
``σ = sqrt(eigvalsh(Σ_batches Zᵀ Z))``, the largest ``min(N, D)`` of the Gram's ``D`` eigenvalues (the others are
zeros ``Z`` does not have, and each would add ``-eps log eps``).

The named variant ``centered=True`` is a different number: the effective rank of the eigenvalues ``λ`` of the
covariance of the *centred* ``Z`` (``λ = σ²`` of the centred data), as used by studies of LM pretraining phases;
it also counts the largest ``min(N, D)`` eigenvalues, as PCA keeps components.
"""

from __future__ import annotations

from torch import Tensor

from geomon.functional._common import check_flag, check_number, nan, rescale_extreme, warn
from geomon.functional._embedding import (
    EmbeddingStats,
    _covariance_eigenvalues,
    _embedding_update,
    _singular_values,
    _spectral_entropy_rank,
    _sums_problem,
)

_rankme_update = _embedding_update


def _rankme_compute(
    stats: EmbeddingStats,
    *,
    eps: float = 1e-7,
    centered: bool = False,
    min_samples: int = 1,
    spectrum: Tensor | None = None,
) -> Tensor:
    """RankMe from accumulated :class:`EmbeddingStats`; NaN (with a warning) when it cannot be computed.

    ``spectrum``: the values already computed from ``stats`` (``_covariance_eigenvalues`` when ``centered``, else
    ``_singular_values``), so that a caller that needs them for something else solves the eigenproblem once.
    """
    if check_number(eps, "eps", "a number >= 0") < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_flag(centered, "centered")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples must be a positive integer, got {min_samples!r}")
    device = stats.gram.device
    n = int(stats.n.item())
    needed = max(min_samples, 2 if centered else 1)
    if n < needed:
        warn(f"rankme needs at least {needed} rows, got {n}; returning NaN")
        return nan(device)
    problem = _sums_problem(stats, "rankme")
    if problem is not None:
        warn(f"{problem}; returning NaN")
        return nan(device)
    if spectrum is not None:
        values = spectrum
    else:
        values = _covariance_eigenvalues(stats) if centered else _singular_values(stats)
    if not bool(values.sum() > 0):
        warn("rankme: the embeddings are all zero (no spectrum); returning NaN")
        return nan(device)
    return _spectral_entropy_rank(values, eps)


def rankme(z: Tensor, *, eps: float = 1e-7, centered: bool = False, min_samples: int = 1) -> Tensor:
    """Effective rank of embeddings, as RankMe defines it.

    Args:
        z: embeddings ``[N, D]``, any floating dtype (computed in float32 or better, eigenvalues in float64).
        eps: smoothing added to each of the ``min(N, D)`` normalised singular values (the paper's 1e-7); it makes
            RankMe slightly exceed ``min(N, D)`` on a flat spectrum (``rankme(eye(100)) = 100.0036``) and is not
            clamped.
        centered: if True, the covariance-eigenvalue variant (a different number; never log the two under one key).
        min_samples: fewer rows than this give NaN and a warning (RankMe is biased low for ``N`` below a few ``D``).

    Returns:
        A float64 scalar tensor.

    Example:
        >>> import torch
        >>> round(float(rankme(torch.eye(100))), 4)
        100.0036
    """
    z, _ = rescale_extreme(z)  # scale-invariant: keep a float64 Gram of extreme data finite and normal
    return _rankme_compute(_rankme_update(z), eps=eps, centered=centered, min_samples=min_samples)
