"""Spectral norm of one weight as a torchmetrics metric with a persistent power-iteration vector (see
:func:`geomon.functional.spectral_norm`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from geomon.functional.spectral_norm import _spectral_norm_compute, _spectral_norm_update


class SpectralNorm(Metric):
    """σ of a weight, tracked with one power step per ``update`` from a warm-started vector.

    The state is the left singular vector ``u`` and the latest ``sigma`` (persistent buffers: saved in checkpoints,
    kept by ``reset``,
    moved by ``.to()``), not a sum: under DDP every process holds the same weight and so the same ``u``, and nothing
    is synchronised. The first ``update`` starts cold (100 steps); each later one takes ``steps_per_update``.

    Example:
        >>> import torch
        >>> metric = SpectralNorm()
        >>> metric.update(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
        >>> round(float(metric.compute()), 5)
        3.0
    """

    full_state_update = False

    def __init__(self, *, steps_per_update: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(steps_per_update, bool) or not isinstance(steps_per_update, int) or steps_per_update < 1:
            raise ValueError(f"steps_per_update must be a positive integer, got {steps_per_update!r}")
        self.steps_per_update = steps_per_update
        self.register_buffer("u", None)
        self.register_buffer("sigma", None)

    def update(self, w: Tensor) -> None:
        """One (or ``steps_per_update``) power steps on the current weight ``[..., out, in]``."""
        warm = self.u is not None and self.u.shape == w.shape[:-1]
        steps = self.steps_per_update if warm else None
        self.u = _spectral_norm_update(w, self.u if warm else None, n_iter=steps)
        self.sigma = _spectral_norm_compute(w, self.u)  # measured now: no reference to the live weight is kept

    def compute(self) -> Tensor:
        """σ of the weight as it was at the latest ``update``."""
        if self.sigma is None:
            raise RuntimeError("SpectralNorm.compute() was called before any update()")
        return self.sigma

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("u", "sigma"):  # materialise the lazily-shaped buffers so that they can be loaded
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
