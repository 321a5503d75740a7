"""Adapter for nanoGPT-style causal self-attention (``c_attn``, ``n_head``, ``n_embd``; optional ``flash``) and for
geomon's own ``geomon._tiny_gpt.CausalSelfAttention`` (``qkv``, ``n_head``).

The flash path calls ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` and is seen there. The eager path
(``flash = False``: ``softmax((q @ kᵀ) / sqrt(Dh))`` under a lower-triangular mask) is not; then Q and K are
recomputed at the module's exit from its input ``x [B, T, C]`` through the fused projection (only its Q and K thirds
when it is a plain ``nn.Linear``), split into ``n_head`` heads, and reported with ``is_causal=True`` and the default
scale ``1/sqrt(Dh)``.

A module is recomputed only when it *is* nanoGPT's attention, not merely named like it: its children are among
``c_attn``, ``c_proj``, ``attn_dropout``, ``resid_dropout``; its ``forward`` takes ``x`` alone; and no name its
``forward`` reads (nor the functions of its module it calls) hints at a change to the scores: rotary embeddings
(``rotary``, ``rope``, ``freqs``, ``cos`` / ``sin``), QK-norm (``norm``), a scale, temperature, soft-capping,
windows, sinks or position terms. A fork that fails this (nanoGPT with RoPE or QK-norm) is seen where it calls
``F.scaled_dot_product_attention``; its eager path is not recomputed, and is named in the unseen-attention warning
with the reason.

Cost of a recomputation: ``2·B·T·C·2C`` FLOPs (Q and K of the fused projection).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from typing import Any

from torch import nn

from geomon._tiny_gpt import CausalSelfAttention as TinyAttention
from geomon.capture._projections import projected
from geomon.capture._session import Found, bind

_CHILDREN = frozenset({"c_attn", "c_proj", "attn_dropout", "resid_dropout"})
#: name parts that hint at a change to nanoGPT's scores (whole parts, or the start of one)
_HINTS = frozenset({"cos", "sin", "scale", "scaling", "temperature", "tanh", "softcap", "cap", "alibi", "sink",
                    "sinks", "window", "relative", "bias_k", "rms"})  # fmt: skip
_HINT_STARTS = ("rot", "rope", "freq", "norm", "pos", "qk_", "q_norm", "k_norm")


def _names(code: types.CodeType, namespace: dict, depth: int = 2) -> set[str]:
    """Names ``code`` reads (attributes, globals, locals), with its nested code and the module-level functions it
    calls, ``depth`` levels down."""
    names = set(code.co_names) | set(code.co_varnames)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const, namespace, depth)
    if depth:
        for name in code.co_names:
            value = namespace.get(name)
            if isinstance(value, types.FunctionType) and value.__module__ == namespace.get("__name__"):
                names |= _names(value.__code__, value.__globals__, depth - 1)
    return names


@functools.cache
def _unlike_nanogpt(cls: type) -> str | None:
    """Why ``cls.forward`` is not nanoGPT's attention forward (None: it is, as far as its code says)."""
    forward = inspect.unwrap(cls.forward)
    code = getattr(forward, "__code__", None)
    if code is None:
        return "its forward is not Python code"
    parameters = list(inspect.signature(forward).parameters)[1:]
    if len(parameters) != 1:
        return f"its forward takes {parameters}, not x alone"
    for name in sorted(_names(code, forward.__globals__)):
        parts = [p for p in re.split(r"[_\d]+", name.lower()) if p]
        if name.lower() in _HINTS or any(p in _HINTS or p.startswith(_HINT_STARTS) for p in parts):
            return f"its forward reads {name!r}"
    return None


def _unlike(module: nn.Module) -> str | None:
    extra = sorted(name for name, _ in module.named_children() if name not in _CHILDREN)
    if extra:
        return f"it has {extra} beside nanoGPT's projections"
    return _unlike_nanogpt(type(module))


def _projection(module: nn.Module) -> tuple[nn.Module, int] | None:
    """The fused QKV projection and the model width, when ``module`` is named like nanoGPT's attention."""
    if isinstance(module, TinyAttention):
        return module.qkv, module.qkv.out_features // 3
    proj, heads, width = (
        getattr(module, "c_attn", None),
        getattr(module, "n_head", None),
        getattr(module, "n_embd", None),
    )
    if isinstance(proj, nn.Module) and isinstance(heads, int) and isinstance(width, int) and heads > 0:
        return proj, width
    return None


def fallback(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Found]:
    """Q/K of a causal self-attention call that did not reach SDPA."""
    found = _projection(module)
    assert found is not None
    proj, width = found
    x = bind(("x",), args, kwargs)["x"]
    batch, n, _ = x.shape
    heads = module.n_head
    qk = projected(proj, x, 2 * width).view(batch, n, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    return [Found("", qk[0], qk[1], None, True, None)]


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)``: "tiny_gpt" for geomon's own module, "nanogpt" for nanoGPT's attention; a module named
    like it that is not (a fork with rotary embeddings, QK-norm...): a kind saying why, and no recomputation."""
    if _projection(module) is None:
        return None, None
    if isinstance(module, TinyAttention):
        return "tiny_gpt", fallback
    why = _unlike(module)
    if why is not None:
        return f"nanogpt-like, not recomputed: {why}; seen only where it calls SDPA", None
    return "nanogpt", fallback
