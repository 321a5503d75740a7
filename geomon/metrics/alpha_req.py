"""alpha-ReQ as a streaming torchmetrics metric (see :func:`geomon.functional.alpha_req`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from geomon.functional.alpha_req import _alpha_req_compute, _check_fit_range
from geomon.metrics.rankme import EmbeddingMetric


class AlphaReQ(EmbeddingMetric):
    """Eigenspectrum decay α of all embeddings seen since the last reset.

    State: ``D x D`` Gram, ``D`` sum and a count (float64, summed across processes).

    Args:
        num_features: embedding width ``D`` (must exceed ``fit_range[1]`` for a value).
        fit_range: first and last eigenvalue rank of the fit, inclusive.
        return_r2: ``compute`` returns ``(α, R²)`` instead of ``α``.
        kwargs: torchmetrics ``Metric`` options.
    """

    def __init__(
        self,
        num_features: int,
        *,
        fit_range: tuple[int, int] = (11, 100),
        return_r2: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, **kwargs)
        self.fit_range = _check_fit_range(fit_range)
        if num_features <= self.fit_range[1]:
            raise ValueError(
                f"alpha-ReQ needs more than fit_range[1] = {self.fit_range[1]} eigenvalues, but num_features = "
                f"{num_features}: pass a fit_range that ends below {num_features}"
            )
        self.return_r2 = return_r2

    def compute(self) -> Tensor | tuple[Tensor, Tensor]:
        alpha, r2 = _alpha_req_compute(self._stats(), fit_range=self.fit_range)
        return (alpha, r2) if self.return_r2 else alpha
