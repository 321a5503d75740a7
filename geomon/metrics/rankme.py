"""RankMe as a streaming torchmetrics metric (see :func:`geomon.functional.rankme`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from geomon.functional._common import check_float_tensor
from geomon.functional._embedding import EmbeddingStats
from geomon.functional.rankme import _rankme_compute, _rankme_update
from geomon.metrics._base import StatsMetric, check_positive_int, zeros


class EmbeddingMetric(StatsMetric):
    """Accumulates :class:`~geomon.functional._embedding.EmbeddingStats` of ``[N, num_features]`` batches."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_features = check_positive_int(num_features, "num_features")
        self._add_stats_states(EmbeddingStats(zeros(), zeros(num_features), zeros(num_features, num_features)))

    def update(self, z: Tensor, row_mask: Tensor | None = None) -> None:
        """Add a batch of embeddings ``[N, num_features]`` (an empty batch adds nothing); with ``row_mask`` (bool
        ``[N]``), only the rows where it is True (say, the real tokens of a padded batch)."""
        check_float_tensor(z, "z", 2, f"[N, {self.num_features}]")
        if z.shape[1] != self.num_features:
            raise ValueError(f"z must have {self.num_features} features (num_features), got shape {tuple(z.shape)}")
        self._accumulate(_rankme_update(z, row_mask))


class RankMe(EmbeddingMetric):
    """Effective rank of all embeddings seen since the last reset.

    State: ``D x D`` Gram, ``D`` sum and a count (float64, summed across processes).

    Args:
        num_features: embedding width ``D``.
        eps: as in :func:`geomon.functional.rankme`.
        centered: as in :func:`geomon.functional.rankme`.
        min_samples: fewer rows than this give NaN and a warning; default ``4 * num_features`` (RankMe is biased low
            on fewer rows: a 256-D Gaussian reads about 205 at N = 256).
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> import torch
        >>> metric = RankMe(num_features=100, min_samples=100)
        >>> for chunk in torch.eye(100).split(30):
        ...     metric.update(chunk)
        >>> round(float(metric.compute()), 4)
        100.0036
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-7,
        centered: bool = False,
        min_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, **kwargs)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        min_samples = 4 * num_features if min_samples is None else min_samples
        check_positive_int(min_samples, "min_samples")
        self.eps, self.centered, self.min_samples = eps, centered, min_samples

    def compute(self) -> Tensor:
        return _rankme_compute(self._stats(), eps=self.eps, centered=self.centered, min_samples=self.min_samples)
