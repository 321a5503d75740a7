"""Capture attention queries and keys as the model really uses them, at ``F.scaled_dot_product_attention``.

Intercepting the attention call sees ``q`` and ``k`` *after* rotary embeddings and QK-norm, with the mask, scale,
causal flag and grouped-query layout the model passed, without switching the model to eager attention or asking
for attention weights. While :func:`capture_sdpa` is active, ``torch.nn.functional.scaled_dot_product_attention``
is wrapped: the original runs unchanged (its output is returned as is), then the callback receives the detached
inputs under ``torch.no_grad()``, attributed to the innermost module of the model that was running (its name in
``named_modules()``). Forward pre/post hooks keep that module stack; they and the wrapper exist only inside the
``with`` block and are removed however it exits. A callback error becomes a warning (``strict=True`` raises).

Calls that bind the function before the block (``from torch.nn.functional import scaled_dot_product_attention``
at import time) are not seen; every model that calls ``F.scaled_dot_product_attention`` or
``torch.nn.functional.scaled_dot_product_attention`` at run time is.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AttentionCall:
    """One attention call's inputs, detached, as SDPA received them."""

    module: str  #: name of the innermost running module of the model ("" for the model itself)
    q: Tensor  #: [B, H, Nq, Dh]
    k: Tensor  #: [B, Hk, Nk, Dh]
    attn_mask: Tensor | None
    is_causal: bool
    scale: float | None


def _split_arguments(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None, bool, float | None]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args, strict=False)) | kwargs
    return (
        bound["query"],
        bound["key"],
        bound.get("attn_mask"),
        bool(bound.get("is_causal", False)),
        bound.get("scale"),
    )


@contextmanager
def capture_sdpa(
    model: nn.Module, on_attention: Callable[[AttentionCall], None], *, strict: bool = False
) -> Iterator[None]:
    """Call ``on_attention`` for every SDPA call made while the block runs, with the calling module's name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Attention(nn.Module):
        ...     def forward(self, x):
        ...         return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        >>> model = nn.Sequential(Attention())
        >>> seen = []
        >>> with capture_sdpa(model, lambda call: seen.append((call.module, call.is_causal))):
        ...     _ = model(torch.randn(1, 2, 5, 8))
        >>> seen
        [('0', True)]
    """
    original = F.scaled_dot_product_attention
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(functools.partial(_enter, stack, name)))
        handles.append(module.register_forward_hook(functools.partial(_leave, stack), always_call=True))

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if stack:  # only calls made inside the watched model
            try:
                q, k, mask, is_causal, scale = _split_arguments(args, kwargs)
                with torch.no_grad():
                    detached = None if mask is None else mask.detach()
                    on_attention(AttentionCall(stack[-1], q.detach(), k.detach(), detached, is_causal, scale))
            except Exception as error:  # monitoring must never break training
                if strict:
                    raise
                warnings.warn(f"geomon: attention capture in {stack[-1]!r} failed: {error!r}", stacklevel=2)
        return out

    F.scaled_dot_product_attention = wrapper
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


def _enter(stack: list[str], name: str, module: nn.Module, args: tuple) -> None:
    stack.append(name)


def _leave(stack: list[str], module: nn.Module, args: tuple, output: object) -> None:
    if stack:
        stack.pop()
