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

The global tokens' hidden states are those the module gave ``query_global``, read back at its exit (see
:mod:`geomon.capture._projections`; Longformer divides the projections' outputs in place, so Q and K themselves are
computed again).

Cost of a recomputation: the Q and K projections, ``2·B·N·E·2E`` FLOPs, plus those of the global tokens.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

from geomon.capture._patterns import AlignedRule, MaskPattern
from geomon.capture._projections import projected, seen_calls
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


def _global_states(module: nn.Module, x: Tensor, global_tokens: Tensor, counts: Tensor) -> Tensor:
    """The hidden states of each item's global tokens, ``[B, G, E]`` (``G``: the most any item has; the other
    slots hold anything): the input Longformer gave ``query_global`` (``[G, B, E]``, read without a host sync), or
    gathered again, which reads ``G`` on the host."""
    for seen in reversed(seen_calls(module.query_global)):
        if isinstance(seen.input, Tensor) and seen.input.ndim == 3 and seen.input.shape[1] == x.shape[0]:
            return seen.input.transpose(0, 1)
    most = int(counts.max())  # as Longformer's own nonzero() does at every layer
    order = torch.argsort((~global_tokens).to(torch.int8), dim=1, stable=True)[:, :most]
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


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
    q, k = _heads(projected(module.query, x), heads), _heads(projected(module.key, x), heads)
    keys = ~padded[:, None, None, :]  # True = may attend
    if not call.get("is_global_attn"):
        return [Found("", q, k, keys, False, scale, False, AlignedRule(n, n, False, window + 1, None))]
    # a global token's band row is replaced by its global row: left out here, reported under ".global"
    band = Found("", q, k, keys, False, scale, False, BandOrGlobalKeys(window, global_tokens), dropped=global_tokens)
    counts = global_tokens.sum(dim=1)
    chosen = _global_states(module, x, global_tokens, counts)  # [B, G, E]: each item's global tokens, in order
    unused = torch.arange(chosen.shape[1], device=x.device)[None, :] >= counts[:, None]  # slots past an item's own
    q_global = _heads(projected(module.query_global, chosen), heads)
    k_global = _heads(projected(module.key_global, x), heads)
    rows = Found(".global", q_global, k_global, None, False, scale, False, KeysOnly(padded), dropped=unused)
    return [band, rows]


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)``: "hf:longformer" for Longformer's and LED's encoder self-attention."""
    for path, name in _CLASSES:
        cls = getattr(sys.modules.get(path), name, None)
        if cls is not None and isinstance(module, cls):
            return "hf:longformer", longformer_fallback
    return None, None
