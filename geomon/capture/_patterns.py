"""Mask rules generated chunk by chunk: what a mask would say, without holding a ``Nq x Nk`` tensor.

A :class:`MaskPattern` is called by the metric's torch path with the query rows it measures and one key chunk
``[start, stop)``, and returns that block of the mask (SDPA semantics: boolean True = may attend, or additive),
broadcastable to ``[B, H, Nsel, stop - start]``. The fused kernel reads stored masks, per-key biases and per-row key
ranges: a pattern that is only a key range (:class:`AlignedRule`: bottom-right causal, sliding windows, packed
sequences) says so in ``key_range``; a :class:`ModuleMasks` whose terms split into at most one stored per-score mask
and per-key terms (ALiBi as Bloom and MPT add it, key padding) says so in :meth:`ModuleMasks.kernel_terms`, and
x-transformers' terms beside its causal flag in :meth:`KeyTerms.kernel_terms`; all go to the kernel. A call carrying
any other pattern is measured by the torch path (on CUDA too): memory stays ``O(B·H·Nsel·chunk)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from geomon.capture._padding import MASKED_AT


class MaskPattern:
    """A mask generated per key chunk (see the module docstring)."""

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def padded_keys(self, batch: int, n_k: int) -> Tensor | None:
        """``[B, Nk]`` True where no query row may attend to key ``j`` (None: every key is seen by some row)."""
        return None


class AlignedRule(MaskPattern):
    """Flash attention's causal rule aligned bottom-right (query ``i`` is position ``i + Nk - Nq``), a sliding window
    (``|position - j| < window``), and packed sequences (``segments [Nk]``: a query sees the keys of its own run of
    equal ids, a sequence starting wherever the id changes, as the cumulative count of sequence starts makes
    them)."""

    def __init__(self, n_q: int, n_k: int, causal: bool, window: int | None, segments: Tensor | None) -> None:
        self.offset, self.causal, self.window = n_k - n_q, causal, window
        #: ``[2, Nk]`` int32: the first key of each key position's sequence and one past its last (packed sequences)
        self.bounds = None if segments is None else _segment_bounds(segments)
        #: Each row's keys are one range, which the fused kernel takes as it is: ``(causal, query i's key position
        #: minus i, window, bounds)``; None sends the call to the torch path.
        self.key_range = None
        if (window is None or window >= 1) and (segments is None or n_q == n_k == segments.numel()):
            self.key_range = (causal, self.offset, window, self.bounds)

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        rows = positions[:, None] + self.offset
        cols = torch.arange(start, stop, device=positions.device)[None, :]
        allowed = torch.ones(rows.shape[0], stop - start, dtype=torch.bool, device=positions.device)
        if self.causal:
            allowed &= cols <= rows
        if self.window is not None:
            allowed &= (rows - cols).abs() < self.window
        if self.bounds is not None:
            first, end = self.bounds[:, rows]
            allowed &= (cols >= first) & (cols < end)
        return allowed


def _segment_bounds(segments: Tensor) -> Tensor:
    """``[2, N]`` int32: for each position, the first position of its run of equal ids and one past its last; on the
    segments' device, no host sync."""
    ids = segments.reshape(-1)
    index = torch.arange(ids.numel(), device=ids.device)
    changes = torch.ones(ids.numel() + 1, dtype=torch.bool, device=ids.device)
    changes[1:-1] = ids[1:] != ids[:-1]  # changes[p]: a run starts at p (and one ends at p - 1)
    first = torch.where(changes[:-1], index, 0).cummax(0).values
    end = torch.where(changes[1:], index + 1, ids.numel()).flip(0).cummin(0).values.flip(0)
    return torch.stack([first, end]).to(torch.int32)


class AddedMask(MaskPattern):
    """A boolean mask that the model adds to its scores (a 4-D user mask reaching transformers' eager or flex
    function: True adds 1, False 0, so it masks nothing), read one key chunk at a time as those 1 / 0 terms: no
    float copy of the ``Nq x Nk`` mask is made."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask  # boolean, broadcastable to [B, H, Nq, Nk] (by reference)

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        chunk = self.mask[..., start:stop]
        if chunk.shape[-2] != 1:
            chunk = chunk.index_select(-2, positions.to(chunk.device))
        return chunk.to(torch.float32)


class KernelTerms(NamedTuple):
    """A :class:`ModuleMasks` as the fused kernel takes it, read in place (no ``Nq x Nk`` tensor is made).

    The per-key terms are left in the module's own dtype, unsummed with any per-score one: the metric compares the
    additive sum with its padding threshold (``masked_at``), as its torch path compares the combined chunk."""

    row_mask: Tensor | None  #: the one per-score term, broadcastable to ``[B, H, Nq, Nk]``: boolean or additive
    row_mask_blocks: bool  #: a boolean ``row_mask`` means True = *not* allowed (the module's semantics)
    key_sum: Tensor | None  #: ``[B', H', 1, Nk]``: the sum of the additive per-key terms (ALiBi, float key padding)
    key_blocked: Tensor | None  #: ``[B', H', 1, Nk]``: keys a boolean per-key term blocks (key padding)
    causal_offset: int | None = None  #: with the causal rule: query ``i`` sees keys up to ``i + causal_offset``


class ModuleMasks(MaskPattern):
    """Masks in the semantics of ``nn.MultiheadAttention`` and MPT (boolean True = *not* allowed, or additive: a
    position bias such as ALiBi), each a view broadcastable to ``[B, H, L, S]``, combined per chunk as the module
    combines them; keys past the masks' ``n_k`` (``bias_k``, ``add_zero_attn``) are open to every row."""

    def __init__(self, masks: list[Tensor], n_k: int) -> None:
        for mask in masks:
            if mask.shape[-1] not in (1, n_k):
                raise ValueError(f"a module mask of {mask.shape[-1]} keys for a call of {n_k} keys")
        # a term broadcast along the keys (one column) is expanded (a view) over them: counted per key, read per key
        self.masks = [m.expand(*m.shape[:-1], n_k) if m.shape[-1] == 1 and n_k > 1 else m for m in masks]
        self.n_k = n_k

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        own = min(stop, self.n_k) - start  # columns of this chunk that are the module's keys
        extra = stop - start - max(own, 0)
        blocked, bias = None, None
        for mask in self.masks:
            chunk = mask[..., start : start + max(own, 0)]
            if chunk.shape[-2] != 1:
                chunk = chunk.index_select(-2, positions)
            if chunk.dtype == torch.bool:
                blocked = chunk if blocked is None else blocked | chunk
            else:
                bias = chunk if bias is None else bias + chunk
        if bias is None:
            assert blocked is not None
            allowed = ~blocked
            return torch.nn.functional.pad(allowed, (0, extra), value=True) if extra else allowed
        if blocked is not None:
            bias = bias.masked_fill(blocked, -torch.inf)
        return torch.nn.functional.pad(bias, (0, extra), value=0.0) if extra else bias

    def kernel_terms(self, n_k: int) -> KernelTerms | None:
        """The terms split for the kernel (see :class:`KernelTerms`), for a call of ``n_k`` keys; None when they do
        not split exactly: two per-score terms, a per-score additive term beside additive per-key ones (the module
        compares their sum), or a per-score term with keys past the masks (``bias_k``, ``add_zero_attn``)."""
        per_score = [m for m in self.masks if m.shape[-2] != 1]
        if per_score and n_k != self.n_k:
            return None
        per_key = [m for m in self.masks if m.shape[-2] == 1]
        blocking = [m for m in per_key if m.dtype == torch.bool]
        key_blocked = None if not blocking else functools.reduce(torch.logical_or, blocking)
        terms = _split(per_score, [m for m in per_key if m.dtype != torch.bool], key_blocked, row_blocks=True)
        extra = n_k - self.n_k  # keys open to every row, bias 0
        if terms is None or not extra:
            return terms
        pad = torch.nn.functional.pad
        key_sum = None if terms.key_sum is None else pad(terms.key_sum, (0, extra), value=0.0)
        key_blocked = None if terms.key_blocked is None else pad(terms.key_blocked, (0, extra), value=False)
        return terms._replace(key_sum=key_sum, key_blocked=key_blocked)

    def padded_keys(self, batch: int, n_k: int) -> Tensor | None:
        """Keys every row of every head blocks: each boolean mask's rows and heads, and the sum of the additive
        masks' maxima (exact when at most one additive mask varies over rows and heads, as a key-padding mask
        does not)."""
        blocked = _unseen_keys([m.all(-2).all(-2) for m in self.masks if m.dtype == torch.bool],
                               [m.amax(dim=(-3, -2)) for m in self.masks if m.dtype != torch.bool])  # fmt: skip
        assert blocked is not None
        blocked = blocked.expand(batch, self.n_k)
        extra = n_k - self.n_k
        return torch.nn.functional.pad(blocked, (0, extra), value=False) if extra else blocked


class FlexRule(MaskPattern):
    """A flex-attention ``BlockMask`` read chunk by chunk, as flex applies it: query ``i`` may attend to key ``j``
    when their block (``i // Q_BLOCK``, ``j // KV_BLOCK``) is listed full, or is listed partial and ``mask_mod(b, h,
    i, j)`` allows it; an unlisted block is masked. ``mask_mod`` gets the call's own batch and query-head indices
    (flex broadcasts a ``BlockMask`` made with ``B`` or ``H`` of 1, but not the indices it passes). Only the block
    tables are held: ``B·H·Nq·Nk / (Q_BLOCK·KV_BLOCK)`` booleans.

    Padded keys are read on the diagonal (:meth:`padded_keys`): key ``j`` is padding when query ``j`` may not attend
    to it in any head. That is the padding rule for the masks transformers builds (causal, sliding-window, packed or
    bidirectional, with padding: a real token sees itself), at ``O(B·H·N)`` evaluations of ``mask_mod`` rather than
    ``O(B·H·N²)``; a mask under which a token may not see itself would have that token's row left out."""

    def __init__(self, mask: object, batch: int, heads: int, n_q: int, n_k: int) -> None:
        self.mask_mod = mask.mask_mod  # type: ignore[attr-defined]
        self.q_block, self.kv_block = mask.BLOCK_SIZE  # type: ignore[attr-defined]
        counts, indices = mask.kv_num_blocks, mask.kv_indices  # type: ignore[attr-defined]
        kv_blocks = max(-(-mask.seq_lengths[1] // self.kv_block), indices.shape[-1])  # type: ignore[attr-defined]
        q_cover, kv_cover = counts.shape[-1] * self.q_block, kv_blocks * self.kv_block
        if n_q > q_cover or n_k > kv_cover:
            raise ValueError(f"a BlockMask whose blocks cover {q_cover} queries x {kv_cover} keys cannot mask "
                             f"{n_q} queries x {n_k} keys")  # fmt: skip
        self.partial = _block_table(counts, indices, kv_blocks)
        full = mask.full_kv_num_blocks  # type: ignore[attr-defined]
        self.full = None if full is None else _block_table(full, mask.full_kv_indices, kv_blocks)  # type: ignore[attr-defined]
        self.batch, self.heads, self.n_q, self.n_k = batch, heads, n_q, n_k

    def _tables(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor | None]:
        """Whether the blocks of query ``q`` and key ``kv`` (broadcast with ``b``, ``h``) let ``mask_mod`` decide
        (listed partial) and whether they are open whatever it says (listed full), as one tensor per case."""

        def look_up(table: Tensor) -> Tensor:
            table = table.to(q.device)
            rows_b = b if table.shape[0] > 1 else torch.zeros_like(b)
            rows_h = h if table.shape[1] > 1 else torch.zeros_like(h)
            return table[rows_b, rows_h, q // self.q_block, kv // self.kv_block]

        return look_up(self.partial), None if self.full is None else look_up(self.full)

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        from torch.nn.attention.flex_attention import create_mask

        def chunk_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return self.mask_mod(b, h, positions[q], kv + start)

        device = positions.device
        allowed = create_mask(chunk_mod, self.batch, self.heads, positions.numel(), stop - start, device=device)
        b = torch.arange(self.batch, device=device)[:, None, None, None]
        h = torch.arange(self.heads, device=device)[None, :, None, None]
        keys = torch.arange(start, stop, device=device)[None, None, None, :]
        partial, full = self._tables(b, h, positions[None, None, :, None], keys)
        allowed = allowed & partial  # create_mask may return an expanded view
        return allowed if full is None else allowed | full

    def padded_keys(self, batch: int, n_k: int) -> Tensor | None:
        from torch.nn.attention.flex_attention import create_mask

        def diagonal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return self.mask_mod(b, h, kv, kv)

        n, device = min(self.n_q, self.n_k), self.partial.device
        seen = create_mask(diagonal, self.batch, self.heads, 1, n, device=device)[:, :, 0]  # [B, H, n]
        b = torch.arange(self.batch, device=device)[:, None, None]
        h = torch.arange(self.heads, device=device)[None, :, None]
        tokens = torch.arange(n, device=device)[None, None, :]
        partial, full = self._tables(b, h, tokens, tokens)
        seen = seen & partial
        seen = seen if full is None else seen | full
        padded = ~seen.any(1)  # [B, n]: no head lets token j see itself
        padded = torch.nn.functional.pad(padded, (0, n_k - n), value=False)
        return padded.expand(batch, n_k)


def _block_table(counts: Tensor, indices: Tensor, kv_blocks: int) -> Tensor:
    """``[B, H, Q_blocks, KV_blocks]`` True at the key blocks a ``BlockMask`` lists for each query block (the first
    ``counts`` entries of each row of ``indices``)."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    columns = torch.where(listed, indices.long(), kv_blocks)  # unlisted entries go to a dropped extra column
    table = torch.zeros(*indices.shape[:-1], kv_blocks + 1, dtype=torch.bool, device=indices.device)
    return table.scatter_(-1, columns, True)[..., :kv_blocks]


class KeyTerms(MaskPattern):
    """The mask of an x-transformers ``Attend`` call, generated per key chunk from the terms it was given: boolean
    ``allowed`` (True = may attend) and ``additive`` terms (a position bias, the previous layer's scores), each a
    view broadcastable to ``[B, H, Nq, width]`` over the module's last ``width`` keys: a term of ``n_k - zero``
    keys does not cover the ``zero`` zero keys ``Attend`` puts first itself (open to every row, bias 0), while the
    previous layer's scores (``n_k`` wide) already hold them; ``causal`` is aligned bottom-right over all ``n_k``
    keys. Keys are read in the order they are reported: the first ``roll`` keys (memory and zero key/values) moved
    last, so that key ``j`` is token ``j`` for the padding rule."""

    def __init__(self, allowed: Tensor | None, additive: list[Tensor], causal: bool, n_q: int, n_k: int, zero: int,
                 roll: int) -> None:  # fmt: skip
        def keyed(term: Tensor) -> Tensor:
            """The term over the keys it covers: all ``n_k``, or all but the ``zero`` first; one broadcast key is
            expanded (a view) over the keys a mask covers."""
            width = term.shape[-1]
            if width == 1 and n_k - zero > 1:
                return term.expand(*term.shape[:-1], n_k - zero)
            if width not in (n_k, n_k - zero):
                raise ValueError(f"a mask term of {width} keys for a call of {n_k} keys ({zero} zero keys first)")
            return term

        self.allowed = None if allowed is None else keyed(allowed)
        self.additive, self.causal = [keyed(t) for t in additive], causal
        self.n_q, self.n_k, self.roll = n_q, n_k, roll

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        keys = (torch.arange(start, stop, device=positions.device) + self.roll) % self.n_k  # the module's key order

        def columns(term: Tensor) -> tuple[Tensor, Tensor]:
            """The term's entries at this chunk's keys, and where a key is one of the zero keys it does not cover."""
            uncovered = self.n_k - term.shape[-1]
            term = term if term.shape[-2] == 1 else term.index_select(-2, positions)
            return term.index_select(-1, (keys - uncovered).clamp(min=0)), keys < uncovered

        allowed = keys[None, :] <= positions[:, None] + (self.n_k - self.n_q) if self.causal else None
        if self.allowed is not None:
            given, zero_key = columns(self.allowed)
            given = given | zero_key
            allowed = given if allowed is None else given & allowed
        bias = None
        for term in self.additive:
            chunk, zero_key = columns(term)
            chunk = chunk.masked_fill(zero_key, 0.0)
            bias = chunk if bias is None else bias + chunk
        if bias is None:  # no term at all (zero or memory keys alone): every key open to every row
            return (
                torch.ones(1, 1, 1, stop - start, dtype=torch.bool, device=positions.device)
                if allowed is None
                else allowed
            )
        return bias if allowed is None else bias.masked_fill(~allowed, -torch.inf)

    def kernel_terms(self, n_k: int) -> KernelTerms | None:
        """The terms split for the kernel (see :class:`KernelTerms`), with the causal rule aligned bottom-right; None
        when keys were moved last (self-attention with zero or memory keys) or a term does not cover every key (the
        zero key), with two per-score terms, or a per-score additive
        term beside additive per-key ones (``Attend`` compares their sum with the mask). With no term and no causal
        rule the key order does not matter: the kernel takes the call as it is."""
        if self.allowed is None and not self.additive and not self.causal:
            return KernelTerms(None, False, None, None)
        if self.roll or n_k != self.n_k or any(term.shape[-1] != n_k for term in self.additive):
            return None
        if self.allowed is not None and self.allowed.shape[-1] != n_k:
            return None
        per_score = [t for t in ([] if self.allowed is None else [self.allowed]) + self.additive if t.shape[-2] != 1]
        key_blocked = None if self.allowed is None or self.allowed.shape[-2] != 1 else ~self.allowed
        causal = self.n_k - self.n_q if self.causal else None
        key_additive = [t for t in self.additive if t.shape[-2] == 1]
        return _split(per_score, key_additive, key_blocked, row_blocks=False, causal_offset=causal)

    def padded_keys(self, batch: int, n_k: int) -> Tensor | None:
        """Keys no row of any head may attend to (the sum of the additive terms' maxima at or below -1e4, exact when
        at most one of them varies over rows and heads), in reported order; zero keys are never padding."""

        def widened(per_key: Tensor, value: float | bool) -> Tensor:  # [.., width] -> [.., n_k], zero keys first
            return torch.nn.functional.pad(per_key, (self.n_k - per_key.shape[-1], 0), value=value)

        blocked = _unseen_keys([] if self.allowed is None else [widened(~self.allowed.any(-2).any(-2), False)],
                               [widened(term.amax(dim=(-3, -2)), 0.0) for term in self.additive])  # fmt: skip
        if blocked is None:
            return None
        return blocked.roll(-self.roll, dims=-1).expand(batch, n_k)


def _split(
    per_score: list[Tensor],
    key_additive: list[Tensor],
    key_blocked: Tensor | None,
    row_blocks: bool,
    causal_offset: int | None = None,
) -> KernelTerms | None:
    """The kernel's reading of a rule's terms: at most one per-score term (``row_blocks``: a boolean one means True =
    blocked), the per-key additive terms summed in order (as the chunks sum them), the keys blocked per key; None
    when that is not exact - two per-score terms, or a per-score additive term beside additive per-key ones (the
    -1e4 rule applies to their sum)."""
    if len(per_score) > 1:
        return None
    row = per_score[0] if per_score else None
    if row is not None and row.dtype != torch.bool and key_additive:
        return None
    key_sum = None if not key_additive else functools.reduce(torch.add, key_additive)
    is_bool = row is not None and row.dtype == torch.bool
    return KernelTerms(row, row_blocks and is_bool, key_sum, key_blocked, causal_offset)


def _unseen_keys(blocked: list[Tensor], maxima: list[Tensor]) -> Tensor | None:
    """Keys no row may attend to, per key: blocked by a boolean term in every row and head, or with the sum of the
    additive terms' maxima at or below ``MASKED_AT`` (exact when at most one additive term varies over rows and
    heads, as a key-padding mask does not); None without a term."""
    unseen = None
    for every in blocked:
        unseen = every if unseen is None else unseen | every
    if maxima:
        low = sum(maxima[1:], maxima[0]) <= MASKED_AT
        unseen = low if unseen is None else unseen | low
    return unseen
