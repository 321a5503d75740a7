"""Attention written by hand, read at the module's own softmax.

Many attention layers never call SDPA: they form ``scores = q @ kᵀ · scale``, add their biases, fill in their mask
and call ``softmax(scores, dim=-1)`` themselves (Hugging Face DeBERTa and GPT-Neo, timm's TNT, LeViT, MViT v2,
CaiT, Twins or BEiT with their fused path off). The scores are then exactly ``s_ij`` of the entropy's
definition, scale, biases and mask included. While a measured block runs, ``Tensor.softmax`` and ``torch.softmax``
(which ``F.softmax`` and ``nn.Softmax`` go through) are wrapped: a softmax over the last dimension of a
``[B, H, Nq, Nk]`` tensor whose ``H`` is the head count the module declares (``num_heads``, ``heads``, ...), called
inside a module that looks like attention and that no other path captures, is reduced at once to its rows (entropy,
max logit, allowed keys: :mod:`geomon.functional.attention_scores`; nothing of size ``Nq x Nk`` is kept). Scores
with the heads folded into the batch, ``[B·H, Nq, Nk]`` (fairseq-era Hugging Face attention: XGLM, TrOCR, MVP, FSMT,
VitDet, GroupViT; torch's ``F.multi_head_attention_forward``, which WavLM calls), are read as ``[B, H, Nq, Nk]``:
batch-major, the grouping these models use to return their own per-head probabilities (a leading size that is no
multiple of ``H`` is not read). A class whose scores have the heads beside another dimension of their size, or whose
call takes several softmaxes, is read with the layout its class is known to have (:mod:`geomon.capture.hf_softmax`:
LongT5's blocks, ProphetNet's n-gram streams, each softmax under its own name). At the module's exit, the rows are
reported if that call took exactly one such softmax (or those its class is known to take) and nothing else of it was
seen; two or more (a gated mix of two attention maps, such as ConViT's GPSA) are said once and not reported, and so
is a call that also took a softmax over another dimension of such a tensor: linear attention normalises ``q`` over
its channels and ``k`` over the tokens, and ``k``'s softmax, over the last dimension of ``[B, H, Dh, N]``, is no map
of queries over keys. (A softmax over another dimension of a tensor whose last dimension is 1, such as ConvBERT's
dynamic convolution kernels ``[B·N·H, K, 1]``, is neither, and is not counted.)

Masks are read off the scores: a key at ``-inf`` or at or below -5e3 is not allowed. The padding rule's threshold,
-1e4, is for a mask's own values; here the mask has been added to the logits, so a BERT-era ``-10000`` mask puts a
padded key at ``q·k - 10000``, above -1e4 wherever ``q·k > 0``: half the threshold leaves 5e3 of room for the logits
(a key that far below its row's best has no weight in any dtype either way). In self-attention (as many queries as
keys, and a module whose path does not name it cross-attention) a key that no query row of any head may attend to
is padding, so its query row is left out, as on every other path; a cross-attention leaves out the query rows the
last self-attention over as many queries left out, as on every other path
(:mod:`geomon.capture._padding`, rule 3).

Cost: on measured steps, about ten elementwise passes over the scores of the query rows read (``score_rows``:
the monitor samples them as ``query_rows`` says) plus one max-reduction over all of them for the padding, and on
every softmax call of the model in the block a Python check of its shape (measured on the CPU:
``benchmarks/softmax_read_cost.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from geomon.capture._batch_dims import head_axes
from geomon.capture._padding import MASKED_AT, PaddingRule, is_cross_name
from geomon.capture._session import ScoresCall, Session, SharedPatch, SoftmaxStream, in_backward
from geomon.functional._common import TILE_ELEMENTS
from geomon.functional.attention_entropy import _drop_rows
from geomon.functional.attention_scores import _score_rows

#: scores at or below this are masked keys: the padding rule's -1e4 (a mask's values) with 5e3 of room for the logit
#: the mask was added to
SCORES_MASKED_AT = MASKED_AT / 2
#: where the softmax a module calls lives: ``F.softmax`` and ``nn.Softmax`` call the tensor method
_TARGETS = ((torch.Tensor, "softmax"), (torch, "softmax"))
_INSIDE = [0]  # softmax calls running now: a wrapped one that calls another (F.softmax -> Tensor.softmax) counts once


def _softmax_dispatcher(original: Callable, sessions: list[Session]) -> Callable:
    @functools.wraps(original)
    def softmax(*args: Any, **kwargs: Any) -> Any:
        _INSIDE[0] += 1
        try:
            out = original(*args, **kwargs)
        finally:
            _INSIDE[0] -= 1
        if not _INSIDE[0]:
            for session in tuple(sessions):
                _read(session, args, kwargs)
        return out

    return softmax


@contextmanager
def softmax_wrapped(session: Session) -> Iterator[None]:
    """Read every softmax the model calls while the block runs (see the module)."""
    with ExitStack() as stack:
        for owner, name in _TARGETS:
            stack.enter_context(SharedPatch.joined(owner, name, _softmax_dispatcher, session))
        yield


def _read(session: Session, args: tuple, kwargs: dict) -> None:
    if session.on_scores is None or not session.stack or session.busy or session.sdpa_context or in_backward():
        return  # sdpa_context: inside a transformers attention function, which geomon intercepts itself
    scores = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(scores, Tensor) or scores.ndim < 3 or not scores.is_floating_point():
        return
    depth = _reading_module(session)
    if depth is None:
        return
    name = session.stack[depth][1]
    heads = session.head_count(name)
    if heads is None:
        return
    over_keys = dim in (-1, scores.ndim - 1)  # of the tensor as the module passed it
    stream = _listed_stream(session, name, depth)
    placed = _heads_placed(session, name, scores, heads, stream)
    if placed is None:
        return
    scores, axes = placed
    if len(axes) > 1:  # [B, blocks, H, L, L] with as many blocks as heads, of a class not listed
        shape = ", ".join(str(size) for size in scores.shape)
        session.softmax_rows.setdefault(depth, []).append(f"[{shape}], in which {len(axes)} dimensions have its "
                                                         f"{heads} heads")  # fmt: skip
        return
    if not axes:
        return  # no [batch, ..., heads, ..., queries, keys] layout with the heads the module declares
    if not over_keys:  # linear attention normalises q and k so: not a [queries, keys] map
        if scores.shape[-1] > 1:  # [..., K, 1] (ConvBERT's dynamic convolution kernels) is neither
            session.softmax_rows.setdefault(depth, []).append(None)
        return
    read = session.softmax_rows.setdefault(depth, [])
    n_q, n_k = scores.shape[-2:]
    keep = None if session.score_rows is None else session.score_rows(n_q, n_k, scores.shape[axes[0]])

    def read_rows() -> None:  # under the stream's own name and rows where its class is listed
        padded = None if stream is None else _stream_padding(stream, scores.detach(), axes[0], session.padding)
        suffix = "" if stream is None else stream.suffix
        windows = session.padded_windows.get(depth)  # the window tokens its block padded the map with
        read.append(rows_of(name + suffix, scores.detach(), axes[0], keep, session.padding, padded, windows))

    session.guarded(name, read_rows)


def _listed_stream(session: Session, name: str, depth: int) -> SoftmaxStream | None:
    """Which of the softmaxes its class is known to take (:mod:`geomon.capture.hf_softmax`) this one of the module's
    call is, by how many it took before; None for a module not listed, or a softmax past those."""
    streams = session.softmax_streams.get(name)
    taken = len(session.softmax_rows.get(depth, ()))
    return streams[taken] if streams is not None and taken < len(streams) else None


def _heads_placed(
    session: Session, name: str, scores: Tensor, heads: int, stream: SoftmaxStream | None = None
) -> tuple[Tensor, list[int]] | None:
    """``scores`` with the heads at a dimension of their own (a view), and the dimensions that may hold them (one:
    placed; several: ambiguous); None where they cannot be. A softmax whose class says where its heads are
    (``stream``) is placed there alone, or not read where that dimension does not have them."""
    if stream is not None:
        axis = stream.head_axis
        return scores, [axis] if 0 < axis < scores.ndim - 2 and scores.shape[axis] == heads else []
    folded = scores.ndim == 3 or (name in session.folded_heads and scores.ndim >= 4)
    if folded:  # [B·H, ..., Nq, Nk], batch-major (see the module): [B, H, ..., Nq, Nk]
        if scores.shape[0] % heads:
            return None
        return scores.unflatten(0, (-1, heads)), [1]
    components = session.components.get(name, 1)
    if components > 1 and scores.ndim == 4 and scores.shape[1] == components * heads:
        # [B, C·H, Nq, Nk], head h's components at C·h + c: [B, H, C, Nq, Nk], each head pooling its components
        return scores.unflatten(1, (heads, components)), [1]
    return scores, head_axes(scores.shape, heads)


def _reading_module(session: Session) -> int | None:
    """Stack depth of the innermost running module whose attention is read at its softmax: one that looks like
    attention or is expected to be, that no adapter recomputes, and that is not known to be something else."""
    for depth in range(len(session.stack) - 1, -1, -1):
        key = session.stack[depth][0]
        if key in session.fallbacks:
            return None
        if key in session.lookalikes or (key in session.expected and "not modelled" not in session.expected[key]):
            return depth
    return None


def rows_of(
    name: str,
    scores: Tensor,
    head_axis: int = 1,
    keep: int | None = None,
    padding: PaddingRule | None = None,
    padded: Tensor | None = None,
    dropped: Tensor | None = None,
) -> ScoresCall:
    """The rows of one softmax input ``[B, ..., H, ..., Nq, Nk]`` (the heads at ``head_axis``; any other leading
    dimensions fold into the batch, as SDPA treats them), padded query rows left out as on every path (``padding``:
    the session's rule; self-attention's own are remembered for the cross-attention after it; ``padded``: the rows
    ``[B', Nq]`` to leave out instead, ``B'`` the leading dimensions but the heads, folded, where a layout known by
    class says which they are; ``dropped``: rows ``[B', Nq]`` left out besides, where they have that shape: the
    zero tokens a windowed block padded its map with); ``keep``: only that many evenly spaced query rows (the others
    are not read), ``None``: all of them."""
    n_q = scores.shape[-2]
    heads = scores.shape[head_axis]
    index = None
    if keep is not None and keep < n_q:
        index = torch.linspace(0, n_q - 1, keep, device=scores.device).round().long()
    rows = _score_rows(scores, masked_at=SCORES_MASKED_AT, query_index=index)
    rows = tuple(part.movedim(head_axis, -2).reshape(-1, heads, part.shape[-1]) for part in rows)
    batch = rows[0].shape[0]
    peak = rows[1].nan_to_num(nan=-math.inf).amax()  # before any row is left out: what the values may miss
    if padded is None:  # the padding rule's, unless a layout known by class said which rows are no token's
        padded = _padded_rows(name, scores, head_axis, batch, padding)
    if dropped is not None and dropped.shape == (batch, n_q):
        dropped = dropped.to(scores.device)
        padded = dropped if padded is None else padded.to(scores.device) | dropped
    if padded is not None:
        rows = _drop_rows(rows, padded.to(scores.device), index)  # type: ignore[arg-type]
    return ScoresCall(name, *rows, peak=peak)


def _padded_rows(name: str, scores: Tensor, head_axis: int, batch: int, padding: PaddingRule | None) -> Tensor | None:
    """The query rows ``[B', Nq]`` the padding rule leaves out of ``scores`` (``B'``: ``batch``, the leading
    dimensions but the heads, folded); self-attention's are remembered for the cross-attention after it."""
    n_q, n_k = scores.shape[-2:]
    if n_q == n_k and not is_cross_name(name):  # a key no row of any head may attend to is padding (rule 2)
        padded = ~(_best_scores(scores).amax(dim=head_axis) > SCORES_MASKED_AT).reshape(-1, n_k)
        if padding is not None:
            padding.queries[(batch, n_q)] = padded
        return padded
    # cross-attention: the rows of the last self-attention over as many queries (rule 3)
    return None if padding is None else padding.queries.get((batch, n_q))


def _best_scores(scores: Tensor) -> Tensor:
    """The highest score each key gets from any query row, ``scores``' shape without ``Nq``; one reduction, read a
    chunk of rows at a time."""
    n_q = scores.shape[-2]
    step = max(1, TILE_ELEMENTS // max(1, scores[..., 0, :].numel()))
    best = scores[..., :step, :].amax(dim=-2)
    for start in range(step, n_q, step):
        best = torch.maximum(best, scores[..., start : start + step, :].amax(dim=-2))
    return best


def _stream_padding(stream: SoftmaxStream, scores: Tensor, head_axis: int, padding: PaddingRule) -> Tensor | None:
    """The query rows ``[B', Nq]`` a softmax of a listed class leaves out (``B'``: its leading dimensions but the
    heads, folded as :func:`rows_of` folds them); None: the padding rule decides (see
    :class:`~geomon.capture._session.SoftmaxStream`)."""
    n_q = scores.shape[-2]
    if stream.local_blocks is not None:  # a row with no local key is a padded token's, or a block's padding
        local = scores[..., : stream.local_blocks * n_q].amax(dim=-1).amax(dim=head_axis)
        return ~(local > SCORES_MASKED_AT).reshape(-1, n_q)
    if stream.main_rows:  # the main stream's rows, in each other leading dimension (ProphetNet's n-gram streams)
        batch = scores.shape[0]
        others = math.prod(size for axis, size in enumerate(scores.shape[1:-2], 1) if axis != head_axis)
        main = padding.queries.get((batch, n_q))  # what the rule left out of the main stream, just before
        if main is None:
            return torch.zeros(batch * others, n_q, dtype=torch.bool, device=scores.device)
        return main.to(scores.device)[:, None, :].expand(batch, others, n_q).reshape(-1, n_q)
    return None
