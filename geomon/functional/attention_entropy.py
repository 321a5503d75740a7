"""Attention entropy and max attention logit (Zhai et al., "Stabilizing Transformer Training by Preventing
Attention Entropy Collapse", ICML 2023), computed without the N x N attention matrix.

``s_ij = scale · q_i·k_j (+ additive mask)``, ``p_i = softmax_j(s_i)`` over the keys row ``i`` may attend to,
``H_i = -Σ_j p_ij log p_ij`` (nats) and ``max_logit_i = max_j s_ij``. Keys are visited in chunks with an online
softmax: per row keep the running max ``m``, ``l = Σ e^(s-m)`` and ``t = Σ e^(s-m)(s-m)``; then
``H = log l - t / l``. Memory is ``B·H·Nq·chunk`` scores at a time, never ``B·H·Nq·Nk``.

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask is True where a query may attend;
a floating mask is added to the scores; ``is_causal`` allows key ``j`` for query ``i`` iff ``j <= i`` (SDPA's
top-left alignment). One refinement: a floating mask entry of ``-inf`` *or* the most negative finite value of the
mask's dtype (the Hugging Face padding convention) marks the key as not allowed, so it does not count in ``n_i``.
Grouped-query attention: ``k`` may have ``Hk`` heads with ``Hk`` dividing ``H``; query head ``h`` reads key head
``h // (H / Hk)``, without copying ``k``. A query row with no allowed key has no entropy: NaN.

Cost: ``2·Nq·Nk·Dh`` FLOPs per head for the scores plus a few exp/FMA per score; memory ``O(B·H·Nq·chunk)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from geomon.functional._common import (
    TILE_ELEMENTS,
    autocast_off,
    check_flag,
    check_float_tensor,
    check_int_tensor,
    nan,
    warn,
)
from geomon.functional._dispatch import Backend, choose_backend


class AttentionStats(NamedTuple):
    """Per-head statistics of attention rows, summed over batch and query rows (``max_logit``: max-reduced)."""

    entropy_sum: Tensor  #: [H] Σ H_i over rows with at least one allowed key
    count: Tensor  #: [H] number of such rows
    normalized_sum: Tensor  #: [H] Σ H_i / log(n_i) over rows with n_i >= 2 allowed keys
    normalized_count: Tensor  #: [H] number of such rows
    max_logit: Tensor  #: [H] max over rows of max_logit_i (-inf when no row)


#: How each field of :class:`AttentionStats` combines across batches and processes.
ATTENTION_REDUCTIONS = {"max_logit": "max"}

#: ``pattern(positions [Nsel], start, stop)``: the mask term of query rows ``positions`` and keys ``[start, stop)``,
#: broadcastable to ``[B, H, Nsel, stop - start]`` (SDPA semantics), for a rule generated chunk by chunk rather than
#: held as a ``Nq x Nk`` tensor (private: used by the attention capture; the torch path applies it, the kernel applies
#: the patterns that say how: ``key_range``, ``kernel_terms``).
MaskPattern = Callable[[Tensor, int, int], Tensor]


def _blocked_at(dtype: torch.dtype, masked_at: float | None) -> float:
    """Additive mask entries at or below this block their key: the dtype's minimum, or ``masked_at`` if higher."""
    low = torch.finfo(dtype).min
    return low if masked_at is None else max(low, masked_at)


def _validate(
    q: Tensor, k: Tensor, scale: float | None, is_causal: bool, attn_mask: Tensor | None, query_index: Tensor | None
) -> None:
    check_float_tensor(q, "q", 4, "[B, H, Nq, Dh]")
    check_float_tensor(k, "k", 4, "[B, Hk, Nk, Dh]")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q [B, H, Nq, Dh] and k [B, Hk, Nk, Dh] must agree on B and Dh, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the key heads Hk = {k.shape[1]} must divide the query heads H = {q.shape[1]} (GQA)")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if query_index is not None:
        check_int_tensor(query_index, "query_index", "[Nsel]")
        if query_index.device != q.device:
            raise ValueError(f"query_index must be on q's device {q.device}, got {query_index.device}")
    if scale is not None and not (isinstance(scale, int | float) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(Dh)), got {scale!r}")
    if attn_mask is None:
        return
    if is_causal:
        raise ValueError("attn_mask and is_causal=True cannot be combined (as in scaled_dot_product_attention)")
    if not isinstance(attn_mask, Tensor) or attn_mask.is_complex():
        raise TypeError(f"attn_mask must be a boolean or floating tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be boolean (True = may attend) or floating (added), got {attn_mask.dtype}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        broadcasts = attn_mask.ndim <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, Nq, Nk] = {target}")


def _grouped_mask(attn_mask: Tensor, num_kv_heads: int, group: int) -> Tensor:
    """View a mask broadcastable to [B, H, Nq, Nk] as [B, Hk, G, Nq, Nk] (size-1 dims stay broadcastable)."""
    mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
    b, h, nq, nk = mask.shape
    return mask.reshape(b, num_kv_heads, group, nq, nk) if h != 1 else mask.reshape(b, 1, 1, nq, nk)


def _attention_rows_torch(
    q: Tensor,
    k: Tensor,
    scale: float,
    is_causal: bool,
    attn_mask: Tensor | None,
    chunk_size: int | None,
    query_index: Tensor | None,
    masked_at: float | None = None,
    pattern: MaskPattern | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference path: chunks of keys through an online softmax, in float32 (float64 for float64 inputs).

    Every mask term is read one key chunk at a time (``attn_mask`` sliced, ``pattern`` generated), so nothing of
    size ``Nq x Nk`` is allocated."""
    batch, heads, _, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    positions = torch.arange(q.shape[2], device=q.device) if query_index is None else query_index.long()
    outside = None
    if query_index is not None:  # no sync: out-of-range rows are read clamped and reported as rows with no key
        outside = (positions < 0) | (positions >= q.shape[2])
        positions = positions.clamp(0, max(q.shape[2] - 1, 0))
    q = q if query_index is None else q.index_select(2, positions)
    n_q = q.shape[2]
    qg = q.detach().to(dtype).reshape(batch, kv_heads, group, n_q, dim) * scale
    kg = k.detach().unsqueeze(2)  # [B, Hk, 1, Nk, Dh]: a view, shared by the G query heads of a group
    mask = None if attn_mask is None else _grouped_mask(attn_mask.detach(), kv_heads, group)
    select_rows = query_index is not None and mask is not None and mask.shape[-2] != 1
    if chunk_size is None:  # a handful of score-sized temporaries are live per chunk: keep each near 16 MiB
        chunk_size = max(1, (TILE_ELEMENTS // 4) // max(1, batch * heads * n_q))
    if is_causal and query_index is None:
        n_k = min(n_k, n_q)  # keys past the last query are never allowed (top-left alignment)
    shape = (batch, kv_heads, group, n_q)
    running_max = torch.full(shape, -math.inf, dtype=dtype, device=q.device)
    norm = torch.zeros(shape, dtype=dtype, device=q.device)  # l = Σ e^(s-m)
    tilted = torch.zeros(shape, dtype=dtype, device=q.device)  # t = Σ e^(s-m)(s-m)
    n_keys = torch.zeros(shape, dtype=torch.int64, device=q.device)
    rows = positions[:, None]
    for start in range(0, n_k, chunk_size):
        stop = min(start + chunk_size, n_k)
        scores = qg @ kg[..., start:stop, :].to(dtype).transpose(-1, -2)  # [B, Hk, G, Nq, c]
        allowed = None
        if is_causal:
            allowed = torch.arange(start, stop, device=q.device)[None, :] <= rows
        terms = []
        if mask is not None:  # the rows of this chunk only: a selected copy stays Nsel x chunk
            chunk = mask if mask.shape[-1] == 1 else mask[..., start:stop]  # size 1: one entry for every key
            terms.append(chunk.index_select(-2, positions) if select_rows else chunk)
        if pattern is not None:
            terms.append(_grouped_mask(pattern(positions, start, stop), kv_heads, group))
        for chunk in terms:
            if chunk.dtype == torch.bool:
                ok = chunk
            else:
                scores = scores + chunk.to(dtype)
                ok = chunk > _blocked_at(chunk.dtype, masked_at)
            allowed = ok if allowed is None else allowed & ok
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
            # counted before any expansion to the score shape; a key dim of size 1 stands for every key of the chunk
            n_keys += allowed.sum(-1) * (stop - start if allowed.shape[-1] == 1 else 1)
        else:
            n_keys += stop - start
        new_max = torch.maximum(running_max, scores.amax(-1))
        shift = torch.where(new_max == -math.inf, 0.0, new_max)
        weights = torch.exp(scores - shift[..., None])
        centred = scores - shift[..., None]
        tilted_chunk = torch.where(scores == -math.inf, 0.0, weights * centred).sum(-1)
        decay = torch.exp(running_max - shift)
        carried = torch.where(norm > 0, norm * (running_max - shift), 0.0)
        tilted = decay * (tilted + carried) + tilted_chunk
        norm = decay * norm + weights.sum(-1)
        running_max = new_max
    entropy = torch.log(norm) - tilted / norm
    if outside is not None:
        n_keys = n_keys.masked_fill(outside, 0)
    no_key = n_keys == 0
    entropy = entropy.clamp(min=0.0)
    entropy = torch.minimum(entropy, torch.log(n_keys.clamp(min=1).to(dtype)))
    entropy = entropy.masked_fill(no_key, math.nan)
    max_logit = running_max.masked_fill(no_key, math.nan)
    out = (batch, heads, n_q)
    return entropy.reshape(out), max_logit.reshape(out), n_keys.reshape(out)


def _attention_rows(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
    chunk_size: int | None = None,
    query_index: Tensor | None = None,
    backend: Backend = "auto",
    masked_at: float | None = None,
    query_padding: Tensor | None = None,
    pattern: MaskPattern | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(entropy, max_logit, n_keys)``, each ``[B, H, Nq]`` (or ``[B, H, Nsel]``); no host sync.

    The attention capture's padding rule, kept out of the ``Nq x Nk`` mask: ``masked_at`` (additive entries at or
    below it block their key), ``query_padding`` (``[B, Nq]`` boolean: those query rows count as having no key: NaN,
    ``n_keys`` 0) and ``pattern`` (a :data:`MaskPattern`, applied with ``attn_mask``; on the torch path, unless the
    kernel can apply it itself: a per-row key range (its ``key_range``), or terms that split into one per-score mask
    and per-key terms (its ``kernel_terms``, see ``_kernel_terms`` and ``_kernel_masks``))."""
    _validate(q, k, scale, is_causal, attn_mask, query_index)
    _validate_padding(q, is_causal, masked_at, query_padding, pattern)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be a positive integer or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    unsupported = None
    # a pattern that is one key range per row, (causal, offset, window, bounds): query i at key position i + offset,
    # keys up to it when causal, within window of it, inside its packed sequence; the kernel applies it itself
    key_range = getattr(pattern, "key_range", None)
    if q.dtype == torch.float64 or k.dtype == torch.float64:
        unsupported = "float64 inputs are computed by the torch path only"
    elif q.dtype != k.dtype:
        unsupported = f"q ({q.dtype}) and k ({k.dtype}) differ in dtype"
    elif attn_mask is not None and attn_mask.dtype == torch.float64:
        unsupported = "float64 additive masks are applied by the torch path only"
    elif q.shape[-1] > 256:
        unsupported = f"head dim {q.shape[-1]} > 256"
    terms = None
    if unsupported is None and pattern is not None and key_range is None:
        terms, unsupported = _kernel_terms(pattern, attn_mask, k.shape[2])
    if choose_backend(backend, "attention_entropy", q, k, attn_mask, unsupported=unsupported) == "triton":
        from geomon.kernels.attention_entropy import attention_rows_triton

        # a generated pattern reaches the kernel only as a key range or split terms, never dropped
        assert pattern is None or key_range is not None or terms is not None, "an unsplit pattern on the kernel"
        kernel_masks = _KernelMasks(attn_mask) if terms is None else _kernel_masks(terms, attn_mask, masked_at)
        causal, offset, window, bounds = (is_causal, 0, None, None) if key_range is None else key_range
        if kernel_masks.causal_offset is not None:
            causal, offset = True, kernel_masks.causal_offset
        rows = attention_rows_triton(
            q, k, scale, causal, kernel_masks.mask, query_index, masked_at=masked_at, causal_offset=offset,
            window=window, key_bounds=bounds, mask_blocks=kernel_masks.mask_blocks, key_bias=kernel_masks.key_bias,
        )  # fmt: skip
    else:
        with autocast_off(q.device):  # float32 scores even inside the model's autocast region
            rows = _attention_rows_torch(q, k, scale, is_causal, attn_mask, chunk_size, query_index, masked_at, pattern)
    return rows if query_padding is None else _drop_rows(rows, query_padding, query_index)


class _KernelMasks(NamedTuple):
    """What the kernel reads for a call's masks: one per-score ``mask`` (``mask_blocks``: a boolean one means True =
    not allowed) and ``key_bias`` (``[B', H', Nk]`` float32, ``-inf`` at blocked keys)."""

    mask: Tensor | None
    mask_blocks: bool = False
    key_bias: Tensor | None = None
    causal_offset: int | None = None  #: the causal rule, query ``i`` at key position ``i + causal_offset``


def _kernel_terms(pattern: MaskPattern, attn_mask: Tensor | None, n_k: int) -> tuple[Any, str | None]:
    """``(terms, None)`` when a generated pattern splits into one per-score mask and per-key terms the kernel reads
    (its ``kernel_terms``: module masks, ALiBi, x-transformers' terms with their causal rule), else ``(None, why
    not)``."""
    split = getattr(pattern, "kernel_terms", None)
    terms = split(n_k) if callable(split) else None
    if terms is None:
        return (
            None,
            "a generated mask pattern other than a key range or terms the kernel splits is applied by the torch path",
        )
    row = terms.row_mask
    if row is not None and attn_mask is not None:
        return None, "a per-score mask pattern beside attn_mask is applied by the torch path"
    if row is not None and row.dtype == torch.float64:
        return None, "float64 additive masks are applied by the torch path only"
    return terms, None


def _kernel_masks(terms: Any, attn_mask: Tensor | None, masked_at: float | None) -> _KernelMasks:
    """The split terms as the kernel reads them: blocked and added as the torch path's chunks are."""
    row = terms.row_mask
    key_sum, key_blocked = terms.key_sum, terms.key_blocked
    key_bias = None
    if key_sum is not None:  # blocked where a boolean term blocks or the sum is at or below the threshold
        combined = key_sum if key_blocked is None else key_sum.masked_fill(key_blocked, -math.inf)
        key_bias = torch.where(combined > _blocked_at(combined.dtype, masked_at), combined.float(), -math.inf)
    elif key_blocked is not None:
        key_bias = torch.zeros(key_blocked.shape, dtype=torch.float32, device=key_blocked.device)
        key_bias.masked_fill_(key_blocked, -math.inf)
    if key_bias is not None:  # [.., 1, Nk] -> [B', H', Nk]
        key_bias = key_bias.reshape((1,) * (4 - key_bias.ndim) + tuple(key_bias.shape))[:, :, 0].detach()
    mask = attn_mask if row is None else row.detach()
    return _KernelMasks(mask, terms.row_mask_blocks, key_bias, causal_offset=terms.causal_offset)


def _validate_padding(
    q: Tensor, is_causal: bool, masked_at: float | None, query_padding: Tensor | None, pattern: MaskPattern | None
) -> None:
    if masked_at is not None and not (isinstance(masked_at, int | float) and math.isfinite(masked_at)):
        raise ValueError(f"masked_at must be a finite number or None, got {masked_at!r}")
    if pattern is not None:
        if not callable(pattern):
            raise TypeError(f"pattern must be callable (positions, start, stop) -> mask, got {type(pattern).__name__}")
        if is_causal:
            raise ValueError("a mask pattern and is_causal=True cannot be combined")
    if query_padding is None:
        return
    if not isinstance(query_padding, Tensor) or query_padding.dtype != torch.bool:
        raise TypeError(f"query_padding must be a boolean tensor [B, Nq], got {query_padding!r:.80}")
    if tuple(query_padding.shape) != (q.shape[0], q.shape[2]) or query_padding.device != q.device:
        raise ValueError(
            f"query_padding must be [B, Nq] = {(q.shape[0], q.shape[2])} on {q.device}, "
            f"got {tuple(query_padding.shape)} on {query_padding.device}"
        )


def _drop_rows(
    rows: tuple[Tensor, Tensor, Tensor], query_padding: Tensor, query_index: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``rows`` with the padded query rows read as rows with no key (NaN entropy and max logit, no key)."""
    entropy, max_logit, n_keys = rows
    if query_index is not None:  # out-of-range positions already read as keyless: any row will do for them
        query_padding = query_padding.index_select(1, query_index.long().clamp(0, max(query_padding.shape[1] - 1, 0)))
    drop = query_padding[:, None, :]
    return entropy.masked_fill(drop, math.nan), max_logit.masked_fill(drop, math.nan), n_keys.masked_fill(drop, 0)


def attention_entropy(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
    chunk_size: int | None = None,
    query_index: Tensor | None = None,
    backend: Backend = "auto",
    return_n_keys: bool = False,
    _masked_at: float | None = None,
    _query_padding: Tensor | None = None,
    _pattern: MaskPattern | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Entropy (nats) and max logit of every attention row, without forming the attention matrix.

    Args:
        q: queries ``[B, H, Nq, Dh]`` as the model uses them (after rotary embeddings / QK-norm); any float dtype.
        k: keys ``[B, Hk, Nk, Dh]``, ``Hk`` dividing ``H`` (grouped-query attention).
        scale: softmax scale; default ``1/sqrt(Dh)``, as in SDPA.
        is_causal: SDPA's causal mask (query ``i`` sees keys ``j <= i``); not combinable with ``attn_mask``.
        attn_mask: SDPA-style mask broadcastable to ``[B, H, Nq, Nk]``: boolean (True = may attend) or additive.
        chunk_size: keys per chunk of the torch path; default keeps each chunk of scores near 2**22 elements.
        query_index: evaluate only these query rows (1-D integer positions in ``[0, Nq)``, the same for every
            head), so that watching a long sequence costs a fraction of attention; outputs are ``[B, H, Nsel]``.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"`` (raises if it cannot run).
        return_n_keys: also return the number of allowed keys of each row (for ``H / log n``).
        _masked_at, _query_padding, _pattern: private, the attention capture's padding rule (see
            :class:`geomon.capture.AttentionCall`).

    Returns:
        ``(entropy, max_logit)`` (or with ``n_keys``), each ``[B, H, Nq]``, float32 (float64 when ``q`` or ``k`` is
        float64: unlike SDPA, ``q`` and ``k`` may differ in dtype, both are promoted); NaN in rows with no allowed key.

    Example:
        >>> import torch
        >>> q = torch.zeros(1, 1, 4, 8); k = torch.randn(1, 1, 16, 8)  # zero queries: uniform attention
        >>> entropy, max_logit = attention_entropy(q, k)
        >>> torch.allclose(entropy, torch.full((1, 1, 4), torch.log(torch.tensor(16.0)).item()))
        True
    """
    check_flag(is_causal, "is_causal")
    check_flag(return_n_keys, "return_n_keys")
    if query_index is not None:
        check_int_tensor(query_index, "query_index", "[Nsel]")
    if query_index is not None and isinstance(q, Tensor) and query_index.numel():  # the update path clamps
        low, high = int(query_index.min()), int(query_index.max())  # a host sync, acceptable in a one-shot call
        if low < 0 or high >= q.shape[-2]:
            raise ValueError(f"query_index must lie in [0, Nq = {q.shape[-2]}), got values in [{low}, {high}]")
    entropy, max_logit, n_keys = _attention_rows(
        q,
        k,
        scale=scale,
        is_causal=is_causal,
        attn_mask=attn_mask,
        chunk_size=chunk_size,
        query_index=query_index,
        backend=backend,
        masked_at=_masked_at,
        query_padding=_query_padding,
        pattern=_pattern,
    )
    return (entropy, max_logit, n_keys) if return_n_keys else (entropy, max_logit)


def _attention_entropy_update(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
    chunk_size: int | None = None,
    query_index: Tensor | None = None,
    backend: Backend = "auto",
    masked_at: float | None = None,
    query_padding: Tensor | None = None,
    pattern: MaskPattern | None = None,
) -> AttentionStats:
    """Per-head sums over batch and query rows of one attention call (no host sync; ``query_index`` unchecked;
    ``masked_at``, ``query_padding``, ``pattern``: see :func:`_attention_rows`)."""
    entropy, max_logit, n_keys = _attention_rows(
        q,
        k,
        scale=scale,
        is_causal=is_causal,
        attn_mask=attn_mask,
        chunk_size=chunk_size,
        query_index=query_index,
        backend=backend,
        masked_at=masked_at,
        query_padding=query_padding,
        pattern=pattern,
    )
    return _stats_from_rows(entropy, max_logit, n_keys)


def _stats_from_rows(entropy: Tensor, max_logit: Tensor, n_keys: Tensor) -> AttentionStats:
    """Per-head sums of ``[B, H, Nq]`` rows (rows with no allowed key left out)."""
    valid = n_keys >= 1
    spread = n_keys >= 2
    normalized = entropy / torch.log(n_keys.clamp(min=2).to(entropy.dtype))
    f64 = torch.float64
    heads = entropy.shape[1]
    row_max = torch.where(valid, max_logit, -math.inf).to(f64).transpose(0, 1).reshape(heads, -1)
    max_per_head = torch.full((heads,), -math.inf, dtype=f64, device=entropy.device)
    if row_max.shape[1]:  # amax over no rows is an error; the state starts at -inf
        max_per_head = row_max.amax(dim=1)
    return AttentionStats(
        entropy_sum=torch.where(valid, entropy, 0.0).sum(dim=(0, 2), dtype=f64),
        count=valid.sum(dim=(0, 2)).to(f64),
        normalized_sum=torch.where(spread, normalized, 0.0).sum(dim=(0, 2), dtype=f64),
        normalized_count=spread.sum(dim=(0, 2)).to(f64),
        max_logit=max_per_head,
    )


def _merge_attention_stats(a: AttentionStats, b: AttentionStats) -> AttentionStats:
    """Combine two streams of :class:`AttentionStats` (sums add, max logits take the max)."""
    return AttentionStats(
        *(
            torch.maximum(x, y) if name in ATTENTION_REDUCTIONS else x + y
            for name, x, y in zip(a._fields, a, b, strict=True)
        )
    )


def _attention_entropy_compute(stats: AttentionStats) -> dict[str, Tensor]:
    """Means over batch, heads and valid query rows, per-head means, and max logits (NaN where undefined)."""
    if not bool(stats.count.sum() > 0):
        warn("attention_entropy: no query row with an allowed key was seen; returning NaN")
    elif not bool(stats.entropy_sum.isfinite().all()):
        warn(
            "attention_entropy: some rows met a NaN or infinite score (NaN or Inf in the queries or keys, +inf in an "
            "additive mask, or a scaled q.k beyond the float range); the affected heads read NaN"
        )
    per_head = stats.entropy_sum / stats.count
    per_head_normalized = stats.normalized_sum / stats.normalized_count
    max_per_head = torch.where(stats.count > 0, stats.max_logit, math.nan)
    return {
        "entropy": stats.entropy_sum.sum() / stats.count.sum(),
        "entropy_normalized": stats.normalized_sum.sum() / stats.normalized_count.sum(),
        "max_logit": max_per_head.amax() if bool(stats.count.sum() > 0) else nan(stats.count.device),
        "entropy_per_head": per_head,
        "entropy_normalized_per_head": per_head_normalized,
        "max_logit_per_head": max_per_head,
    }
