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
   self-attention). Whether a call is cross-attention is said first by its module's own call where the adapter
   can read it: a transformers module's ``is_cross_attention`` (from its ``key_value_states`` /
   ``encoder_hidden_states`` argument) or flag, a causal module being self-attention; ``nn.MultiheadAttention``
   called with a query that is not its key (neither the same object nor an equal tensor, :func:`same_sequence`,
   compared on the device);
   x-transformers' layer types. Otherwise a call is cross-attention when it has a different number of keys than
   queries, or when its module's path names it so (``EncDecAttention``, ``encoder_attn``, ``crossattention``,
   ``encoder_decoder_attention``, ``multihead_attn`` of a torch decoder layer, any part containing ``cross``).
4. **Self-attention with more keys than queries** (a cache of earlier tokens, prefix keys) is self-attention: its
   queries are the tokens of keys ``leading ..``: the last keys for a cache that appends, where a static cache was
   filled to for transformers' ``StaticLayer``; rule 2 reads the padding of those keys.

Nothing of size ``Nq x Nk`` is built or copied, and nothing waits for the device: the model's mask is reported by
reference (rule 1 is applied by the metric where it forms the scores, chunk by chunk), and the excluded query rows
travel as a ``[B, Nq]`` boolean (always, when there is a mask: no ``.any()`` decides whether to carry it), which the
metric reads as rows with no allowed key (NaN, left out of every mean). Cost: one max-reduction over the mask per
self-attention call (no copy); nothing when there is no mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from geomon.capture._patterns import MaskPattern

#: additive mask values at or below this are "may not attend"
MASKED_AT = -1e4

_CROSS_PARTS = frozenset(
    {"encdecattention", "encoder_attn", "crossattention", "multihead_attn", "enc_dec_attn", "encoder_decoder_attention",
     "src_attn"}
)  # fmt: skip


def is_cross_name(name: str) -> bool:
    """Whether a module path names a cross-attention module."""
    return any(part in _CROSS_PARTS or "cross" in part for part in name.lower().split("."))


def same_sequence(query: object, key: object) -> bool | Tensor:
    """Whether a call's query and key inputs are one sequence (self-attention): the same object, or equal tensors of
    the same shape, dtype and device (``attn(ln(x), ln(x), ln(x))`` computes the same values twice).

    Tensors that differ as objects but look alike are compared on the device: the answer is then a 0-dim boolean
    tensor, never read on the host (no sync in the forward), which :meth:`PaddingRule.apply` takes as it is.
    Nested tensors are compared by identity only.
    """
    if query is key:
        return True
    if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested or key.is_nested:
        return False
    if query.shape != key.shape or query.dtype != key.dtype or query.device != key.device:
        return False
    return torch.eq(query.detach(), key.detach()).all()


def crossed(query: object, key: object) -> bool | Tensor:
    """Whether a call attends from one sequence to another: not :func:`same_sequence` (on the device when that is
    a tensor: ``not`` would wait for it)."""
    same = same_sequence(query, key)
    return ~same if isinstance(same, Tensor) else not same


def padded_keys(mask: Tensor | None, batch: int, n_k: int) -> Tensor | None:
    """``[B, Nk]`` True where key ``j`` is padding (rule 2); None when there is no mask.

    A reduction over the mask's heads and rows (``any`` of a boolean mask, ``amax`` of an additive one), which reads
    broadcast dimensions through their stride 0: no copy, no host sync.
    """
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # leading ones only: a view
    if mask.dtype == torch.bool:
        return (~mask.any(-2).any(-2)).expand(batch, n_k)  # no row of any head may attend to it
    return (mask.amax(dim=(-3, -2)) <= MASKED_AT).expand(batch, n_k)


class PaddingRule:
    """Applies the rule to one capture session's calls; remembers the last self-attention's padded queries."""

    def __init__(self) -> None:
        self.queries: dict[tuple[int, int], Tensor | None] = {}  # (B, Nq) -> padded query rows, of the last self-attn

    def apply(
        self,
        q: Tensor,
        k: Tensor,
        mask: Tensor | None,
        cross: bool | Tensor | None,
        name: str,
        dropped: Tensor | None = None,
        pattern: MaskPattern | None = None,
        leading: int | Tensor = 0,
    ) -> Tensor | None:
        """The padded query rows ``[B, Nq]`` to leave out of ``q [B, H, Nq, Dh]`` against ``k`` (None: none).

        ``mask`` is the call's mask (SDPA semantics, rule 1 for additive values), read and never changed;
        ``pattern`` the rest of its mask, generated per chunk (its keys no row sees are padding too);
        ``dropped`` (``[B, Nq]``) the rows the implementation itself drops (flash, nested tensors), always excluded;
        ``leading`` keys (memory key/values put first, a cache of earlier tokens) come before the tokens' own: key
        ``leading + j`` is token ``j``; a 0-dim tensor (a static cache's fill level, read on the device) is applied
        with a gather, without waiting for the device.
        """
        batch, n_q, n_k = q.shape[0], q.shape[-2], k.shape[-2]
        if cross is None:
            cross = n_q != n_k or is_cross_name(name)
        if isinstance(cross, Tensor):  # decided on the device (same_sequence): both answers, picked there
            mine, other = self._own_rows(mask, pattern, batch, n_q, n_k, leading), self.queries.get((batch, n_q))
            none = torch.zeros(batch, n_q, dtype=torch.bool, device=q.device)
            mine, other = (none if r is None else r.to(q.device) for r in (mine, other))
            rows = self.queries[(batch, n_q)] = torch.where(cross.to(q.device), other, mine)
        elif cross:
            rows = self.queries.get((batch, n_q))
        else:
            rows = self.queries[(batch, n_q)] = self._own_rows(mask, pattern, batch, n_q, n_k, leading)
        if rows is not None:
            rows = rows.to(q.device)
        if dropped is not None:
            rows = dropped if rows is None else rows | dropped
        return rows

    @staticmethod
    def _own_rows(mask: Tensor | None, pattern: MaskPattern | None, batch: int, n_q: int, n_k: int,
                  leading: int | Tensor) -> Tensor | None:  # fmt: skip
        """Self-attention's padded query rows: those of its own padding keys (rule 2; None without a mask)."""
        keys = padded_keys(mask, batch, n_k)
        unseen = None if pattern is None else pattern.padded_keys(batch, n_k)
        if unseen is not None:
            keys = unseen if keys is None else keys | unseen
        # keys a module appends (bias_k) come after the tokens, keys it prepends (memory) before them
        if keys is None:
            return None
        if isinstance(leading, Tensor):
            index = leading.to(keys.device) + torch.arange(n_q, device=keys.device)
            return keys.gather(1, index.clamp(0, n_k - 1).expand(batch, n_q))
        return keys[:, leading : leading + n_q]
