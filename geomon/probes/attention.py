"""Attention entropy and max logit of one attention module, fed with every attention call captured inside it."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal

import torch

from geomon import keys
from geomon.capture import AttentionCall
from geomon.capture._session import ScoresCall
from geomon.capture.softmax import SCORES_MASKED_AT
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


#: a layer read at its softmax with a logit above this (a fifth of the masking threshold's size, ten times the
#: max-logit alert's default), in any row read, left out or not, may have logits low enough to read as masked:
#: said once
LOGITS_NEAR_MASKED = -SCORES_MASKED_AT / 5

#: Calls with at most this many query rows are measured in full, and ``"auto"`` never measures fewer rows than this.
MIN_QUERY_ROWS = 128
#: The most the entropy pass may cost under ``"auto"``, as a fraction of the forward's FLOPs in the same layer.
ENTROPY_FLOP_SHARE = Fraction(1, 50)

QueryRows = int | Literal["auto"] | None


def auto_query_rows(n_q: int, n_k: int, width: int) -> int:
    """How many evenly spaced query rows per head ``query_rows="auto"`` measures in a call of ``n_q`` queries against
    ``n_k`` keys in a layer of width ``width`` (``d = H·Dh`` of the query heads).

    FLOPs per batch element (2 per multiply-add, matrix products only; causal masks are ignored on both sides, which
    only overstates the entropy's share): the entropy of ``r`` query rows costs their logits, ``2·r·n_k·d``; the
    layer's forward costs ``24·n_q·d²`` (Q, K, V and output projections, ``8·n_q·d²``, and a 4x MLP, ``16·n_q·d²``)
    plus ``4·n_q·n_k·d`` (``QKᵀ`` and ``PV``). The share stays below ``ENTROPY_FLOP_SHARE = 2%`` while

        ``r < 0.02 · (24·n_q·d² + 4·n_q·n_k·d) / (2·n_k·d) = (24·n_q·d + 4·n_q·n_k) / (100·n_k)``,

    i.e. ``r < 0.24·d + 0.04·N`` for self-attention (``n_q = n_k = N``): about 225 rows per head for GPT-2-small at
    ``N = 1024``, 511 at ``N = 8192``. The rule returns the largest such ``r``, but never fewer than
    ``MIN_QUERY_ROWS = 128`` rows and never more than ``n_q``: a call of at most 128 queries is measured in full. The
    floor is statistical: the logged entropy is a mean over rows, and a normalised entropy lies in ``[0, 1]``, so its
    spread over rows is at most 1/2 and the standard error of a mean over ``r`` rows at most ``1 / (2·sqrt(r))`` -
    0.044 at 128 rows for a single sequence (less with a batch), small against the drops the entropy-collapse alert
    looks for. Small models (``0.24·d + 0.04·N < 128``, e.g. ``d = 128`` below ``N = 2432``) therefore pay more than
    2% for a stable mean.

    Example:
        >>> auto_query_rows(1024, 1024, 768), auto_query_rows(100, 100, 768), auto_query_rows(4096, 4096, 64)
        (225, 100, 179)
    """
    for name, value in (("n_q", n_q), ("n_k", n_k), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    share = ENTROPY_FLOP_SHARE
    bound = share.numerator * (24 * n_q * width + 4 * n_q * n_k)  # r < bound / (2 · denominator · n_k), exactly
    budget = (bound - 1) // (2 * share.denominator * n_k)
    return min(n_q, max(MIN_QUERY_ROWS, budget))


def rows_to_measure(query_rows: QueryRows, n_q: int, n_k: int, width: int) -> int:
    """Query rows per head that ``query_rows`` measures in a call of ``n_q`` queries, ``n_k`` keys, width ``width``."""
    if query_rows == "auto":
        return auto_query_rows(n_q, n_k, width)
    return n_q if query_rows is None else min(n_q, query_rows)


class AttentionProbe(Probe):
    """:class:`~geomon.metrics.AttentionEntropy` of one module (``spec = (heads,)``).

    A value is logged only when rows were measured somewhere since the last compute: a layer that did not run on a
    measured step (layer drop, a skipped batch, one key per row for the normalised entropy) logs nothing, not NaN.

    Args:
        name: the module's plain name.
        heads: query heads ``H`` (``None``: read off the first call).
        backend: kernels or torch (see :mod:`geomon.functional`).
        query_rows: measure at most this many evenly spaced query rows per head and call; ``"auto"`` (default):
            as many as keep the entropy's logits under 2% of the layer's forward FLOPs, at least 128
            (:func:`auto_query_rows`); ``None``: all of them.
    """

    kind = "attention"

    def __init__(self, name: str, heads: int | None, *, backend: Backend = "auto", query_rows: QueryRows = "auto"):
        super().__init__(name, None if heads is None else (heads,))
        self.backend, self.query_rows = backend, query_rows
        self.metric: AttentionEntropy | None = None
        self.softmax_peak: torch.Tensor | None = None  # highest logit read at the module's softmax since compute

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

    def accepts_heads(self, heads: int) -> bool:
        """Whether a call of ``heads`` query heads fits the spec; an unknown spec is taken from it (agreed across
        ranks at compute)."""
        if self.spec is None:
            self.spec = (heads,)
        return self.spec == (heads,)

    def update(self, call: AttentionCall) -> None:
        self.allocate(call.q.device)
        assert self.metric is not None
        n_q = call.q.shape[-2]
        rows = self.rows(n_q, call.k.shape[-2], call.q.shape[1] * call.q.shape[-1])
        index = None
        if rows < n_q:
            index = torch.linspace(0, n_q - 1, rows, device=call.q.device).round().long()
        self.metric.update(
            call.q,
            call.k,
            scale=call.scale,
            is_causal=call.is_causal,
            attn_mask=call.attn_mask,
            query_index=index,
            query_padding=call.query_padding,
            _masked_at=call.masked_at,
            _pattern=call.pattern,
        )  # the mask's parts by reference: none is N x N

    def update_rows(self, call: ScoresCall) -> None:
        """Add attention read at the module's own softmax (its rows already reduced, as many as the plan's
        ``score_rows`` chose)."""
        self.allocate(call.entropy.device)
        assert self.metric is not None
        self.metric._update_rows(call.entropy, call.max_logit, call.n_keys)
        if call.peak is not None:  # on the device: compared at compute, no sync here
            peak = self.softmax_peak
            self.softmax_peak = call.peak if peak is None else torch.maximum(peak, call.peak)

    def rows(self, n_q: int, n_k: int, width: int) -> int:
        """Query rows per head measured in a call of ``n_q`` queries, ``n_k`` keys, query width ``H·Dh``."""
        return rows_to_measure(self.query_rows, n_q, n_k, width)

    def compute(self, context: Context, out: Values) -> None:
        metric = self.metric
        assert metric is not None
        with metric.sync_context():
            stats = metric._stats()
            rows, normalized_rows = float(stats.count.sum()), float(stats.normalized_count.sum())
            result = _attention_entropy_compute(stats) if rows > 0 else {}
        metric.reset()
        peak, self.softmax_peak = self.softmax_peak, None
        if peak is not None and float(peak) > LOGITS_NEAR_MASKED:  # this rank's rows: said where they were read
            context.guard.warn_once(f"softmax-logits:{self.name}", f"geomon: {self.name!r}, read at its own softmax, "
                                    f"has logits up to {float(peak):.4g}: at that size its scores at or below "
                                    f"{SCORES_MASKED_AT:g} may be logits rather than a mask added to them, and they "
                                    "are read as masked (a key no row may attend to is padding, and its query row is "
                                    "left out), so its values may leave rows out from here on")  # fmt: skip
        for family, total, per_head in FIELDS:
            if rows > 0 and (family != keys.ENTROPY_NORMALIZED or normalized_rows > 0):
                out.scalars[keys.key(family, self.name)] = result[total]
                out.details[keys.key(family, self.name)] = result[per_head]

    def state_dict(self) -> dict[str, Any]:
        return {} if self.metric is None else self.metric.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.metric is not None:
            self.metric.load_state_dict(state)
