"""Adapter for x-transformers (``x_transformers.attend.Attend``, the core of every ``Attention`` layer it builds).

``Attention`` projects Q/K/V, applies QK-norm, rotary / xPos embeddings, memory and null key/values, builds the
boolean mask (padding, ``attn_mask``, ``max_attend_past``) and the additive bias (ALiBi, T5-style relative bias,
dynamic / data-dependent biases), and hands all of it to its ``attend`` child:
``attend(q, k, v, mask=..., attn_bias=..., prev_attn=..., causal=...)``. That call is where the final logits meet:

- ``flash=True``: ``Attend.flash_attn`` calls ``F.scaled_dot_product_attention`` with the mask, bias and causal flag
  folded in as x-transformers does; the SDPA wrapper sees it.
- otherwise ``Attend`` computes ``softmax(scale·q·kᵀ + prev_attn + attn_bias)`` under the mask and causal flag
  itself. Its inputs are taken at its exit (nothing is recomputed): ``q``, ``k`` (grouped key heads tiled as
  x-transformers tiles them: query head ``h`` reads key head ``h mod Hk``), ``scale`` (``dim_head ** -0.5``, or
  the QK-norm scale), the boolean mask, the additive ``attn_bias`` and residual ``prev_attn`` as a float mask,
  the causal mask aligned bottom-right when there are more keys than queries (``n == 1`` is not causal), and the
  zero key of ``add_zero_kv``. Cross-attention blocks (``'c'`` layers of an ``Encoder`` / ``Decoder``) are reported
  as cross-attention.

Configurations whose softmax is not ``softmax(scale·q·kᵀ + additive terms)`` are recognised and warned about by
name, not reported: talking heads, logit soft-clamping, sparse top-k / sigmoid / hard / gumbel / custom attention
functions, CoPE, selective attention, signed (cog) attention, learned sinks, inverted attention, l2-distance scores
(except on the flash path, where SDPA receives the augmented Q/K), an ``attn_delta`` and packed flash sequences.

Cost: none beyond the callback. The mask is passed by reference when it is the only term; a bias, the previous
layer's scores, memory or zero keys are combined with it per key chunk
(:class:`~geomon.capture._patterns.KeyTerms`), never into a ``B·H·Nq·Nk`` tensor. On CUDA the kernel reads one
per-score term in place beside the causal flag and per-key terms (``KeyTerms.kernel_terms``); keys moved last (zero
or memory keys in self-attention) or not covered by a term, and two per-score terms, leave the call to the torch
path.
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any

import torch.nn.functional as F
from torch import nn

from geomon.capture._patterns import AlignedRule, KeyTerms
from geomon.capture._session import Found, bind

#: ``Attend`` modules of an ``Encoder`` / ``Decoder``: "a" (self-attention) or "c" (cross-attention) layers
_LAYER_TYPE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
#: memory key/values (``attn_num_mem_kv``) the ``Attention`` layer puts before the keys, by its ``Attend``
_MEMORY: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()

_ARGS = ("q", "k", "v", "mask", "attn_bias", "prev_attn", "attn_delta", "row_mask", "flash_pack_seq_kwargs", "causal")


class NotModelled(RuntimeError):
    """A call uses something attention entropy does not model."""


def _classes() -> tuple[type | None, type | None, type | None]:
    attend = sys.modules.get("x_transformers.attend")  # x-transformers is never imported by geomon
    layers = sys.modules.get("x_transformers.x_transformers")
    names = ((attend, "Attend"), (layers, "AttentionLayers"), (layers, "Attention"))
    return tuple(getattr(module, name, None) for module, name in names)  # type: ignore[return-value]


def _is_softmax(fn: Any) -> bool:
    return isinstance(fn, functools.partial) and fn.func is F.softmax and not fn.args and fn.keywords.get("dim") == -1


def unmodelled(module: nn.Module) -> str | None:
    """What in an ``Attend``'s configuration changes its softmax, None when it is ``softmax(scores + bias)``."""
    flags = (
        (getattr(module, "pre_softmax_talking_heads", None) is not None, "talking heads"),
        (getattr(module, "post_softmax_talking_heads", None) is not None, "talking heads"),
        (getattr(module, "pre_scale_post_talking_heads", None) is not None, "talking heads"),
        (getattr(module, "softclamp_logits", False), "logit soft-clamping"),
        (getattr(module, "cog_signed", False), "signed (cog) attention"),
        (getattr(module, "cope", None) is not None, "contextual position encoding (CoPE)"),
        (getattr(module, "selective", False), "selective attention"),
        (getattr(module, "head_learned_sink", False), "learned attention sinks"),
        (getattr(module, "inverted_attention", False), "inverted attention"),
        (getattr(module, "l2_distance", False) and not module.flash, "l2-distance scores"),
        (
            not module.flash and not _is_softmax(getattr(module, "attn_fn", None)),
            "an attention function other than softmax (sparse top-k, sigmoid, hard, gumbel or custom)",
        ),
    )
    return next((why for flag, why in flags if flag), None)


def attend_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K, mask and additive terms of an ``Attend`` call that did not reach SDPA, as ``Attend.forward`` uses them."""
    call = bind(_ARGS, args, kwargs)
    if call.get("attn_delta") is not None:
        raise NotModelled("an attn_delta is added to the attention probabilities; not reported")
    if call.get("flash_pack_seq_kwargs") is not None and module.flash:
        raise NotModelled("packed sequences through flash_attn varlen are not seen; not reported")
    q, k = call["q"], call["k"]
    heads, kv_heads, n_q = q.shape[1], k.shape[1], q.shape[-2]
    if 1 < kv_heads < heads:
        k = k.repeat(1, heads // kv_heads, 1, 1)  # 'b kvh n d -> b (r kvh) n d': head h reads key head h mod Hk
    causal = module.causal if call.get("causal") is None else call["causal"]
    causal = bool(causal) and n_q != 1
    allowed = call.get("mask")
    if allowed is not None and allowed.dim() == 2:
        allowed = allowed[:, None, None, :]
    additive = [t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) for t in (call.get("attn_bias"), call.get("prev_attn"))
                if t is not None]  # fmt: skip
    leading, zero = _leading_keys(module)
    if zero:
        k = F.pad(k, (0, 0, 1, 0), value=0.0)
    n_k = k.shape[-2]
    aligned = n_k - leading == n_q  # key j is token j once the extra keys are moved last (the padding rule's reading)
    roll = leading if aligned else 0
    if roll:
        k = k.roll(-roll, dims=-2)
    scale = float(module.scale if module.scale is not None else q.shape[-1] ** -0.5)
    cross = _LAYER_TYPE.get(module)
    cross = None if cross is None or (cross == "a" and not aligned) else cross == "c"
    if not additive and not leading:  # the mask as is, by reference; causality by SDPA's flag or generated
        is_causal = causal and n_q == n_k and allowed is None
        pattern = AlignedRule(n_q, n_k, True, None, None) if causal and not is_causal else None
        return [Found("", q, k, allowed, is_causal, scale, cross, pattern)]
    # otherwise every term is combined per key chunk, in the reported key order: no B x H x Nq x Nk tensor is formed
    pattern = KeyTerms(allowed, additive, causal, n_q, n_k, zero, roll)
    return [Found("", q, k, None, False, scale, cross, pattern)]


def sdpa_layout(module: nn.Module) -> tuple[bool | None, int] | None:
    """For an ``Attend`` (its flash path calls SDPA): whether its layer is cross-attention (None: unknown) and how
    many keys it puts before the tokens' own (memory key/values, the zero key); None for other modules. Read once
    the enclosing layers were passed to :func:`fallback_for` (``model.modules()`` order)."""
    attend = _classes()[0]
    if attend is None or not isinstance(module, attend):
        return None
    layer_type = _LAYER_TYPE.get(module)
    return (None if layer_type is None else layer_type == "c"), _leading_keys(module)[0]


def _leading_keys(module: nn.Module) -> tuple[int, int]:
    """``(all, zero)``: the keys an ``Attend`` call has before the tokens' own - memory key/values, put first by
    the ``Attention`` layer, and the zero key ``Attend`` itself puts first (``add_zero_kv``) - and the zero keys."""
    zero = int(bool(getattr(module, "add_zero_kv", False)))
    return _MEMORY.get(module, 0) + zero, zero


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)``: "x_transformers" for an ``Attend`` whose softmax geomon models; for one it does not,
    a kind naming the feature and no fallback (so that the module is named in a warning when it runs)."""
    attend, layers, attention = _classes()
    if attention is not None and isinstance(module, attention):
        if isinstance(getattr(module, "attend", None), nn.Module):
            _MEMORY[module.attend] = int(getattr(module, "num_mem_kv", 0))
        return None, None
    if layers is not None and isinstance(module, layers):
        for (_, block, _), layer_type in zip(module.layers, module.layer_types, strict=False):
            if layer_type in ("a", "c") and isinstance(getattr(block, "attend", None), nn.Module):
                _LAYER_TYPE[block.attend] = layer_type
        return None, None
    if attend is None or not isinstance(module, attend):
        return None, None
    why = unmodelled(module)
    if why is not None:
        return f"x_transformers: {why}, not modelled", None
    return "x_transformers", attend_fallback
