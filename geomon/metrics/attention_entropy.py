"""Attention entropy and max logit as a streaming torchmetrics metric (see
:func:`geomon.functional.attention_entropy`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geomon.functional._dispatch import BACKENDS, Backend
from geomon.functional.attention_entropy import (
    ATTENTION_REDUCTIONS,
    AttentionStats,
    MaskPattern,
    _attention_entropy_compute,
    _attention_entropy_update,
    _stats_from_rows,
)
from geomon.functional.attention_scores import _attention_entropy_update_scores
from geomon.metrics._base import StatsMetric, check_positive_int, zeros


class AttentionEntropy(StatsMetric):
    """Per-head entropy and max logit of one attention layer, over every call seen since the last reset.

    State: five ``[num_heads]`` float64 vectors (sums and counts reduced with a sum, max logits with a max).
    ``compute`` returns ``entropy`` and ``entropy_normalized`` (means over batch, heads and valid query rows),
    ``max_logit`` (max over everything), and the same three per head (``*_per_head``, ``[num_heads]``).

    Args:
        num_heads: query heads ``H`` of the layer.
        backend: ``"auto"`` (the fused Triton kernel on CUDA), ``"torch"`` or ``"triton"``.
        kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> metric = AttentionEntropy(num_heads=2)
        >>> metric.update(torch.zeros(1, 2, 4, 8), torch.randn(1, 2, 16, 8))  # zero queries: uniform rows
        >>> round(float(metric.compute()["entropy_normalized"]), 6)
        1.0
    """

    max_fields = frozenset(ATTENTION_REDUCTIONS)

    def __init__(self, num_heads: int, *, backend: Backend = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_heads = check_positive_int(num_heads, "num_heads")
        self.backend = backend
        h = num_heads
        self._add_stats_states(
            AttentionStats(zeros(h), zeros(h), zeros(h), zeros(h), torch.full((h,), -math.inf, dtype=torch.float64))
        )

    def update(
        self,
        q: Tensor,
        k: Tensor,
        *,
        scale: float | None = None,
        is_causal: bool = False,
        attn_mask: Tensor | None = None,
        query_index: Tensor | None = None,
        query_padding: Tensor | None = None,
        _masked_at: float | None = None,
        _pattern: MaskPattern | None = None,
    ) -> None:
        """Add one attention call's queries ``[B, H, Nq, Dh]`` and keys ``[B, Hk, Nk, Dh]`` (SDPA semantics);
        ``query_index`` (valid positions, not checked here) restricts the rows measured; ``query_padding``
        (``[B, Nq]`` boolean) leaves those rows out. ``_masked_at``, ``_pattern``: private, a captured call's
        ``masked_at`` and ``pattern`` (see :class:`~geomon.capture.AttentionCall`)."""
        if isinstance(q, Tensor) and q.ndim == 4 and q.shape[1] != self.num_heads:
            raise ValueError(f"q must have {self.num_heads} heads (num_heads), got shape {tuple(q.shape)}")
        stats = _attention_entropy_update(
            q,
            k,
            scale=scale,
            is_causal=is_causal,
            attn_mask=attn_mask,
            query_index=query_index,
            backend=self.backend,
            masked_at=_masked_at,
            query_padding=query_padding,
            pattern=_pattern,
        )
        self._accumulate(stats)

    def update_scores(
        self,
        scores: Tensor,
        *,
        query_index: Tensor | None = None,
        query_padding: Tensor | None = None,
        masked_at: float | None = None,
    ) -> None:
        """Add the rows of scores a model formed itself, ``[B, H, Nq, Nk]`` (its softmax input: scale, biases and
        mask included; keys at ``-inf``, or at or below ``masked_at``, are not allowed); ``query_index`` and
        ``query_padding`` as in :meth:`update`."""
        if not isinstance(scores, Tensor) or scores.ndim != 4 or scores.shape[1] != self.num_heads:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scores must be [B, {self.num_heads} heads, Nq, Nk], got {shape}")
        stats = _attention_entropy_update_scores(
            scores, masked_at=masked_at, query_index=query_index, query_padding=query_padding
        )
        self._accumulate(stats)

    def _update_rows(self, entropy: Tensor, max_logit: Tensor, n_keys: Tensor) -> None:
        """Add rows already reduced (``[B, H, Nq]`` each; the capture's softmax reader)."""
        self._accumulate(_stats_from_rows(entropy, max_logit, n_keys))

    def compute(self) -> dict[str, Tensor]:
        return _attention_entropy_compute(self._stats())
