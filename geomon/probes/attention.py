"""Attention entropy and max logit of one attention module, fed with every attention call captured inside it."""

from __future__ import annotations

from typing import Any

import torch

from geomon import keys
from geomon.capture import AttentionCall
from geomon.functional._dispatch import Backend
from geomon.functional.attention_entropy import _attention_entropy_compute
from geomon.metrics import AttentionEntropy
from geomon.probes.base import FLOAT64, Context, Probe, Values

#: (key family, metric output, per-head output)
FIELDS = (
    (keys.ENTROPY, "entropy", "entropy_per_head"),
    (keys.ENTROPY_NORMALIZED, "entropy_normalized", "entropy_normalized_per_head"),
    (keys.MAX_LOGIT, "max_logit", "max_logit_per_head"),
)


class AttentionProbe(Probe):
    """:class:`~geomon.metrics.AttentionEntropy` of one module (``spec = (heads,)``).

    A value is logged only when rows were measured somewhere since the last compute: a layer that did not run on a
    measured step (layer drop, a skipped batch, one key per row for the normalised entropy) logs nothing, not NaN.

    Args:
        name: the module's plain name.
        heads: query heads ``H`` (``None``: read off the first call).
        backend: kernels or torch (see :mod:`geomon.functional`).
        query_rows: measure at most this many evenly spaced query rows per call (``None``: all of them).
    """

    kind = "attention"

    def __init__(self, name: str, heads: int | None, *, backend: Backend = "auto", query_rows: int | None = None):
        super().__init__(name, None if heads is None else (heads,))
        self.backend, self.query_rows = backend, query_rows
        self.metric: AttentionEntropy | None = None

    def keys(self) -> list[str]:
        return [keys.key(family, self.name) for family, _, _ in FIELDS]

    def state_bytes(self) -> int:
        return 0 if self.spec is None else (5 * self.spec[0] + 5) * FLOAT64  # five [H] sums, one-element defaults

    def allocate(self, device: torch.device) -> None:
        if self.metric is None and self.spec is not None:
            self.metric = AttentionEntropy(self.spec[0], backend=self.backend).to(device)

    def to(self, device: torch.device) -> None:
        if self.metric is not None:
            self.metric.to(device)

    def accepts(self, call: AttentionCall) -> bool:
        """Whether ``call`` fits the spec; an unknown spec is taken from it (agreed across ranks at compute)."""
        heads = call.q.shape[1]
        if self.spec is None:
            self.spec = (heads,)
        return self.spec == (heads,)

    def update(self, call: AttentionCall) -> None:
        self.allocate(call.q.device)
        assert self.metric is not None
        n_q = call.q.shape[-2]
        index = None
        if self.query_rows is not None and n_q > self.query_rows:
            index = torch.linspace(0, n_q - 1, self.query_rows, device=call.q.device).round().long()
        self.metric.update(call.q, call.k, scale=call.scale, is_causal=call.is_causal, attn_mask=call.attn_mask,
                           query_index=index)  # fmt: skip

    def compute(self, context: Context, out: Values) -> None:
        metric = self.metric
        assert metric is not None
        with metric.sync_context():
            stats = metric._stats()
            rows, normalized_rows = float(stats.count.sum()), float(stats.normalized_count.sum())
            result = _attention_entropy_compute(stats) if rows > 0 else {}
        metric.reset()
        for family, total, per_head in FIELDS:
            if rows > 0 and (family != keys.ENTROPY_NORMALIZED or normalized_rows > 0):
                out.scalars[keys.key(family, self.name)] = result[total]
                out.details[keys.key(family, self.name)] = result[per_head]

    def state_dict(self) -> dict[str, Any]:
        return {} if self.metric is None else self.metric.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.metric is not None:
            self.metric.load_state_dict(state)
