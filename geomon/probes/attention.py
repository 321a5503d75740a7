"""Attention entropy and max logit per attention module, fed with every captured attention call."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geomon.capture import AttentionCall
from geomon.functional._dispatch import Backend
from geomon.metrics import AttentionEntropy

#: (key prefix, metric output, per-head output)
FIELDS = (
    ("geomon/attention/entropy", "entropy", "entropy_per_head"),
    ("geomon/attention/entropy_normalized", "entropy_normalized", "entropy_normalized_per_head"),
    ("geomon/attention/max_logit", "max_logit", "max_logit_per_head"),
)


class AttentionProbe:
    """One :class:`~geomon.metrics.AttentionEntropy` per attention module, created on its first call.

    Args:
        backend: kernels or torch (see :mod:`geomon.functional`).
        query_rows: measure at most this many evenly spaced query rows per call (``None``: all of them).
    """

    def __init__(self, *, backend: Backend = "auto", query_rows: int | None = None) -> None:
        self.backend, self.query_rows = backend, query_rows
        self.metrics: dict[str, AttentionEntropy] = {}

    def update(self, call: AttentionCall) -> None:
        metric = self.metrics.get(call.module)
        if metric is None:
            metric = self.metrics[call.module] = AttentionEntropy(call.q.shape[1], backend=self.backend)
            metric.to(call.q.device)
        n_q = call.q.shape[-2]
        index = None
        if self.query_rows is not None and n_q > self.query_rows:
            index = torch.linspace(0, n_q - 1, self.query_rows, device=call.q.device).round().long()
        metric.update(call.q, call.k, scale=call.scale, is_causal=call.is_causal, attn_mask=call.attn_mask,
                      query_index=index)  # fmt: skip

    def compute(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Scalars per module and per-head vectors under the same keys; every window ends here."""
        scalars: dict[str, Tensor] = {}
        heads: dict[str, Tensor] = {}
        for name, metric in self.metrics.items():
            result = metric.compute()
            for prefix, total, per_head in FIELDS:
                scalars[f"{prefix}/{name}"] = result[total]
                heads[f"{prefix}/{name}"] = result[per_head]
            metric.reset()
        return scalars, heads

    def state_dict(self) -> dict[str, Any]:
        return {name: (m.num_heads, m.state_dict()) for name, m in self.metrics.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, (heads, metric_state) in state.items():
            metric = self.metrics[name] = AttentionEntropy(heads, backend=self.backend)
            metric.load_state_dict(metric_state)
