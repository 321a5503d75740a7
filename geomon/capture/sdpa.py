"""Capture attention queries and keys as the model really uses them, at ``F.scaled_dot_product_attention``.

Intercepting the attention call sees ``q`` and ``k`` *after* rotary embeddings and QK-norm, with the mask, scale,
causal flag and grouped-query layout the model passed, without switching the model to eager attention or asking
for attention weights. While :func:`capture_sdpa` is active, ``torch.nn.functional.scaled_dot_product_attention``
is wrapped: the original runs unchanged (its output is returned as is), then the callback receives the detached
inputs under ``torch.no_grad()``, attributed to the innermost module of the model that was running (its name in
``named_modules()``). Global forward pre/post hooks keep that module stack (global, so that no module's own hook
dictionary changes); they and the wrapper exist only inside the ``with`` block and are removed however it exits.
A callback error becomes a warning (``strict=True`` raises).

Calls that bind the function before the block (``from torch.nn.functional import scaled_dot_product_attention``
at import time) are not seen; every model that calls ``F.scaled_dot_product_attention`` or
``torch.nn.functional.scaled_dot_product_attention`` at run time is. :func:`geomon.capture.capture_attention`
adds the implementations that never call SDPA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from geomon.capture._session import AttentionCall, Session

__all__ = ["AttentionCall", "capture_sdpa"]


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
    session = Session(model, on_attention, strict)
    with session.module_hooks(), session.sdpa_wrapped():
        yield
