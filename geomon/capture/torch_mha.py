"""Adapter for ``torch.nn.MultiheadAttention`` and the fused inference path of ``nn.TransformerEncoderLayer``.

``nn.MultiheadAttention`` reaches ``F.scaled_dot_product_attention`` only on one of its three paths
(``need_weights=False`` outside the fast path), where the SDPA interception sees it. Its other two paths compute
attention without SDPA: ``need_weights=True`` (explicit ``baddbmm`` + softmax inside
``F.multi_head_attention_forward``) and the inference fast path (``torch._native_multi_head_attention``: eval mode,
no grad, ``batch_first``, self-attention). For those, Q and K are recomputed at the module's exit from its input
and its input-projection weights (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight`` when ``kdim``/``vdim``
differ from ``embed_dim``), with ``bias_k`` and ``add_zero_attn`` keys appended as the module appends them.

``nn.TransformerEncoderLayer`` in eval mode without grad runs ``torch._transformer_encoder_layer_fwd``, one fused
native op that never calls ``self_attn``. There Q and K are recomputed from the layer's input (through ``norm1``
first when ``norm_first``) and reported under the name of the layer's ``self_attn``, as in training. The input may be
a nested tensor (``nn.TransformerEncoder``'s sparsity fast path with ``src_key_padding_mask``): it is padded, and
the padded positions are masked as keys *and* excluded as queries (those query rows do not exist in the nested
computation: they read NaN and drop out of every mean).

Masks stay the module's own tensors, never converted into an ``L x S`` copy: ``nn.MultiheadAttention``'s boolean
masks mean the opposite of SDPA's (True = *not* allowed); ``attn_mask`` is ``[L, S]`` or ``[B·H, L, S]``,
``key_padding_mask`` ``[B, S]``. A key-padding mask alone becomes a ``[B, 1, 1, S]`` SDPA mask (boolean inverted,
additive by reference); any mask over rows is read per key chunk by the metric
(:class:`~geomon.capture._patterns.ModuleMasks`: booleans block, floats add, as in the module), and on CUDA in place
by the kernel beside the key padding as a per-key bias, unless both are float (the module compares their sum).
``is_causal`` is only a hint on these two paths (the module applies the mask it was given), so it is not reported.
Dropout is not applied.

Cost: two ``[B·L, E] x [E, E]`` projections (Q and K, not V) per recomputed call.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomon.capture._padding import crossed
from geomon.capture._patterns import ModuleMasks
from geomon.capture._session import Found, bind

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")
_LAYER_ARGS = ("src", "src_mask", "src_key_padding_mask", "is_causal")


def _unnest(x: Tensor) -> tuple[Tensor, list[int] | None]:
    """A nested ``[B, (L_b), E]`` tensor as a zero-padded ``[B, L, E]`` one and its lengths (others unchanged)."""
    if not x.is_nested:
        return x, None
    return x.to_padded_tensor(0.0), [part.shape[0] for part in x.unbind()]


def mha_query_key(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    batch_first: bool | None = None,
    lengths: list[int] | None = None,
) -> tuple[Tensor, Tensor, MhaMask]:
    """Q ``[B, H, L, Dh]``, K ``[B, H, S', Dh]`` and the mask (:class:`MhaMask`) of one ``nn.MultiheadAttention``
    call; no mask of size ``L x S`` is built.

    Args:
        mha: the module (its weights are read, never changed).
        query: ``[L, E]`` (unbatched), ``[B, L, E]`` (``batch_first``) or ``[L, B, E]``; may be nested.
        key: the key input, laid out as ``query``.
        attn_mask: the module's ``attn_mask``: ``[L, S]`` or ``[B·H, L, S]``, boolean True = not allowed, or float.
        key_padding_mask: ``[B, S]`` (``[S]`` unbatched), boolean True = padding, or float.
        batch_first: layout of batched inputs; default ``mha.batch_first``.
        lengths: valid lengths of each sequence when the input was nested (its padded tail is masked).

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> x = torch.randn(3, 5, 8)
        >>> q, k, mask = mha_query_key(mha, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1))
        >>> q.shape, k.shape, mask.attn_mask, mask.pattern(torch.arange(5), 0, 5)[0, 0].sum(-1).tolist()
        (torch.Size([3, 2, 5, 4]), torch.Size([3, 2, 5, 4]), None, [1, 2, 3, 4, 5])
    """
    if query.is_nested or key.is_nested:
        query, lengths = _unnest(query)
        key, _ = _unnest(key)
    batch_first = mha.batch_first if batch_first is None else batch_first
    if query.dim() == 2:  # unbatched
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    batch, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
    heads, embed = mha.num_heads, mha.embed_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:embed], mha.in_proj_weight[embed : 2 * embed]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k = mha.in_proj_bias[:embed], mha.in_proj_bias[embed : 2 * embed]
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    extra = 0
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.to(k.dtype).expand(batch, 1, embed)], dim=1)
        extra += 1
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, 1, embed)], dim=1)
        extra += 1
    q = q.view(batch, n_q, heads, embed // heads).transpose(1, 2)
    k = k.view(batch, n_k + extra, heads, embed // heads).transpose(1, 2)

    masks = []  # each a view broadcastable to [B, H, L, S], in the module's semantics (True = blocked, or added)
    if attn_mask is not None:
        masks.append(attn_mask.view(1, 1, n_q, n_k) if attn_mask.dim() == 2 else attn_mask.view(batch, heads, n_q, n_k))
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(batch, 1, 1, n_k))
    dropped = None
    if lengths is not None:  # the nested tensor's padded tail: blocked as keys, dropped as queries
        valid = torch.arange(n_k, device=q.device) < torch.tensor(lengths, device=q.device)[:, None]  # [B, S]
        masks.append((~valid).view(batch, 1, 1, n_k))
        dropped = ~valid[:, :n_q]
    return q, k, _as_sdpa(masks, n_k, extra, dropped)


class MhaMask(NamedTuple):
    """An ``nn.MultiheadAttention`` call's masks for the metric: a key-padding mask alone becomes a ``[B, 1, 1, S']``
    SDPA mask; any mask over rows stays the module's own tensor, read per key chunk through ``pattern``."""

    attn_mask: Tensor | None
    pattern: ModuleMasks | None
    dropped: Tensor | None  #: [B, L] query rows of a nested input's padded tail


def _as_sdpa(masks: list[Tensor], n_k: int, extra: int, dropped: Tensor | None) -> MhaMask:
    if not masks:
        return MhaMask(None, None, dropped)
    if any(m.shape[-2] != 1 or m.shape[-3] != 1 for m in masks):
        return MhaMask(None, ModuleMasks(masks, n_k), dropped)
    blocked = [m for m in masks if m.dtype == torch.bool]  # key padding only: [B, 1, 1, S], O(B·S)
    added = [m for m in masks if m.dtype != torch.bool]
    if not added:
        allowed = ~functools.reduce(torch.logical_or, blocked)
        return MhaMask(F.pad(allowed, (0, extra), value=True) if extra else allowed, None, dropped)
    bias = added[0] if len(added) == 1 else functools.reduce(torch.add, added)
    if blocked:
        bias = bias.masked_fill(functools.reduce(torch.logical_or, blocked), -math.inf)
    return MhaMask(F.pad(bias, (0, extra), value=0.0) if extra else bias, None, dropped)


def mha_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of an ``nn.MultiheadAttention`` call that did not reach SDPA (weights requested, or its fast path)."""
    assert isinstance(module, nn.MultiheadAttention)
    call = bind(_MHA_ARGS, args, kwargs)
    q, k, mask = mha_query_key(
        module,
        call["query"],
        call["key"],
        attn_mask=call.get("attn_mask"),
        key_padding_mask=call.get("key_padding_mask"),
    )
    cross = crossed(call["query"], call["key"])
    return [Found("", q, k, mask.attn_mask, cross=cross, pattern=mask.pattern, dropped=mask.dropped)]


def encoder_layer_fallback(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of an ``nn.TransformerEncoderLayer`` that ran its fused path (``self_attn`` was never called)."""
    assert isinstance(layer, nn.TransformerEncoderLayer)
    call = bind(_LAYER_ARGS, args, kwargs)
    x, lengths = _unnest(call["src"])
    if layer.norm_first:
        x = layer.norm1.forward(x)  # .forward: no hooks of the user's run for geomon's recomputation
    q, k, mask = mha_query_key(
        layer.self_attn,
        x,
        x,
        attn_mask=call.get("src_mask"),
        key_padding_mask=call.get("src_key_padding_mask"),
        lengths=lengths,
    )
    return [Found(".self_attn", q, k, mask.attn_mask, cross=False, pattern=mask.pattern, dropped=mask.dropped)]


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)`` for the modules this adapter handles (kind None: handled but not an attention module)."""
    if isinstance(module, nn.MultiheadAttention):
        return "torch_mha", mha_fallback
    if isinstance(module, nn.TransformerEncoderLayer) and isinstance(
        getattr(module, "self_attn", None), nn.MultiheadAttention
    ):
        return None, encoder_layer_fallback
    return None, None
