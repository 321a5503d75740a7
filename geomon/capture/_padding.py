"""The one padding rule every attention source goes through before a call is reported.

Attention entropy and max logit are means and maxima over *real* query rows. Implementations disagree about what a
padded query row computes: flash attention and torch's nested fast path drop it, eager and SDPA give it a row of
scores (over the real keys before it with right padding, or a fully masked row with left padding). So geomon decides
from the mask, the same way for every path:

1. **Masked means forbidden.** In a floating (additive) mask, entries at or below ``MASKED_AT`` (-1e4: Hugging Face
   fills with ``finfo.min``, older code with -10000) are treated as ``-inf``: those keys are not attended, and they
   are not counted among a row's keys (the normalised entropy divides by log of the count of allowed keys).
2. **A padding token is a position no query may attend to.** In self-attention, key ``j`` is padding when every
   query row forbids it; its query row ``j`` is then excluded. Causal, sliding-window, packed and bidirectional
   masks leave every real token visible to at least itself, so only padding is ever excluded. (Transformers on
   torch < 2.5 unmasks fully masked rows for SDPA; left-padding rows are then indistinguishable from real ones.)
3. **Cross-attention** keys are another sequence: the query rows excluded are those of the self-attention that ran
   last over queries of the same batch size and length (in an encoder-decoder, the decoder block's own
   self-attention). A call is cross-attention when it has a different number of keys than queries, when its
   module's path names it so (``EncDecAttention``, ``encoder_attn``, ``crossattention``, ``multihead_attn`` of a
   torch decoder layer, any part containing ``cross``), or when its adapter says so (``nn.MultiheadAttention``
   called with a query that is not its key).

Excluded rows are given no allowed key; the functional reads them as NaN and leaves them out of every mean.
Cost: one reduction and one masked copy of a mask the model already built; nothing when there is no mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: additive mask values at or below this are "may not attend"
MASKED_AT = -1e4

_CROSS_PARTS = frozenset({"encdecattention", "encoder_attn", "crossattention", "multihead_attn", "enc_dec_attn"})


def is_cross_name(name: str) -> bool:
    """Whether a module path names a cross-attention module."""
    return any(part in _CROSS_PARTS or "cross" in part for part in name.lower().split("."))


def standard_mask(mask: Tensor | None) -> Tensor | None:
    """``mask`` with additive entries at or below ``MASKED_AT`` set to ``-inf`` (boolean masks unchanged)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    masked = mask <= MASKED_AT
    return mask.masked_fill(masked, -math.inf) if bool(masked.any()) else mask


def _forbidden(mask: Tensor) -> Tensor:
    return ~mask if mask.dtype == torch.bool else mask == -math.inf


def padded_keys(mask: Tensor | None, batch: int, n_k: int) -> Tensor | None:
    """``[B, Nk]`` True where key ``j`` is padding (rule 2), None when nothing is."""
    if mask is None:
        return None
    forbidden = _forbidden(mask)
    forbidden = forbidden.reshape(-1, *forbidden.shape[-3:]) if forbidden.dim() >= 3 else forbidden[None, None]
    padding = forbidden.all(-2).all(-2).expand(batch, n_k)  # [B, Nk]: forbidden in every row of every head
    return padding if bool(padding.any()) else None


def exclude_rows(mask: Tensor | None, rows: Tensor, n_k: int, dtype: torch.dtype) -> Tensor:
    """``mask`` (SDPA semantics, or None) with the query rows where ``rows [B, Nq]`` is True allowing no key."""
    drop = rows[:, None, :, None]
    if mask is None:
        return ~drop.expand(-1, 1, -1, n_k)
    if mask.dtype == torch.bool:
        return mask & ~drop
    return mask.masked_fill(drop, -math.inf)


class PaddingRule:
    """Applies the rule to one capture session's calls; remembers the last self-attention's padded queries."""

    def __init__(self) -> None:
        self.queries: dict[tuple[int, int], Tensor | None] = {}  # (B, Nq) -> padded query rows, of the last self-attn

    def apply(self, q: Tensor, k: Tensor, mask: Tensor | None, cross: bool | None, name: str) -> Tensor | None:
        """The mask to report for ``q [B, H, Nq, Dh]`` against ``k``: standardised, padding rows excluded."""
        mask = standard_mask(mask)
        batch, n_q, n_k = q.shape[0], q.shape[-2], k.shape[-2]
        if cross is None:
            cross = n_q != n_k or is_cross_name(name)
        if cross:
            rows = self.queries.get((batch, n_q))
        else:
            keys = padded_keys(mask, batch, n_k)
            rows = None if keys is None else keys[:, :n_q]  # keys a module appends (bias_k) come after the tokens
            self.queries[(batch, n_q)] = rows
        if rows is None:
            return mask
        return exclude_rows(mask, rows.to(q.device), n_k, q.dtype)
