"""Sufficient statistics of a stream of embeddings, shared by RankMe and alpha-ReQ.

One set of sums serves every spectrum-based metric: ``n`` rows, their sum ``Σz`` and their Gram ``Σ z zᵀ``.
All three add across batches and processes, so streaming and DDP are exact. The Gram is formed and accumulated in
float64, whatever the input dtype: RankMe takes square roots of its eigenvalues, which turns float32 rounding in
the null space into spurious singular values (a rank-1 ``Z`` with D = 2048 reads about 1.4 from a float32 Gram instead
of 1.0033). Eigen-problems are solved in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from geomon.functional._common import check_float_tensor


class EmbeddingStats(NamedTuple):
    """Sum-reducible statistics of embeddings ``z[N, D]`` (all float64)."""

    n: Tensor  #: [] number of rows
    total: Tensor  #: [D] Σ z
    gram: Tensor  #: [D, D] Σ z zᵀ


def _embedding_update(z: Tensor, row_mask: Tensor | None = None) -> EmbeddingStats:
    """Statistics of one batch of embeddings ``z[N, D]``; an empty batch (N = 0) gives zeros.

    ``row_mask`` (bool ``[N]``, on ``z``'s device): only the rows where it is True count (padding tokens are left
    out). The others are zeroed, so they add nothing to the Gram or the sum (NaN or Inf in them included), and
    ``n`` counts the kept rows on the device: no boolean indexing, no host sync.
    """
    check_float_tensor(z, "z", 2, "[N, D]")
    if z.shape[1] == 0:
        raise ValueError(f"z must have at least one feature (D >= 1), got shape {tuple(z.shape)}")
    x = z.detach().double()
    if row_mask is None:
        n = torch.full((), float(x.shape[0]), dtype=torch.float64, device=x.device)  # no host-to-device copy
    else:
        if row_mask.dtype != torch.bool or row_mask.shape != x.shape[:1]:
            raise ValueError(f"row_mask must be a bool tensor of shape [{x.shape[0]}] (one flag per row of z), got "
                             f"{row_mask.dtype} of shape {tuple(row_mask.shape)}")  # fmt: skip
        row_mask = row_mask.to(x.device)
        x = torch.where(row_mask[:, None], x, 0.0)
        n = row_mask.sum(dtype=torch.float64)
    return EmbeddingStats(n=n, total=x.sum(dim=0), gram=x.T @ x)


#: A Gram whose largest diagonal entry is below this has lost precision to float64 underflow: entries at
#: ``λ_max · eps`` (what the spectrum resolves) would fall among the subnormals (``2^-1022``).
GRAM_UNDERFLOW = 2.0**-960

#: Why a streaming metric cannot do what the one-shot functions do with such data.
STREAMING_NOTE = (
    "the streaming metrics sum raw Grams across updates and processes and cannot rescale them; the one-shot "
    "functions rescale float64 input themselves (the metric is scale-invariant)"
)


def _sums_problem(stats: EmbeddingStats, metric: str) -> str | None:
    """A warning naming why the sums give no spectrum (non-finite data, or finite data whose float64 Gram overflows or
    underflows), or None when they are usable. Host syncs: the logging step only."""
    if not bool(stats.total.isfinite().all()):
        return f"{metric}: the embeddings contain NaN or Inf (or finite values whose float64 sum overflows)"
    if not bool(stats.gram.isfinite().all()):
        return (
            f"{metric}: the embeddings are finite, but their float64 Gram overflows (values of magnitude above about "
            f"1e154 / sqrt(N)); {STREAMING_NOTE}"
        )
    top = stats.gram.diagonal().amax() if stats.gram.numel() else stats.gram.new_zeros(())
    if bool(top < GRAM_UNDERFLOW) and bool((top > 0) | (stats.total != 0).any()):
        return (
            f"{metric}: the embeddings are non-zero but their float64 Gram underflows (every column's sum of squares "
            f"is below 2^-960: values of magnitude below about 1e-145 / sqrt(N)); {STREAMING_NOTE}"
        )
    return None


def _covariance(stats: EmbeddingStats) -> Tensor:
    """Unbiased covariance ``(Σzzᵀ - N μμᵀ) / (N - 1)`` from the sums (float64, symmetrised)."""
    n = stats.n
    cov = (stats.gram - torch.outer(stats.total, stats.total) / n) / (n - 1)
    return (cov + cov.T) / 2


def _eigvalsh_descending(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix in float64, descending.

    Values within round-off of zero (``<= λ_max · D · eps``, the tolerance of ``matrix_rank``) are set to exactly
    0: otherwise a rank-deficient Gram's null space, once square-rooted, reads as spurious singular values.
    """
    values = torch.linalg.eigvalsh(matrix.double()).flip(0)
    tolerance = values[0].clamp(min=0) * matrix.shape[-1] * torch.finfo(torch.float64).eps
    return torch.where(values > tolerance, values, 0.0)


def _rank(stats: EmbeddingStats) -> int:
    """``min(N, D)``: how many singular values ``N`` rows of width ``D`` have."""
    return min(int(stats.n.item()), stats.gram.shape[-1])


def _singular_values(stats: EmbeddingStats) -> Tensor:
    """The ``min(N, D)`` singular values of the uncentred rows, descending, from the Gram (float64).

    The ``D x D`` Gram has ``D`` eigenvalues; when ``N < D`` the ``D - N`` smallest are zeros that the rows do
    not have as singular values, so only the largest ``min(N, D)`` are kept.
    """
    return _eigvalsh_descending(stats.gram)[: _rank(stats)].sqrt()


def _covariance_eigenvalues(stats: EmbeddingStats) -> Tensor:
    """The largest ``min(N, D)`` eigenvalues of the covariance of the centred rows, descending (float64).

    ``min(N, D)`` as PCA keeps components (the centred rows have rank at most ``N - 1``, so with ``N <= D`` the
    last kept value is a zero).
    """
    return _eigvalsh_descending(_covariance(stats))[: _rank(stats)]


def _spectral_entropy_rank(values: Tensor, eps: float) -> Tensor:
    """``exp(-Σ p log p)`` with ``p = v / Σv + eps`` (RankMe's smoothed effective rank)."""
    p = values / values.sum() + eps
    return torch.exp(-(p * torch.log(p)).sum())
