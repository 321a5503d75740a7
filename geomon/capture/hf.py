"""Adapter for Hugging Face transformers attention modules, whatever their ``attn_implementation``.

A transformers attention module (``LlamaAttention``, ``GPT2Attention``, ``BertSelfAttention``...) projects its Q/K,
applies rotary embeddings or QK-norm, and then calls one *attention function*:
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)(module, query, key,
value, attention_mask, scaling=..., dropout=..., **kwargs)`` with ``query [B, H, Nq, Dh]`` and ``key
[B, Hk, Nk, Dh]`` (not repeated for grouped-query attention). That call is the single place where the model's real
Q/K, mask and scale are all in hand, so it is intercepted there, while the capture block runs:

- ``"sdpa"``: transformers' SDPA function calls ``F.scaled_dot_product_attention``, seen by the SDPA wrapper; left
  alone here (any function that reaches SDPA is reported by SDPA and not again by its wrapper).
- ``"eager"``: ``eager_attention_forward`` is a global of each modeling module, looked up at call time; it is
  replaced in the namespace (``forward.__globals__``) of each attention class found in the model. Its mask is the 4-D
  additive float mask that eager adds to the scores (or None), reported as such; a 4-D boolean mask the user passed,
  which transformers hands on as it is, is added by eager too, as 1 / 0 (it masks nothing), and reported so. GPT-2's
  ``_upcast_and_reordered_attn`` (eager with ``reorder_and_upcast_attn``) is wrapped on its class likewise.
- everything else (``flash_attention_2/3/4``, ``flex_attention``, ``paged|eager``, functions registered with
  ``AttentionInterface.register``): the entries of ``transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS`` (the class
  mapping, and the local mapping of every interface instance a modeling module uses) are wrapped. Their masks follow
  the mask function of the implementation and are converted to SDPA semantics: a 4-D boolean (True = may attend) or
  float (added) mask is kept, by reference (transformers' flex function adds a 4-D tensor mask in its ``score_mod``,
  head 0's for every head: a boolean one as 1 / 0, and so it is read); a ``BlockMask`` (flex) is read per key chunk
  from its block tables and ``mask_mod`` (:class:`~geomon.capture._patterns.FlexRule`); a 2-D ``[B, Nk]`` padding
  mask (flash, 1 = token) becomes a ``[B, 1, 1, Nk]`` key mask, and the causal flag (the call's ``is_causal`` keyword or
  ``module.is_causal``), aligned bottom-right when ``Nq != Nk`` as flash-attn does, ``sliding_window`` and packed
  sequences (flash with no mask, batch of one: its ``cu_seq_lens_q/k`` varlen arguments, else a sequence starting
  wherever ``position_ids`` is at its minimum, as transformers cuts them) become a rule generated per key chunk
  (:class:`~geomon.capture._patterns.AlignedRule`), never an ``Nq x Nk`` tensor. Flash drops padded query tokens:
  their rows are excluded (``query_padding``: NaN, out of every mean).

Each function is replaced once for all the capture blocks active at a time (a ``SharedPatch``: one wrapper notifies
every block, each of which reports only its own model's modules) and the original is put back when the last block
exits, in whatever order they exit; a function put there by someone else meanwhile is left. Attention with logit
soft-capping (``softcap``) or attention sinks (``s_aux``) is not modelled by the entropy definition: a warning, no
value. ``transformers`` is never imported by geomon: only models whose classes are already loaded are inspected.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from geomon.capture._patterns import AddedMask, AlignedRule, FlexRule
from geomon.capture._session import Found, MakeDispatcher, SdpaContext, Session, SharedPatch, bind, in_backward

_INTERFACE_ARGS = ("attention_mask", "scaling", "dropout")
_UNMODELLED = {"softcap": "logit soft-capping", "s_aux": "attention sinks", "sinks": "attention sinks"}
#: keyword arguments the eager functions add to the scores before the softmax (T5-style relative position biases)
_ADDITIVE = ("position_bias",)
_REORDER = "_upcast_and_reordered_attn"
#: attributes of differential attention (DiffLlama): its output mixes two softmax heads, λ-weighted
_DIFFERENTIAL = ("lambda_init", "lambda_q1", "lambda_k1")
_DEPTH = (
    "hf:depth attention (a learned query over the earlier blocks' states at each token: the call's heads axis "
    "is the token positions and its keys are depths, not tokens), not modelled"
)
#: transformers attention whose rows are not one softmax over every query, or not over tokens: listed, never reported
_NOT_MODELLED = {
    "InformerProbSparseAttention": "hf:ProbSparse attention (only the top-u query rows take a softmax; the others "
    "read the mean of the values), not modelled",
    "Inkling2BlockAttentionResidual": _DEPTH,
    "Inkling2LoopBlockAttentionResidual": _DEPTH,
    "Inkling2LoopMessageAttentionResidual": _DEPTH,
}  # fmt: skip


def note_for(module: nn.Module) -> str | None:
    """What a transformers attention module's values mean where that is not plain (the capture says it once)."""
    if all(hasattr(module, a) for a in _DIFFERENTIAL):
        return ("differential attention ((softmax_1 - λ·softmax_2)·V, head h paired with head h + H/2): its entropy "
                "and max logit are those of each component softmax head; the difference is not a distribution and "
                "has no entropy")  # fmt: skip
    return None


@functools.cache
def _forward_function(cls: type) -> Any:
    return inspect.unwrap(cls.forward)


@functools.cache
def _is_attention_class(cls: type) -> bool:
    code = getattr(_forward_function(cls), "__code__", None)
    return code is not None and bool({"ALL_ATTENTION_FUNCTIONS", "eager_attention_forward"} & set(code.co_names))


def _not_modelled(module: nn.Module) -> str | None:
    cls = type(module)
    return _NOT_MODELLED.get(cls.__name__) if cls.__module__.startswith("transformers.") else None


def kind(module: nn.Module) -> str | None:
    """``"hf:<attn_implementation>"`` for a transformers-style attention module, else None.

    Recognised by its ``forward`` reading the global ``ALL_ATTENTION_FUNCTIONS`` or ``eager_attention_forward``
    (also true of ``trust_remote_code`` models written in the transformers style). Attention in
    ``_NOT_MODELLED`` gets its reason instead (its calls of the attention function are not reported: the module's
    exit names it, with that reason, in the unseen-attention warning).
    """
    cls = type(module)
    reason = _not_modelled(module)
    if reason is not None:
        return reason
    if not _is_attention_class(cls):
        return None
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    return f"hf:{implementation}" if implementation else "hf"


def _is_transformers_sdpa(fn: object) -> bool:
    return getattr(fn, "__name__", "") == "sdpa_attention_forward" and "transformers" in getattr(fn, "__module__", "")


@contextmanager
def patched(model: nn.Module, session: Session) -> Iterator[None]:
    """Wrap the attention functions the transformers modules of ``model`` may call; restore them on exit."""
    classes = {type(m) for m in model.modules() if _is_attention_class(type(m))}
    with ExitStack() as stack:
        if classes:
            _patch(classes, session, stack)
        yield


def _patch(classes: set[type], session: Session, stack: ExitStack) -> None:
    def join(owner: Any, name: str, make: MakeDispatcher) -> None:
        stack.enter_context(SharedPatch.joined(owner, name, make, session))

    namespaces = {id(g): g for g in (_forward_function(cls).__globals__ for cls in classes)}
    interfaces: dict[int, Any] = {}
    utils = sys.modules.get("transformers.modeling_utils")
    if utils is not None and hasattr(utils, "ALL_ATTENTION_FUNCTIONS"):
        interfaces[id(utils.ALL_ATTENTION_FUNCTIONS)] = utils.ALL_ATTENTION_FUNCTIONS
    for g in namespaces.values():
        if callable(g.get("eager_attention_forward")):
            join(g, "eager_attention_forward", _eager_dispatcher)
        interface = g.get("ALL_ATTENTION_FUNCTIONS")
        if interface is not None and hasattr(interface, "_local_mapping"):
            interfaces[id(interface)] = interface
    mappings = {id(i._local_mapping): i._local_mapping for i in interfaces.values()}
    for interface in interfaces.values():
        mapping = getattr(type(interface), "_global_mapping", None)
        if isinstance(mapping, dict):
            mappings[id(mapping)] = mapping
    for mapping in mappings.values():
        for key, fn in list(mapping.items()):
            if callable(fn):
                join(mapping, key, _sdpa_context_dispatcher if _is_transformers_sdpa(fn) else _registry_dispatcher)
    for cls in classes:
        owner = next((c for c in cls.__mro__ if _REORDER in c.__dict__), None)
        if owner is not None:
            join(owner, _REORDER, _reordered_dispatcher)


class CallLayout(NamedTuple):
    """What a transformers attention module's own call says about its keys (see :func:`call_layout`)."""

    cross: bool | None  #: cross-attention (None: the module does not say; the padding rule decides)
    leading: int | Tensor = 0  #: keys before the queries' own: key ``leading + i`` is query ``i``'s token
    unplaced: str | None = None  #: why its query rows cannot be placed among its keys (then it is not reported)


#: locals of a transformers attention method holding the cache it updated (``curr_cache``: an encoder-decoder's part)
_CACHE_LOCALS = ("curr_cache", "cache", "past_key_values", "past_key_value", "layer_past")


def call_layout(module: nn.Module, query: Tensor, key: Tensor, frame: Any) -> CallLayout:
    """Self- or cross-attention, and where the query rows sit among the keys, as the module's own call says.

    ``frame`` is the caller of the attention function: a method of ``module`` (its ``self``), whose locals say what
    the call is: ``is_cross_attention`` (set by most transformers attention classes from ``key_value_states`` /
    ``encoder_hidden_states``) or those arguments themselves; then the module's own ``is_cross_attention`` /
    ``encoder_decoder_attention`` flag; a causal module (``is_causal``) is self-attention. Nothing said: None.

    Self-attention with more keys than queries holds a cache (earlier tokens, PEFT prefixes): its queries are its
    last keys, which a dynamic cache appends; in a static cache (``StaticLayer``, keys of every position up to
    ``max_cache_len``) they start where the cache was filled to (read on the device). The keys of another cache
    buffer cannot be placed: ``unplaced`` says why.
    """
    local = {} if frame is None else frame.f_locals
    if local.get("self") is not module:
        local = {}
    cross = local.get("is_cross_attention")
    if not isinstance(cross, bool):
        cross = next((local[a] is not None for a in ("key_value_states", "encoder_hidden_states") if a in local), None)
    for flag in ("is_cross_attention", "encoder_decoder_attention"):
        value = getattr(module, flag, None)
        if cross is None and isinstance(value, bool):
            cross = value
    if cross is None and getattr(module, "is_causal", None) is True:
        cross = False
    n_q, n_k = query.shape[-2], key.shape[-2]
    if cross is not False or n_q == n_k:
        return CallLayout(cross)
    layer = _cache_layer(local, module)
    fixed = next((type(c).__name__ for c in map(local.get, _CACHE_LOCALS) if _fixed_size_cache(c)), None)
    if layer is None and fixed is not None:  # a transformers version whose caches have no per-layer objects
        return CallLayout(False, 0, f"its queries cannot be placed in a {fixed} of this transformers version")
    utils = sys.modules.get("transformers.cache_utils")
    static, dynamic = (getattr(utils, c, None) for c in ("StaticLayer", "DynamicLayer"))
    update = getattr(type(layer), "update", None)
    if layer is not None and static is not None and update is static.update and n_k == layer.max_cache_len:
        filled = getattr(layer, "cumulative_length", None)  # after this call's update: its queries, the last written
        if filled is None:  # a transformers version whose static layer does not say how far it is filled
            return CallLayout(False, 0, f"its {type(layer).__name__} cache does not say how far it is filled")
        return CallLayout(False, filled - n_q if isinstance(filled, int) else (filled - n_q).reshape(()))
    buffer = layer is not None and getattr(layer, "keys", None) is key
    if n_k < n_q or (buffer and not (dynamic is not None and isinstance(layer, dynamic))):
        where = f"a {type(layer).__name__} cache" if buffer else f"{n_k} keys for {n_q} queries"
        return CallLayout(False, 0, f"its query rows cannot be placed among its keys ({where})")
    return CallLayout(False, n_k - n_q)


def guarded_layout(module: nn.Module, query: Tensor, key: Tensor, frame: Any) -> CallLayout:
    """:func:`call_layout`, which runs in the model's forward before the attention function: a failure (a cache of
    another transformers version, odd locals) must not reach the forward, so it becomes an unplaced call."""
    try:
        return call_layout(module, query, key, frame)
    except Exception as error:  # monitoring never breaks training
        return CallLayout(None, 0, f"reading its call failed ({error!r})")


def _fixed_size_cache(cache: object) -> bool:
    """Whether ``cache`` is a transformers cache that keeps keys at fixed positions (static, sliding-window, hybrid)
    rather than appending them."""
    name = type(cache).__name__
    return name.endswith("Cache") and any(kind in name for kind in ("Static", "Sliding", "Hybrid"))


def _cache_layer(local: dict, module: nn.Module) -> Any:
    """The cache layer a transformers attention call updated, from its method's locals (None: none found)."""
    index = getattr(module, "layer_idx", None)
    for name in _CACHE_LOCALS:
        cache = local.get(name)
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: the self-attention part
        layers = getattr(cache, "layers", None)
        if isinstance(index, int) and isinstance(layers, list | tuple) and 0 <= index < len(layers):
            return layers[index]
    return None


def _contexts(
    sessions: list[Session], module: nn.Module, query: Tensor, key: Tensor
) -> tuple[list[Session], CallLayout | None]:
    """Tell each session whose model holds ``module`` what the attention function is about to compute (for the
    SDPA call it may make); the sessions told, and the call's layout (None when none was)."""
    told, layout = [], None
    for session in tuple(sessions):
        name = session.name_of(module)
        if name is None or session.busy or in_backward():
            continue
        if layout is None:
            layout = guarded_layout(module, query, key, sys._getframe(2))  # the method that called the function
        session.sdpa_context.append(SdpaContext(name, query.shape, key.shape[-2], *layout))
        told.append(session)
    return told, layout


def _is_transformers_flex(fn: object) -> bool:
    return getattr(fn, "__name__", "") == "flex_attention_forward" and "transformers" in getattr(fn, "__module__", "")


def _flex_score_mask(call: dict, query: Tensor) -> dict:
    """transformers' flex function adds a 4-D tensor mask in its ``score_mod``, head 0's rows for every head
    (``score + mask[b][0][q][kv]``), a boolean one as 1 / 0 (it masks nothing): the call's mask as it adds it."""
    mask = call.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        return call
    mask = mask[:, :1]
    return {**call, "attention_mask": AddedMask(mask) if mask.dtype == torch.bool else mask}


def _interface_dispatcher(registry: bool) -> MakeDispatcher:
    def make(original: Callable, sessions: list[Session]) -> Callable:
        adds_mask = _is_transformers_flex(original)

        @functools.wraps(original)
        def wrapper(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
            told, layout = _contexts(sessions, module, query, key)
            before = [(session, session.reports) for session in told]
            try:
                out = original(module, query, key, value, *args, **kwargs)
            finally:
                for session in told:
                    session.sdpa_context.pop()
            call = bind(_INTERFACE_ARGS, args, kwargs)
            if adds_mask and before:
                call = _flex_score_mask(call, query)
            for session, reports in before:
                if session.reports == reports:  # the function reported nothing itself (did not reach SDPA)
                    _report(session, module, query, key, call, registry, layout)
            return out

        return wrapper

    return make


_eager_dispatcher, _registry_dispatcher = _interface_dispatcher(False), _interface_dispatcher(True)


def _sdpa_context_dispatcher(original: Callable, sessions: list[Session]) -> Callable:
    """transformers' own SDPA function: reported by the SDPA wrapper, told here what the module's call is (it packs
    grouped query heads of a one-token query; the call's self / cross and cache layout)."""

    @functools.wraps(original)
    def wrapper(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        told, _ = _contexts(sessions, module, query, key)
        try:
            return original(module, query, key, value, *args, **kwargs)
        finally:
            for session in told:
                session.sdpa_context.pop()

    return wrapper


def _reordered_dispatcher(original: Callable, sessions: list[Session]) -> Callable:
    @functools.wraps(original)
    def wrapper(self: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None):
        out = original(self, query, key, value, attention_mask)
        watching = [s for s in tuple(sessions) if s.name_of(self) is not None and not s.busy]
        if watching and not in_backward():  # nothing for a module no session watches, or under torch.compile
            call = {"attention_mask": attention_mask, "scaling": getattr(self, "scaling", None)}
            layout = guarded_layout(self, query, key, sys._getframe(1))
            for session in watching:
                _report(session, self, query, key, call, False, layout)
        return out

    return wrapper


def _report(
    session: Session,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    call: dict,
    registry: bool,
    layout: CallLayout | None = None,
) -> None:
    """Report one attention-function call to ``session`` if ``module`` belongs to its model (``layout``: what the
    module's call says, :func:`call_layout`; None: nothing, the padding rule decides)."""
    layout = CallLayout(None) if layout is None else layout
    name = session.name_of(module)
    if name is None or session.busy or in_backward() or _not_modelled(module) is not None:
        return  # not modelled: left unseen, so that the module's exit names it with its reason
    session.reports += 1
    reason = next((why for arg, why in _UNMODELLED.items() if call.get(arg) is not None), None)
    if reason is None:
        reason = _unknown_score_term(query, key, call, registry)
    if reason is not None:
        session.warn_once(name, f"geomon: attention of {name!r} uses {reason}, which attention entropy "
                                "does not model; it is not reported")  # fmt: skip
    elif layout.unplaced is not None:
        session.warn_once(f"unplaced:{name}", f"geomon: attention of {name!r} is not reported: {layout.unplaced}")
    else:
        found = lambda: _found(module, query, key, call, registry, layout)  # noqa: E731
        padded = session.window_rows(module)  # the window tokens its block padded the map with (Swin)
        session.guarded(name, lambda: session.report_found(name, found(), padded))


def _unknown_score_term(query: Tensor, key: Tensor, call: dict, registry: bool) -> str | None:
    """Why a call cannot be reported exactly: a tensor argument shaped like the scores that geomon does not model."""
    known = set(_INTERFACE_ARGS) | (set() if registry else set(_ADDITIVE))
    n_q, n_k = query.shape[-2], key.shape[-2]
    for arg, value in call.items():
        if arg in known or not isinstance(value, Tensor) or value.dim() < 3:
            continue
        if value.shape[-2] in (1, n_q) and value.shape[-1] in (1, n_k) and value.shape[-2:] != (1, 1):
            return f"an argument {arg!r} shaped like the attention scores {tuple(value.shape)}"
    return None


def _additive(mask: Tensor | None, terms: list[Tensor], dtype: torch.dtype) -> Tensor | None:
    """``mask`` (boolean or additive) plus the additive ``terms``, as one additive mask."""
    if not terms:
        return mask
    total = terms[0].to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    for term in terms[1:]:
        total = total + term
    if mask is None:
        return total
    if mask.dtype == torch.bool:
        return total.masked_fill(~mask, -math.inf)
    return total + mask


def _found(
    module: nn.Module, query: Tensor, key: Tensor, call: dict, registry: bool, layout: CallLayout
) -> list[Found]:
    mask = call.get("attention_mask")
    scale = call.get("scaling")
    scale = None if scale is None else float(scale)
    if not registry:  # eager: the mask and the position bias are exactly what is added to the scores
        if mask is not None and mask.shape[-1] != key.shape[-2]:
            mask = mask[..., : key.shape[-2]]
        added = None
        if mask is not None and mask.dtype == torch.bool:  # a 4-D boolean mask passed by the user: added as 1 / 0
            mask, added = None, AddedMask(mask)
        terms = [call[arg] for arg in _ADDITIVE if isinstance(call.get(arg), Tensor)]
        mask = _additive(mask, terms, query.dtype)
        return [Found("", query, key, mask, False, scale, layout.cross, added, leading=layout.leading)]
    converted = interface_mask(module, query, key, mask, call)
    return [Found("", query, key, converted.attn_mask, converted.is_causal, scale, layout.cross, converted.pattern,
                  converted.dropped, layout.leading)]  # fmt: skip


#: flash's varlen arguments, all four given: ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` makes them
_VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _packed_sequences(kwargs: dict, n: int) -> tuple[Tensor, Tensor] | None:
    """``(segments, outside)`` of the ``n`` tokens of a packed row (batch 1, no mask) as transformers' flash call
    finds them: from ``cu_seq_lens_q`` when the call has all of flash's varlen arguments (they win over
    ``position_ids``), else a sequence starting wherever ``position_ids`` is at its minimum (0, or 1 for positions
    counted from 1), as ``prepare_fa_kwargs_from_position_ids`` cuts them; ``outside [1, n]``: the tokens in no
    sequence, which flash never computes (before the first start, or past ``cu_seq_lens_q[-1]``); None when the call
    has neither. On the device, no host sync."""
    if all(kwargs.get(arg) is not None for arg in _VARLEN):
        bounds = kwargs["cu_seq_lens_q"].reshape(-1)
        index = torch.arange(n, device=bounds.device, dtype=bounds.dtype)
        outside = (index < bounds[0]) | (index >= bounds[-1])
        return torch.bucketize(index, bounds[1:], right=True), outside[None]
    positions = kwargs.get("position_ids")
    if positions is None:
        return None
    positions = positions.reshape(-1)[-n:]
    starts = positions == positions.min()
    segments = torch.cumsum(starts, dim=0)
    return segments, (segments == 0)[None]  # before the first start: in no sequence


class InterfaceMask(NamedTuple):
    """The mask of an attention-interface call in SDPA semantics, in parts that are never ``Nq x Nk`` tensors."""

    attn_mask: Tensor | None  #: the model's 4-D mask by reference, or flash's padding as a ``[B, 1, 1, Nk]`` view
    is_causal: bool  #: SDPA's top-left causal flag (exact when ``Nq == Nk``)
    pattern: AlignedRule | FlexRule | None = None  #: bottom-right causal, sliding window, packed sequences, flex
    dropped: Tensor | None = None  #: ``[B, Nq]`` padded query tokens, which flash drops


def interface_mask(module: nn.Module, query: Tensor, key: Tensor, mask: Any, kwargs: dict) -> InterfaceMask:
    """The mask an attention-interface function received, in SDPA semantics (see :class:`InterfaceMask`).

    Example:
        >>> import torch
        >>> module = torch.nn.Module(); module.is_causal = True
        >>> q, k = torch.zeros(2, 4, 3, 8), torch.zeros(2, 2, 5, 8)   # 3 new queries over 5 keys
        >>> padding = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # flash's 2-D mask: 1 = token
        >>> mask = interface_mask(module, q, k, padding, {})
        >>> mask.attn_mask.shape, mask.is_causal, mask.pattern(torch.arange(3), 0, 5).int().tolist()
        (torch.Size([2, 1, 1, 5]), False, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    """
    batch, n_q, n_k = query.shape[0], query.shape[-2], key.shape[-2]
    if hasattr(mask, "mask_mod") and not isinstance(mask, Tensor):  # flex's BlockMask
        return InterfaceMask(None, False, FlexRule(mask, batch, query.shape[1], n_q, n_k))
    if isinstance(mask, AddedMask):  # a boolean 4-D mask transformers' flex function adds (_flex_score_mask)
        return InterfaceMask(None, False, mask)
    if isinstance(mask, Tensor) and mask.dim() == 4:
        return InterfaceMask(mask[..., :n_k] if mask.shape[-1] > n_k else mask, False)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    window = kwargs.get("sliding_window")
    keys = dropped = segments = None
    if isinstance(mask, Tensor):  # [B, Nk] padding, 1 = token; flash also drops the padded queries
        if mask.dim() != 2 or mask.shape[-1] != n_k:
            raise ValueError(f"cannot read an attention mask of shape {tuple(mask.shape)} for {n_k} keys")
        tokens = mask.bool()
        keys, dropped = tokens[:, None, None, :], ~tokens[:, n_k - n_q :]
    elif mask is None and batch == 1 and n_q == n_k:
        packed = _packed_sequences(kwargs, n_q)
        if packed is not None:
            segments, dropped = packed
    elif mask is None and all(kwargs.get(arg) is not None for arg in _VARLEN):
        raise ValueError(f"flash's varlen arguments (cu_seq_lens_q/k) over a batch of {batch} rows pack sequences "
                         "across rows, which geomon does not read; not reported")  # fmt: skip
    if segments is None and window is None and (not causal or (n_q == n_k and keys is None)):
        return InterfaceMask(keys, causal, None, dropped)  # SDPA's own causal flag (top-left) is exact when Nq == Nk
    rule = AlignedRule(n_q, n_k, causal, None if window is None else int(window), segments)
    return InterfaceMask(keys, False, rule, dropped)
