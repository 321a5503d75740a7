"""Adapter for Hugging Face ALiBi models that compute attention themselves: Bloom (``BloomAttention``) and MPT
(``MptAttention``). Neither calls an attention function that transformers exposes, so Q and K are recomputed at the
module's exit from its input and fused projection (only the Q and K rows of a plain ``nn.Linear``; the whole
projection otherwise), and the scores' additive terms are taken from the call's own arguments:

- Bloom: ``alibi [B·H, 1, Nk]`` (times ``beta``) plus the 4-D additive ``attention_mask``; scale ``inv_norm_factor``;
  fused ``query_key_value`` laid out ``[H, 3, Dh]`` per token.
- MPT: ``position_bias [H, 1, max_seq_len]`` sliced to the last ``Nk`` keys as MPT slices it, ``clip_qkv``, the
  boolean ``attention_mask`` (True = masked: MPT fills those scores); scale ``softmax_scale``.

With a key/value cache holding earlier tokens, the keys are read from the cache after the call (the cache's layer
``keys`` when their length is the call's); otherwise the call is not reported (a warning names it).

Both pass their terms without forming their sum: the mask by reference (Bloom) and the bias and MPT's mask as a
:class:`~geomon.capture._patterns.ModuleMasks` combined per key chunk, so no ``B·H·Nq·Nk`` tensor is made. On CUDA
the kernel reads the mask in place and the ALiBi as one bias per key (``ModuleMasks.kernel_terms``).

Cost of a recomputation: the Q and K projections, ``2·B·N·E·2E`` FLOPs.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomon.capture._patterns import ModuleMasks
from geomon.capture._projections import projected, read_back
from geomon.capture._session import Found, bind


class NotModelled(RuntimeError):
    """A call whose keys or scores geomon cannot recover exactly."""


def _cached_keys(cache: Any, layer: int | None, n_k: int) -> Tensor:
    keys = None
    with contextlib.suppress(AttributeError, IndexError, TypeError):
        keys = cache.layers[layer].keys
    if not isinstance(keys, Tensor) or keys.shape[-2] != n_k:
        raise NotModelled("keys from a cache of earlier tokens cannot be read back; not reported")
    return keys


def bloom_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K and ALiBi + mask of a ``BloomAttention`` call, as its ``baddbmm`` and mask addition use them."""
    names = ("hidden_states", "residual", "alibi", "attention_mask", "layer_past", "use_cache")
    call = bind(names, args, kwargs)
    x, alibi, mask = call["hidden_states"], call["alibi"], call.get("attention_mask")
    batch, n, width = x.shape
    heads, dim = module.num_heads, module.head_dim
    proj = module.query_key_value
    qk = read_back(proj, x)  # as the model computed it in this call
    if qk is None and type(proj) is nn.Linear:  # only the Q and K rows of each head's [q, k, v] block
        weight = proj.weight.view(heads, 3, dim, width)[:, :2].reshape(-1, width)
        bias = None if proj.bias is None else proj.bias.view(heads, 3, dim)[:, :2].reshape(-1)
        qk = F.linear(x, weight, bias).view(batch, n, heads, 2, dim)
    else:
        qk = (qk if qk is not None else projected(proj, x)).view(batch, n, heads, 3, dim)
    q, k = qk[..., 0, :].transpose(1, 2), qk[..., 1, :].transpose(1, 2)
    n_k = alibi.shape[-1]
    if n_k != n:
        k = _cached_keys(call.get("layer_past"), module.layer_idx, n_k)
    # ALiBi [B, H, 1, Nk] is added per key chunk; the model's mask (boolean True = may attend, or additive) is passed
    # by reference: no B x H x Nq x Nk sum of the two is formed
    bias = ModuleMasks([module.beta * alibi.view(batch, heads, -1, n_k)], n_k)
    return [Found("", q, k, mask, False, float(module.inv_norm_factor), False, bias)]


def mpt_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K, ALiBi and mask of an ``MptAttention`` call, as its forward uses them."""
    call = bind(("hidden_states", "position_bias", "cache", "attention_mask"), args, kwargs)
    x, position_bias, mask = call["hidden_states"], call.get("position_bias"), call.get("attention_mask")
    cache = call.get("cache", call.get("past_key_values"))
    batch, n, width = x.shape
    heads, dim = module.n_heads, module.head_dim
    qk = projected(module.Wqkv, x, 2 * width)
    if module.clip_qkv:
        qk = qk.clamp(min=-module.clip_qkv, max=module.clip_qkv)
    q, k = (t.reshape(batch, n, heads, dim).transpose(1, 2) for t in qk.chunk(2, dim=-1))
    n_k = n if cache is None else cache.get_seq_length(module.layer_idx)
    if n_k != n:
        k = _cached_keys(cache, module.layer_idx, n_k)
    terms = []  # in MPT's own semantics, combined per key chunk (views: no Nq x Nk tensor is formed)
    if position_bias is not None:
        n_q = n if cache is None else n + cache.get_seq_length()  # as MPT computes it, after the cache update
        bias = position_bias[:, max(0, position_bias.size(1) - n_q) :, max(0, position_bias.size(2) - n_k) :]
        terms.append(bias[None])
    if mask is not None:
        if mask.dtype != torch.bool:
            raise NotModelled(f"a {mask.dtype} attention_mask (MPT fills where it is True); not reported")
        terms.append(mask)  # True = may not attend
    pattern = ModuleMasks(terms, n_k) if terms else None
    return [Found("", q, k, None, False, float(module.softmax_scale), False, pattern)]


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)``: "hf:bloom" / "hf:mpt" for the attention modules of those models."""
    bloom = getattr(sys.modules.get("transformers.models.bloom.modeling_bloom"), "BloomAttention", None)
    if bloom is not None and isinstance(module, bloom):
        return "hf:bloom", bloom_fallback
    mpt = getattr(sys.modules.get("transformers.models.mpt.modeling_mpt"), "MptAttention", None)
    if mpt is not None and isinstance(module, mpt):
        return "hf:mpt", mpt_fallback
    return None, None
