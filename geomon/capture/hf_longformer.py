"""Adapter for Hugging Face Longformer's sliding-window attention (``LongformerSelfAttention``, and LED's encoder
copy of it, ``LEDEncoderSelfAttention``), which computes banded scores ``[B, N, H, 2w + 1]`` itself and calls no
attention function. Q and K are recomputed at the module's exit from its input and its ``query`` / ``key``
projections, and the rows are those the module's own softmax normalises:

- a token's row reads the keys within ``w`` of it (``attention_window / 2``) and the global tokens, padding left out:
  the band alone is a sliding window (``|i - j| <= w``) that the fused kernel takes as a key range, with the key
  padding as a ``[B, 1, 1, N]`` mask; with global tokens, the band-or-global rule is generated per key chunk
  (:class:`BandOrGlobalKeys`, measured by the torch path, on CUDA too);
- the global tokens' own rows are computed by Longformer over every key with their own projections
  (``query_global`` / ``key_global``), and they replace those tokens' band rows: they are reported under
  ``<module>.global``, and the band rows of global tokens are left out of the module's own values;
- padded tokens (``is_index_masked``, Longformer's padding to a whole number of windows included) are left out as
  queries and masked as keys, as the module masks them.

What the module's projections computed in the call is read back at its exit (:mod:`geomon.capture._projections`):
``key`` and ``key_global`` as they returned it, ``query`` and ``query_global`` after the one in-place division by
``sqrt(Dh)`` Longformer applies to them (the scale is then 1), and the global tokens' hidden states the module gave
``query_global``, which size the global rows without a host read.

Cost where nothing is read back (a projection called otherwise): the Q and K projections, ``2·B·N·E·2E`` FLOPs, plus
``key_global`` over every token and ``query_global`` over the global tokens.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

from geomon.capture._patterns import AlignedRule, MaskPattern
from geomon.capture._projections import projected, read_back, seen_calls
from geomon.capture._session import Found, bind

_CLASSES = (
    ("transformers.models.longformer.modeling_longformer", "LongformerSelfAttention"),
    ("transformers.models.led.modeling_led", "LEDEncoderSelfAttention"),
)
_ARGUMENTS = ("hidden_states", "attention_mask", "is_index_masked", "is_index_global_attn", "is_global_attn")


class BandOrGlobalKeys(MaskPattern):
    """Longformer's rows with global tokens: query ``i`` may attend to key ``j`` when ``|i - j| <= window`` or ``j``
    is a global token (``global_tokens [B, N]``); padding is masked by the call's own mask."""

    def __init__(self, window: int, global_tokens: Tensor) -> None:
        self.window, self.global_tokens = window, global_tokens

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        cols = torch.arange(start, stop, device=positions.device)
        band = (positions[:, None] - cols[None, :]).abs() <= self.window
        return (band[None] | self.global_tokens[:, None, start:stop].to(positions.device))[:, None]


class KeysOnly(MaskPattern):
    """Keys masked per batch item (``blocked [B, Nk]``) for query rows that are not the keys' own tokens (the global
    tokens' rows): which rows to leave out is said by the call, not read off the keys."""

    def __init__(self, blocked: Tensor) -> None:
        self.blocked = blocked

    def __call__(self, positions: Tensor, start: int, stop: int) -> Tensor:
        return ~self.blocked[:, None, None, start:stop].to(positions.device)


def _heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, H·Dh]`` as ``[B, H, N, Dh]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _projected(proj: nn.Module, x: Tensor, heads: int, scale: float | None = None) -> Tensor:
    """``proj`` of the module's input ``x [B, N, E]`` as ``[B, H, N, Dh]``, times ``scale`` when given. Longformer
    applies its projections to ``x.transpose(0, 1)`` and divides the queries by ``sqrt(Dh)`` in place: what it
    computed is read back (:mod:`geomon.capture._projections`), else computed again."""
    states = x.transpose(0, 1)  # the view the module projects
    found = read_back(proj, states, changed=0 if scale is None else 1)
    if found is not None:
        return _heads(found.transpose(0, 1), heads)
    out = _heads(projected(proj, x), heads)
    return out if scale is None else out * scale


def _global_queries(module: nn.Module, x: Tensor, global_tokens: Tensor, counts: Tensor, scale: float) -> Tensor:
    """The scaled queries of each item's global tokens, ``[B, H, G, Dh]`` (``G``: the most any item has; the other
    slots hold anything), from the states Longformer gave ``query_global`` (``[G, B, E]``; what it computed of them
    read back), or from those states gathered again, which reads ``G`` on the host."""
    for seen in reversed(seen_calls(module.query_global)):
        states = seen.input
        if isinstance(states, Tensor) and states.ndim == 3 and states.shape[1] == x.shape[0]:
            found = read_back(module.query_global, states, changed=1)  # divided by sqrt(Dh) in place
            if found is not None:
                return _heads(found.transpose(0, 1), module.num_heads)
            return _heads(projected(module.query_global, states.transpose(0, 1)), module.num_heads) * scale
    most = int(counts.max())  # as Longformer's own nonzero() does at every layer
    order = torch.argsort((~global_tokens).to(torch.int8), dim=1, stable=True)[:, :most]
    chosen = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    return _heads(projected(module.query_global, chosen), module.num_heads) * scale


def longformer_fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Band rows (and the global tokens' rows) of one ``LongformerSelfAttention`` call, as its forward forms them."""
    call = bind(_ARGUMENTS, args, kwargs)
    x = call["hidden_states"]  # [B, N, E]: the module transposes it to [N, B, E] itself
    mask = call.get("attention_mask")  # [B, N]: < 0 padding, 0 local, > 0 global, as LongformerModel makes it
    padded, global_tokens = call.get("is_index_masked"), call.get("is_index_global_attn")
    if padded is None:
        padded = mask < 0
    if global_tokens is None:
        global_tokens = mask > 0
    heads, scale = module.num_heads, 1 / math.sqrt(module.head_dim)
    window = module.one_sided_attn_window_size
    n = x.shape[1]
    q, k = _projected(module.query, x, heads, scale), _projected(module.key, x, heads)  # q scaled, as Longformer
    keys = ~padded[:, None, None, :]  # True = may attend
    if not call.get("is_global_attn"):
        return [Found("", q, k, keys, False, 1.0, False, AlignedRule(n, n, False, window + 1, None))]
    # a global token's band row is replaced by its global row: left out here, reported under ".global"
    band = Found("", q, k, keys, False, 1.0, False, BandOrGlobalKeys(window, global_tokens), dropped=global_tokens)
    counts = global_tokens.sum(dim=1)
    q_global = _global_queries(module, x, global_tokens, counts, scale)  # [B, H, G, Dh]: in order, scaled
    unused = torch.arange(q_global.shape[2], device=x.device)[None, :] >= counts[:, None]  # past an item's own
    k_global = _projected(module.key_global, x, heads)
    rows = Found(".global", q_global, k_global, None, False, 1.0, False, KeysOnly(padded), dropped=unused)
    return [band, rows]


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)``: "hf:longformer" for Longformer's and LED's encoder self-attention."""
    for path, name in _CLASSES:
        cls = getattr(sys.modules.get(path), name, None)
        if cls is not None and isinstance(module, cls):
            return "hf:longformer", longformer_fallback
    return None, None
