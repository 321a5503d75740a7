"""Adapter for nanoGPT-style causal self-attention (``c_attn``, ``n_head``, ``n_embd``; optional ``flash``) and for
geomon's own ``geomon._tiny_gpt.CausalSelfAttention`` (``qkv``, ``n_head``).

The flash path calls ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` and is seen there. The eager path
(``flash = False``: ``softmax((q @ kᵀ) / sqrt(Dh))`` under a lower-triangular mask) is not; then Q and K are
recomputed at the module's exit from its input ``x [B, T, C]`` through the fused projection (only its Q and K thirds
when it is a plain ``nn.Linear``), split into ``n_head`` heads, and reported with ``is_causal=True`` and the default
scale ``1/sqrt(Dh)``.

Cost of a recomputation: ``2·B·T·C·2C`` FLOPs (Q and K of the fused projection).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from geomon._tiny_gpt import CausalSelfAttention as TinyAttention
from geomon.capture._session import Found, bind
from geomon.capture.timm_vit import _project


def _projection(module: nn.Module) -> tuple[nn.Module, int] | None:
    """The fused QKV projection and the model width, when ``module`` looks like nanoGPT's attention."""
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
    qk = _project(proj, x, 2 * width).view(batch, n, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    return [Found("", qk[0], qk[1], None, True, None)]


def fallback_for(module: nn.Module) -> tuple[str | None, Any]:
    """``(kind, fallback)``: "tiny_gpt" for geomon's own module, "nanogpt" for nanoGPT-style ones."""
    if _projection(module) is None:
        return None, None
    return ("tiny_gpt" if isinstance(module, TinyAttention) else "nanogpt"), fallback
