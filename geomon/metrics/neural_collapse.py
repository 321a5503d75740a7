"""Neural collapse as a streaming torchmetrics metric (see :func:`geomon.functional.neural_collapse`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geomon.functional._dispatch import BACKENDS, Backend
from geomon.functional.neural_collapse import (
    ClassStats,
    _check_cdnv_exponent,
    _check_ignore_index,
    _neural_collapse_compute,
    _neural_collapse_update,
    means_from_stats,
)
from geomon.metrics._base import StatsMetric, check_positive_int, zeros


class NeuralCollapse(StatsMetric):
    """NC1-NC4, CDNV, GNC2 and UNC3 of penultimate features against a classifier, over a window of batches.

    State: per class count, feature sum and squared-norm sum, the ``D x D`` feature Gram (``O(C·D + D²)``
    float64, summed across processes), and the ``nc4`` counts; ``update`` adds into the state tensors in place
    (no ``C x D`` temporary per batch). ``nc3``/``unc3`` use the classifier weight given to
    the latest ``update``. ``nc4`` needs class means before decisions: a window compares against the means of the
    *previous* window (``compute`` records them, ``reset`` adopts them), so it is NaN in the first window.
    ``forward`` only updates (a batch-level value would not mean anything here).

    Args:
        num_classes: ``C`` (rows of the classifier).
        num_features: ``D``.
        cdnv_exponent: as in :func:`geomon.functional.neural_collapse`.
        ignore_index: rows with this label (outside ``[0, C)``, e.g. -100 for padding) are left out.
        backend: class statistics and ``nc4`` decisions by ``"auto"`` (Triton kernels on CUDA), ``"torch"``,
            or ``"triton"``.
        kwargs: torchmetrics ``Metric`` options.
    """

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        *,
        cdnv_exponent: float = 2.0,
        backend: Backend = "auto",
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        _check_ignore_index(ignore_index, num_classes)
        self.ignore_index = ignore_index
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.num_features = check_positive_int(num_features, "num_features")
        _check_cdnv_exponent(cdnv_exponent)
        self.cdnv_exponent = cdnv_exponent
        c, d = num_classes, num_features
        self._add_stats_states(ClassStats(zeros(c), zeros(c, d), zeros(c), zeros(d, d), zeros(), zeros(), zeros()))
        self.register_buffer("reference_means", torch.full((c, d), float("nan"), dtype=torch.float64))
        self._has_reference = False  # a Python flag, so that update never reads the buffer on the host
        self._pending_means: Tensor | None = None
        self._weight: Tensor | None = None

    def update(
        self, features: Tensor, labels: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
    ) -> None:
        """Add features ``[N, D]`` with labels ``[N]``; ``weight [C, D]``/``bias [C]`` of the classifier head."""
        if isinstance(features, Tensor) and features.ndim == 2 and features.shape[1] != self.num_features:
            raise ValueError(f"features must have {self.num_features} features, got shape {tuple(features.shape)}")
        reference = self.reference_means if self._has_reference else None
        _neural_collapse_update(
            features,
            labels,
            weight,
            bias,
            num_classes=self.num_classes,
            class_means=reference,
            backend=self.backend,
            ignore_index=self.ignore_index,
            into=self._writable_stats(),
        )
        if weight is not None:
            self.record_weight(weight)

    def _writable_stats(self) -> ClassStats:
        """The state tensors, to be added into in place (no ``C x D`` temporary per update). A state made inside
        ``torch.inference_mode`` (a reset in a validation loop) cannot be written outside it: such a state is
        replaced by a normal copy once, on its first update outside inference mode."""
        inference = torch.is_inference_mode_enabled()
        for name in ClassStats._fields:
            state = getattr(self, name)
            if state.is_inference() and not inference:
                setattr(self, name, state.clone())
        return self._stats()

    def record_weight(self, weight: Tensor) -> None:
        """Keep a copy of the classifier weight ``[C, D]`` for ``nc3`` / ``unc3`` (the live parameter moves on, or is
        resharded, before compute)."""
        self._weight = weight.detach().clone()

    def compute(self) -> dict[str, Tensor]:
        stats = self._stats()
        self._pending_means = means_from_stats(stats).clone()
        return _neural_collapse_compute(stats, self._weight, cdnv_exponent=self.cdnv_exponent)

    def reset(self) -> None:
        """Start a new window; the class means of the last computed window become ``nc4``'s reference."""
        if self._pending_means is not None:
            self.reference_means = self._pending_means.to(self.reference_means.device)
            self._has_reference = True
            self._pending_means = None
        super().reset()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in ClassStats._fields:  # torchmetrics adopts the caller's tensors: own copies, as updates write them
            setattr(self, name, getattr(self, name).clone())
        self._has_reference = bool(torch.isfinite(self.reference_means).any())
