"""Capture attention queries and keys as the model really uses them, for every common attention implementation.

:func:`capture_attention` combines the interception of ``F.scaled_dot_product_attention`` with adapters for the
implementations that never call it:

=============================================  =================================================================
implementation                                 how it is seen
=============================================  =================================================================
anything calling ``F.scaled_dot_product_att``  the SDPA call itself (after rotary / QK-norm, real mask and GQA)
transformers, any ``attn_implementation``      the attention-interface call (eager global, registry entries)
``nn.MultiheadAttention`` (weights / fast)     Q/K recomputed from ``in_proj_weight`` (``torch_mha``)
``nn.TransformerEncoderLayer`` fused (eval)    Q/K recomputed from the layer input, under ``<layer>.self_attn``
timm ``Attention`` / ``AttentionRope`` eager   Q/K recomputed from ``qkv``, QK-norm, rotary (``timm``)
nanoGPT ``CausalSelfAttention`` eager          Q/K recomputed from ``c_attn``, causal (``nanogpt``)
torchvision Swin (v1, v2), MaxViT attention    Q/K recomputed per window, with their biases (``torchvision``)
=============================================  =================================================================

Each attention computation is reported once: the innermost source that saw it wins (a module-level adapter runs at
the module's exit only if nothing was reported while it ran; a function wrapper only if the function did not reach
SDPA). Calls are attributed to the attention module's name in ``model.named_modules()``. Everything is installed on
entry and removed however the block exits; a failing probe becomes a warning (``strict=True`` raises); the model's
computation is untouched (the originals run with the same arguments, geomon's recomputation runs afterwards under
``no_grad`` on detached tensors and draws no random numbers). Nothing is reported during a backward pass (a
checkpointed forward being recomputed). An attention module that ran without being seen is named in a warning, once.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn

from geomon.capture import (
    hf,
    hf_alibi,
    hf_longformer,
    hf_softmax,
    hf_windows,
    nanogpt,
    timm_vit,
    torch_mha,
    torchvision_attn,
    xtransformers,
)
from geomon.capture._session import AttentionCall, Fallback, ScoresCall, Session
from geomon.capture.softmax import softmax_wrapped

__all__ = ["capture_attention", "find_attention_modules"]


def _recognise(module: nn.Module) -> tuple[str | None, Fallback | None]:
    kind, fallback = torch_mha.fallback_for(module)
    if kind is not None or fallback is not None:
        return kind, fallback
    if "transformers" in sys.modules:
        kind = hf.kind(module)
        if kind is not None:
            return kind, None
    for adapter in (timm_vit, torchvision_attn, nanogpt, xtransformers, hf_alibi, hf_longformer):
        kind, fallback = adapter.fallback_for(module)
        if kind is not None:
            return kind, fallback
    return None, None


#: children names of query / key projections, separate or fused, in the common codebases
_QUERY_KEY_PARTS = (
    {"q_proj", "k_proj"}, {"query", "key"}, {"to_q", "to_k"}, {"wq", "wk"}, {"q", "k"}, {"q_lin", "k_lin"},
)  # fmt: skip
_FUSED_PARTS = frozenset({"qkv", "c_attn", "query_key_value", "wqkv", "to_qkv", "qkv_proj", "in_proj", "to_qk"})
_LAYERS_WITHOUT_ATTENTION = (nn.Linear, nn.Dropout, nn.LayerNorm, nn.Identity, nn.Embedding)


def looks_like_attention(module: nn.Module) -> bool:
    """Whether a module looks like an attention layer by its class name or its Q/K projections.

    Used only to say what was *not* seen: a module that looks like attention, runs, and yields no captured
    attention is named in a warning.

    Example:
        >>> from torch import nn
        >>> class Attend(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        >>> looks_like_attention(Attend()), looks_like_attention(nn.Linear(8, 8))
        (True, False)
    """
    if isinstance(module, _LAYERS_WITHOUT_ATTENTION) or isinstance(getattr(module, "A_log", None), nn.Parameter):
        return False  # A_log: a state-space mixer (Mamba, Mamba-2), whose in_proj is not attention's
    cls = type(module).__name__.lower()
    if "attention" in cls or cls.endswith(("attn", "attend")):
        return True
    children = {name.lower() for name, _ in module.named_children()}
    return bool(children & _FUSED_PARTS) or any(parts <= children for parts in _QUERY_KEY_PARTS)


def find_attention_modules(model: nn.Module) -> dict[str, str]:
    """Names of the modules of ``model`` recognisably attention, with the adapter that covers each.

    Kinds: ``"torch_mha"`` (``nn.MultiheadAttention``), ``"hf:<attn_implementation>"`` (transformers),
    ``"timm"`` (timm ``Attention`` / ``AttentionRope``), ``"timm:sdpa-only"`` (other timm attention: seen when fused),
    ``"torchvision"`` (Swin's ``ShiftedWindowAttention`` / ``V2``, MaxViT's ``RelativePositionalMultiHeadAttention``),
    ``"nanogpt"`` and ``"tiny_gpt"``. Modules that simply call SDPA are seen too without being listed here.

    Example:
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(16, 2, batch_first=True)
        >>> find_attention_modules(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
        {'layers.0.self_attn': 'torch_mha', 'layers.1.self_attn': 'torch_mha'}
    """
    found = {}
    for name, module in model.named_modules():
        kind, _ = _recognise(module)
        if kind is not None:
            found[name] = kind
    return found


@contextmanager
def capture_attention(
    model: nn.Module,
    on_attention: Callable[[AttentionCall], None],
    *,
    strict: bool = False,
    warn: Callable[[str, str], None] | None = None,
    on_scores: Callable[[ScoresCall], None] | None = None,
    score_rows: Callable[[int, int, int], int | None] | None = None,
) -> Iterator[None]:
    """Call ``on_attention`` once per attention computation of ``model`` while the block runs.

    Args:
        model: the model; only computations made inside its modules are reported.
        on_attention: receives an :class:`~geomon.capture.AttentionCall` (detached ``q [B, H, Nq, Dh]``,
            ``k [B, Hk, Nk, Dh]``, an SDPA-semantics ``attn_mask`` (the model's own, by reference), ``is_causal``,
            ``scale``, and the padding rule's parts: ``query_padding [B, Nq]``, ``masked_at``, ``pattern``; hand
            them on with ``call.mask_arguments()``), under ``no_grad``.
        strict: raise the errors of the probes and of ``on_attention`` instead of warning (for tests).
        warn: ``warn(tag, message)`` for what could not be seen (a module that ran unseen, an unmodelled term);
            default: ``warnings.warn``, once per block. The monitor passes its own warn-once, so each is said once
            per run.
        on_scores: receives the attention of modules that write it by hand, read at their own softmax (a
            :class:`~geomon.capture.ScoresCall`: the rows, already reduced; see :mod:`geomon.capture.softmax`);
            ``None`` (default): such modules are named in the unseen-attention warning instead.
        score_rows: ``score_rows(Nq, Nk, heads)``, how many evenly spaced query rows to read at such a softmax
            (``None``, or a call returning ``None``: all of them).

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> model = torch.nn.ModuleDict({"attn": mha})
        >>> x = torch.randn(1, 5, 8)
        >>> seen = []
        >>> with capture_attention(model, lambda call: seen.append((call.module, tuple(call.q.shape)))):
        ...     _ = mha(x, x, x)  # need_weights=True: no SDPA; Q and K come from in_proj_weight
        >>> seen
        [('attn', (1, 2, 5, 4))]
    """
    session = Session(model, on_attention, strict, warn, on_scores, score_rows)
    for module in model.modules():
        kind, fallback = _recognise(module)
        if fallback is not None:
            session.fallbacks[id(module)] = fallback
            session.child_outputs.watch(module)
        layout = xtransformers.sdpa_layout(module)
        name = session.name_of(module)
        if layout is not None and name is not None:
            session.sdpa_layout[name] = layout
        note = (timm_vit.note_for(module) or hf.note_for(module)) if name is not None else None
        if note is not None:
            session.notes[name] = note
        heads = timm_vit.heads_for(module) if name is not None else None
        if heads is not None:
            session.declared_heads[name] = heads
        components = timm_vit.components_for(module) if name is not None else None
        if components is not None:
            session.components[name] = components
        if name is not None and timm_vit.folds_heads(module):
            session.folded_heads.add(name)
        padding = None if name is None else timm_vit.window_padding_for(module) or hf_windows.window_padding_for(module)
        if padding is not None:
            session.window_padding[id(module)] = padding
        block = None if name is None else timm_vit.window_block_for(module) or hf_windows.window_block_for(module)
        if block is not None:
            session.window_blocks[id(module)] = block
        streams = hf_softmax.streams_for(module) if name is not None else None
        if streams is not None:
            session.softmax_streams[name] = streams
        if kind is not None:
            session.expected[id(module)] = kind
        elif fallback is None and looks_like_attention(module):
            session.lookalikes.add(id(module))
    with ExitStack() as stack:
        if "transformers" in sys.modules:
            _enter(stack, hf.patched(model, session), strict)
        stack.enter_context(session.module_hooks())
        stack.enter_context(session.window_hooks())
        stack.enter_context(session.sdpa_wrapped())
        if on_scores is not None:
            stack.enter_context(softmax_wrapped(session))
        yield
    session.say_unseen()


def _enter(stack: ExitStack, context: Any, strict: bool) -> None:
    try:
        stack.enter_context(context)
    except Exception as error:  # a setup failure costs one source, not training
        if strict:
            raise
        warnings.warn(f"geomon: attention capture of transformers modules unavailable: {error!r}", stacklevel=4)
