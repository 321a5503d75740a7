"""Attention entropy and max logit of rows whose scores a model formed itself: the input of its own softmax.

Attention written by hand (``scores = q @ kᵀ · scale``, a mask added or filled in, then ``softmax(scores, -1)``)
never calls SDPA; the capture reads it at that softmax (private: :mod:`geomon.capture`). The scores already hold the
scale, every bias and the mask, so ``s_ij`` of METRICS.md is the tensor itself: ``p_i = softmax_j(s_i)`` over the
allowed keys, ``H_i = -Σ_j p_ij log p_ij``, ``max_logit_i = max_j s_ij``. A key is *not allowed* where its score is
``-inf`` or at or below ``masked_at`` (the capture passes -5e3: its padding rule's -1e4 with room for the logit a
mask was added to, so that masks filled with the dtype's minimum, -1e9 or added as -10000 read as masked, as in
every other path). Rows are visited in chunks, so beyond the model's own
tensor the temporaries stay near ``TILE_ELEMENTS`` scores; the result is float32 (float64 for float64 scores).

Cost: about ten elementwise passes over the scores of the rows read (5-12x a ``torch.softmax`` of all of them on
the CPU when every row is read: ``benchmarks/results/cpu-softmax-read-2026-12-06.md``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geomon.functional._common import TILE_ELEMENTS
from geomon.functional.attention_entropy import AttentionStats, _drop_rows, _stats_from_rows


def _score_rows(
    scores: Tensor, *, masked_at: float | None = None, query_index: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(entropy, max_logit, n_keys)`` of each row of ``scores [..., Nq, Nk]`` (``[B, H, Nq, Nk]`` for the
    metric; ``query_index``: only those rows, positions in range), each ``[..., Nq]``; NaN entropy and max logit,
    0 keys, for a row with no allowed key."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = scores.detach() if query_index is None else scores.detach().index_select(-2, query_index.long())
    n_q = scores.shape[-2]
    step = max(1, TILE_ELEMENTS // 4 // max(1, scores[..., 0, :].numel()))
    parts = [_rows_of(scores[..., i : i + step, :].to(dtype), masked_at) for i in range(0, n_q, step)]
    if not parts:
        empty = scores.new_zeros((*scores.shape[:-2], 0), dtype=dtype)
        return empty, empty.clone(), empty.to(torch.int64)
    return tuple(torch.cat(part, dim=-1) for part in zip(*parts, strict=True))  # type: ignore[return-value]


def _rows_of(scores: Tensor, masked_at: float | None) -> tuple[Tensor, Tensor, Tensor]:
    blocked = scores == -math.inf if masked_at is None else scores <= masked_at
    n_keys = (~blocked).sum(-1)
    scores = scores.masked_fill(blocked, -math.inf)
    max_logit = scores.amax(-1)
    shift = torch.where(max_logit == -math.inf, 0.0, max_logit)[..., None]
    centred = scores - shift
    weights = torch.exp(centred)
    norm = weights.sum(-1)
    tilted = torch.where(blocked, 0.0, weights * centred).sum(-1)  # Σ e^(s-m)(s-m) over allowed keys
    entropy = torch.log(norm) - tilted / norm
    no_key = n_keys == 0
    entropy = torch.minimum(entropy.clamp(min=0.0), torch.log(n_keys.clamp(min=1).to(scores.dtype)))
    return entropy.masked_fill(no_key, math.nan), max_logit.masked_fill(no_key, math.nan), n_keys


def _attention_entropy_update_scores(
    scores: Tensor,
    *,
    masked_at: float | None = None,
    query_index: Tensor | None = None,
    query_padding: Tensor | None = None,
) -> AttentionStats:
    """Per-head sums over batch and query rows of one softmax input ``[B, H, Nq, Nk]`` (``query_padding``:
    ``[B, Nq]`` boolean, rows left out; no host sync)."""
    rows = _score_rows(scores, masked_at=masked_at, query_index=query_index)
    if query_padding is not None:
        rows = _drop_rows(rows, query_padding, query_index)
    return _stats_from_rows(*rows)
