"""SDPA calls with more than one batch dimension, folded to the ``[batch, heads, queries, head_dim]`` layout geomon
reads.

``F.scaled_dot_product_attention`` takes any number of leading dimensions: it attends over the last two (queries or
keys, head dim) and treats every dimension before them alike, as batch. Windowed vision models use that: timm's
Twins (``LocallyGroupedAttn``: ``[B, windows, heads, N, Dh]``), NesT (``[B, heads, blocks, N, Dh]``) and Hiera's
mask-unit attention (``[B, heads, windows, N, Dh]``). Each row's entropy and max logit are the same whichever way
the leading dimensions are grouped; only *which one is the heads* matters, for the per-head values. The call cannot
say that, so the module does: the one leading dimension (after the batch) whose size is its declared head count
(:func:`~geomon.capture.modules.head_count`). That dimension moves to the heads' place and the others fold into the
batch. Where no dimension, or more than one, has that size, or the module declares no head count, the call is not
folded and the caller says so.

A 3-D call ``[B·H, N, Dh]`` (timm's SAM ViT) has its heads folded into the batch: it is read as ``[B, H, N, Dh]``,
batch-major (``reshape(B * H, ...)`` of a ``[B, H, N, Dh]`` tensor), by the declared head count, the grouping in which
attention written by hand is read at its softmax from ``[B·H, Nq, Nk]`` scores (:mod:`geomon.capture.softmax`); a
leading size that is no multiple of the heads is not folded. Its keys are ``[B·Hk, N, Dh]`` (``Hk`` dividing ``H``),
its mask ``[Nq, Nk]``, ``[1, Nq, Nk]`` or ``[B·H, Nq, Nk]``, regrouped as a view.

Keys must have the queries' leading dimensions, except at the heads (a divisor of the query heads: query head ``h``
reads key head ``h // (H / Hk)``, geomon's grouped-query rule, which is also what broadcasting a single key head
means). A mask folds only when that is a view of it (its leading dimensions either all broadcast, size 1, or laid out
as the queries'): a mask is never copied, since it may be ``N x N`` per batch entry.

Cost: a copy of ``q`` and ``k`` when the moved heads make them non-contiguous (their own size, no ``N x N``).
"""

from __future__ import annotations

from torch import Tensor


def fold_batch_dims(
    q: Tensor, k: Tensor, mask: Tensor | None, heads: int | None
) -> tuple[Tensor, Tensor, Tensor | None] | str:
    """``(q, k, mask)`` of a SDPA call with more than one batch dimension as 4-D ``[B', H, N, Dh]`` tensors, or why
    not (a clause for a warning).

    Example:
        >>> import torch
        >>> q = torch.randn(2, 3, 4, 5, 8)  # [batch, heads, windows, tokens, head_dim]
        >>> q4, k4, _ = fold_batch_dims(q, q, None, heads=3)
        >>> q4.shape, torch.equal(q4[1 * 4 + 2], q[1, :, 2])  # batch 1, window 2: its 3 heads
        (torch.Size([8, 3, 5, 8]), True)
        >>> fold_batch_dims(q, q, None, heads=6)
        'no dimension before the last two has its 6 heads'
    """
    if k.ndim != q.ndim:
        return f"its key {tuple(k.shape)} has another number of dimensions"
    if heads is None:
        return "the module declares no head count (num_heads, n_head, heads, ...) that tells which dimension holds them"
    if q.ndim == 3:
        return _unfold_heads(q, k, mask, heads)
    if q.ndim < 5:
        return "its heads have no dimension of their own"
    axes = head_axes(q.shape, heads)
    if not axes:
        return f"no dimension before the last two has its {heads} heads"
    if len(axes) > 1:
        return f"{len(axes)} dimensions before the last two have its {heads} heads"
    axis = axes[0]
    key_heads = k.shape[axis]
    others = [d for d in range(q.ndim - 2) if d != axis]
    if any(k.shape[d] != q.shape[d] for d in others) or heads % key_heads:
        return f"its key {tuple(k.shape)} does not have the leading dimensions of its query {tuple(q.shape)}"
    folded_mask = None if mask is None else _fold_mask(mask, axis, [q.shape[d] for d in others])
    if isinstance(folded_mask, str):
        return folded_mask
    return _fold(q, axis), _fold(k, axis), folded_mask


def _unfold_heads(q: Tensor, k: Tensor, mask: Tensor | None, heads: int) -> tuple[Tensor, Tensor, Tensor | None] | str:
    """A ``[B·H, N, Dh]`` call as ``[B, H, N, Dh]``, batch-major (see the module); views only."""
    if q.shape[0] % heads:
        return f"its heads are folded into a batch of {q.shape[0]}, no multiple of its {heads} heads"
    batch = q.shape[0] // heads
    if k.shape[0] % batch or heads % (k.shape[0] // batch):
        return f"its key {tuple(k.shape)} does not fold as its query {tuple(q.shape)}"
    if mask is not None and mask.ndim == 3:
        if mask.shape[0] == q.shape[0]:
            mask = mask.unflatten(0, (batch, heads))
        elif mask.shape[0] == 1:
            mask = mask.unsqueeze(0)
        else:
            return f"its mask {tuple(mask.shape)} does not fold as its query {tuple(q.shape)}"
    elif mask is not None and mask.ndim > 3:
        return f"its mask has {mask.ndim} dimensions, more than its query's 3"
    return q.unflatten(0, (batch, heads)), k.unflatten(0, (batch, -1)), mask


def head_axes(shape: tuple[int, ...], heads: int | None) -> list[int]:
    """The dimensions after the batch and before the last two whose size is ``heads``: the heads' place when there
    is exactly one. One head fits any such dimension of size 1 alike (the first is taken): whichever holds it, the
    values are the same.

    Example:
        >>> head_axes((2, 4, 4, 3, 9), 4), head_axes((2, 1, 1, 5, 5), 1)
        ([1, 2], [1])
    """
    axes = [axis for axis in range(1, len(shape) - 2) if shape[axis] == heads]
    return axes[:1] if heads == 1 else axes


def _fold(x: Tensor, axis: int) -> Tensor:
    """Heads to ``-3``, every other leading dimension into one batch."""
    moved = x.movedim(axis, -3)
    return moved.reshape(-1, *moved.shape[-3:])


def _fold_mask(mask: Tensor, axis: int, batch: list[int]) -> Tensor | str:
    """The mask in the folded layout, as a view (``batch``: the query's leading sizes without the heads); why not
    when it cannot be one."""
    ndim = len(batch) + 3
    if mask.ndim > ndim:
        return f"its mask has {mask.ndim} dimensions, more than its query's {ndim}"
    padded = mask.reshape((1,) * (ndim - mask.ndim) + tuple(mask.shape))  # a view: new leading dims of size 1
    moved = padded.movedim(axis, -3)
    lead = list(moved.shape[:-3])
    if all(size == 1 for size in lead):
        return moved.reshape(1, *moved.shape[-3:])  # size-1 dims only: a view
    if lead == batch:
        try:
            return moved.view(-1, *moved.shape[-3:])
        except RuntimeError:
            pass
    return f"its mask {tuple(mask.shape)} cannot be regrouped without a copy (geomon never copies a mask)"
