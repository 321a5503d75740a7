"""The machinery every attention source shares: which module of the model is running, what was already reported.

A :class:`Session` lives for one ``with`` block. It keeps

- the stack of the model's modules that are running, from *global* module hooks
  (torch's global forward pre-hook and forward hook dictionaries; one pair, under fixed keys, for all active
  sessions, so that every measured step installs the same hooks and a compiled model that traced them is not compiled
  again). Global hooks leave every module's own hook dictionaries empty, so code that changes path when hooks are
  present (the fused inference path of ``nn.TransformerEncoderLayer`` checks ``m._forward_hooks``) runs exactly as
  without geomon;
- a counter of reported attention computations. Every source reports through :meth:`Session.report`; a module-level
  fallback (an adapter that recomputes Q/K from the module's weights) runs at the module's exit only when nothing
  was reported while the module ran, and a function wrapper (Hugging Face) only when the wrapped call reported
  nothing itself. That is the whole of the exactly-once rule: the innermost source that saw the computation wins;
- the guard: a failure inside a probe becomes a warning naming the module (``strict=True`` raises).

Functions geomon replaces (``F.scaled_dot_product_attention``, transformers' attention functions) are replaced once
for all the sessions active at a time, by a :class:`SharedPatch`: the first session to need one installs a
dispatcher that notifies every active session (each reports only the calls made inside its own model), and the
last session to leave restores the original, whatever order the blocks exit in (two monitors, nested blocks,
exceptions). If something else replaced the function meanwhile, it is left in place and geomon's dispatcher, which
it may still call, passes calls straight through once no session remains.

Nothing is reported while autograd runs a backward pass (a checkpointed block recomputing its forward), so one
forward pass is reported once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from geomon.capture._batch_dims import fold_batch_dims
from geomon.capture._padding import MASKED_AT, PaddingRule, crossed
from geomon.capture._patterns import MaskPattern
from geomon.capture._projections import ChildOutputs
from geomon.capture.modules import head_count


@dataclass(frozen=True)
class AttentionCall:
    """One attention computation's inputs, detached, in ``scaled_dot_product_attention``'s conventions."""

    module: str  #: name of the attention module in ``model.named_modules()`` ("" for the model itself)
    q: Tensor  #: [B, H, Nq, Dh]
    k: Tensor  #: [B, Hk, Nk, Dh], Hk dividing H (query head h reads key head h // (H / Hk))
    attn_mask: Tensor | None  #: SDPA semantics: boolean True = may attend, floating = added to the scores
    is_causal: bool  #: SDPA's top-left causal mask
    scale: float | None  #: softmax scale; None = 1/sqrt(Dh)
    #: [B, Nq] boolean, True = a padded query row, left out of every mean (None: no row is)
    query_padding: Tensor | None = None
    #: additive ``attn_mask`` entries at or below this block their key (the padding rule: -1e4); None: -inf only
    masked_at: float | None = None
    #: the part of the mask generated per key chunk, ANDed with ``attn_mask`` (bottom-right causal, sliding window,
    #: packed sequences, ``nn.MultiheadAttention``'s own masks); see :mod:`geomon.capture._patterns`
    pattern: MaskPattern | None = None

    def mask_arguments(self) -> dict[str, Any]:
        """The keyword arguments that give :func:`geomon.functional.attention_entropy` this call's mask."""
        return {
            "is_causal": self.is_causal,
            "attn_mask": self.attn_mask,
            "_masked_at": self.masked_at,
            "_query_padding": self.query_padding,
            "_pattern": self.pattern,
        }


@dataclass
class ScoresCall:
    """Attention a module wrote by hand, read at its own softmax (see :mod:`geomon.capture.softmax`): the rows of
    the scores ``[B, H, Nq, Nk]`` it passed, already reduced (nothing of size ``Nq x Nk`` is kept)."""

    module: str  #: name of the attention module in ``model.named_modules()``
    entropy: Tensor  #: [B, H, Nq] nats, NaN for a row with no allowed key or a padded query row
    max_logit: Tensor  #: [B, H, Nq]
    n_keys: Tensor  #: [B, H, Nq] allowed keys of each row (0 for the rows above)
    #: 0-dim: the highest logit of every row read, padded ones included (left out of the values above)
    peak: Tensor | None = None


class Found(NamedTuple):
    """Q/K that an adapter recovered, to be reported under the module's name plus ``suffix``."""

    suffix: str
    q: Tensor
    k: Tensor
    attn_mask: Tensor | None = None
    is_causal: bool = False
    scale: float | None = None
    cross: bool | Tensor | None = None  #: cross-attention (None: the padding rule decides; 0-dim tensor: on device)
    pattern: MaskPattern | None = None  #: mask generated per key chunk, ANDed with ``attn_mask``
    dropped: Tensor | None = None  #: [B, Nq] query rows the implementation drops (flash, nested tensors)
    leading: int | Tensor = 0  #: keys before the tokens' own (a cache of earlier tokens): key ``leading + j`` is ``j``


class SoftmaxStream(NamedTuple):
    """One of the softmaxes a class of attention written by hand takes per call, in order, read at the softmax with
    a layout known by class (:mod:`geomon.capture.hf_softmax`): where its scores hold the heads, which of its query
    rows are tokens, and under which name its rows are reported."""

    suffix: str  #: its rows are reported under the module's name plus this ("": the module's own)
    head_axis: int  #: the heads' dimension of the scores it takes (another one may have their size)
    #: its keys begin with this many blocks of ``Nq`` keys around the queries' own (LongT5: 3): a query row none of
    #: whose first ``local_blocks · Nq`` keys any head may attend to is no token's (None: the padding rule decides)
    local_blocks: int | None = None
    #: its query rows are the positions of the call's first softmax (a main stream), in each of its other leading
    #: dimensions (predicting streams): left out where the padding rule left those out
    main_rows: bool = False


class SdpaContext(NamedTuple):
    """What a function that may call SDPA for a module (transformers' attention functions) knew about the call: SDPA
    itself sees only tensors, which the function may have reshaped (transformers packs grouped query heads)."""

    name: str  #: the module's name
    query_shape: torch.Size  #: the module's query ``[B, H, Nq, Dh]`` as the function received it
    key_length: int  #: its keys, before the function sliced any
    cross: bool | None  #: cross-attention, as the module says (None: unknown, the padding rule decides)
    leading: int | Tensor  #: keys before the queries' own (self-attention with a cache)
    unplaced: str | None = None  #: why its query rows cannot be placed among its keys: not reported


#: ``fallback(module, args, kwargs, output) -> computations``; called at the module's exit, under ``no_grad``.
Fallback = Callable[[nn.Module, tuple, dict, Any], Sequence[Found]]

#: a windowed attention class's entry saying that its padding rows are its enclosing block's, placed at the block's
#: entry from its map size and window (see :attr:`Session.window_blocks`)
FROM_BLOCK = "block"


def in_backward() -> bool:
    """True where geomon's hooks must do nothing: while the autograd engine runs a backward pass (a checkpointed
    forward being recomputed); while ``torch.compile`` traces the forward (the model called inside a compiled
    function: anything a hook did would be compiled into the graph and change it, hence the training); and inside a
    ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...: its tensors are wrappers that must not leave it,
    and a state holding one breaks every later compute and checkpoint). The latter two are recorded for
    :func:`traced_since` to report."""
    if torch.compiler.is_compiling():
        _TRACED[0] = "compile"  # torch.compile replays this store each time the compiled code runs
        return True
    if _functorch_level() is not None:
        _TRACED[0] = "transform"
        return True
    return torch._C._current_graph_task_id() != -1


def _functorch_level() -> int | None:
    """The innermost ``torch.func`` transform's level, ``None`` outside any."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return None if level is None else level()


_TRACED: list[Literal["compile", "transform"] | None] = [None]


def traced_since() -> Literal["compile", "transform"] | None:
    """What a hook found itself inside since the last call (which resets it): ``torch.compile``, a ``torch.func``
    transform, or nothing."""
    traced, _TRACED[0] = _TRACED[0], None
    return traced


class Session:
    """State of one capture block over ``model``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        on_attention: Callable[[AttentionCall], None],
        strict: bool,
        warn: Callable[[str, str], None] | None = None,
        on_scores: Callable[[ScoresCall], None] | None = None,
        score_rows: Callable[[int, int, int], int | None] | None = None,
    ) -> None:
        self.warn = warn  # warn(tag, message): a caller's warn-once across blocks; default: once per block
        self.model = model
        self.names = {id(module): name for name, module in model.named_modules()}
        self.on_attention = on_attention
        self.strict = strict
        self.stack: list[tuple[int, str, int]] = []  # (id(module), name, reports when it started)
        self.reports = 0
        self.fallbacks: dict[int, Fallback] = {}
        self.child_outputs = ChildOutputs()  # what the fallbacks' projections returned in the call they report
        self.expected: dict[int, str] = {}  # attention modules (id -> kind): warn if one runs and nothing is seen
        self.lookalikes: set[int] = set()  # modules that look like attention: warn if one runs and nothing is seen
        self.unseen = 0  # modules found unseen so far: an enclosing look-alike is not named again
        #: (category, kind or class) -> modules that ran with no value, said after the block: attention not seen
        #: ("expected", "lookalike"), or read at softmaxes that are not one attention ("softmax-dims", "softmaxes")
        self.unseen_names: dict[tuple[str, str], list[str]] = {}
        self.softmax_counts: dict[str, set[int]] = {}  # class -> how many softmaxes its "softmaxes" modules took
        self.warned: set[str] = set()
        self.busy = False  # geomon's own computation is running: ignore module calls and SDPA calls
        self.padding = PaddingRule()
        self.notes: dict[str, str] = {}  # modules by name whose values mean something particular: said once
        self.cross_hint: dict[str, bool | Tensor] = {}  # nn.MultiheadAttention by name: query and key not one sequence
        #: modules whose SDPA calls put extra keys first, by name: (cross-attention or not, how many extra keys)
        self.sdpa_layout: dict[str, tuple[bool | None, int]] = {}
        self.sdpa_context: list[SdpaContext] = []  # transformers' attention functions running now, innermost last
        self.calls_in_forward: dict[str, int] = {}  # reports per module name in the model's running forward
        self.on_scores = on_scores  # receives attention read at a module's own softmax (None: not read there)
        self.score_rows = score_rows  # (Nq, Nk, heads) -> query rows to read there (None: all)
        #: rows read at softmax calls, by the stack depth of the module call they belong to (resolved at its exit);
        #: None for a softmax over another dimension of a [batch, heads, ...] tensor, a string for scores in which
        #: the module's heads cannot be placed (what the warning says of them): such a call is not reported
        self.softmax_rows: dict[int, list[ScoresCall | str | None]] = {}
        self.softmax_layouts: dict[str, str] = {}  # class -> the first unplaceable layout of its "layout" modules
        #: head counts of modules that declare none in their attributes, by name (timm's single-head attention)
        self.declared_heads: dict[str, int] = {}
        #: component softmaxes per head of modules that compute several by design, by name (timm's differential
        #: attention: 2, one attention call each): that many calls per forward are one computation, not a repeat
        self.components: dict[str, int] = {}
        #: modules whose softmax scores have their heads folded into the first dimension whatever their rank,
        #: batch-major (timm's HaloAttn: [B·H, blocks, Nq, Nk])
        self.folded_heads: set[str] = set()
        #: modules whose call takes several softmaxes, or one whose heads' place its shape cannot say, read with
        #: layouts known by class, by name (LongT5's local attention, ProphetNet's n-gram self-attention)
        self.softmax_streams: dict[str, tuple[SoftmaxStream, ...]] = {}
        #: windowed attention over a map padded to whole windows (timm's Swin, DaViT, TinyViT, SAM, Twins;
        #: transformers' Swin, VitDet, SAM), by id: ``rows(module, args, kwargs) -> [windows, N]`` True at the window
        #: tokens that are padding (None: none), worked out at the module's entry from sizes, on the device; or
        #: :data:`FROM_BLOCK`: the rows its enclosing block placed (:attr:`window_blocks`)
        self.window_padding: dict[int, Callable[[nn.Module, tuple, dict], Tensor | None] | str] = {}
        #: the blocks that pad their map for such attention, by id: ``rows(block, args, kwargs)``, the padding rows of
        #: the windows they cut, from their map size and window at their entry
        self.window_blocks: dict[int, Callable[[nn.Module, tuple, dict], Tensor | None]] = {}
        #: those rows of the running blocks (None: the block does not pad this call), by stack depth
        self.block_windows: dict[int, Tensor | None] = {}
        #: the rows of the running attention modules, by stack depth: left out of whatever attention they report
        self.padded_windows: dict[int, Tensor] = {}

    def module(self, name: str) -> nn.Module:
        """The watched model's module of that name."""
        return self.model.get_submodule(name)

    def head_count(self, name: str) -> int | None:
        """Query heads of the module of that name: what an adapter declared for it, else its attributes."""
        return self.declared_heads.get(name) or head_count(self.module(name))

    def name_of(self, module: object) -> str | None:
        """The module's name in the watched model, None for modules outside it."""
        return self.names.get(id(module))

    def current(self) -> str | None:
        """Name of the innermost running module of the model, None when none runs (or geomon itself computes)."""
        if not self.stack or self.busy or in_backward():
            return None
        return self.stack[-1][1]

    def report(
        self,
        name: str,
        q: Tensor,
        k: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
        cross: bool | Tensor | None = None,
        pattern: MaskPattern | None = None,
        dropped: Tensor | None = None,
        leading: int | Tensor = 0,
    ) -> None:
        """Hand one computation to the callback, detached, its padded query rows named (call inside
        :meth:`guarded`); the mask is passed on as it is, never copied. ``leading`` extra keys come before the
        tokens' own (key ``leading + j`` is token ``j``)."""
        self.reports += 1
        self._count_call(name)
        self._say_note(name)
        if cross is None:
            cross = self.cross_hint.get(name)
        with torch.no_grad():
            mask = None if attn_mask is None else attn_mask.detach()
            padding = self.padding.apply(q, k, mask, cross, name, dropped, pattern, leading)
            call = AttentionCall(
                name, q.detach(), k.detach(), mask, bool(is_causal), scale, padding, MASKED_AT, pattern
            )  # fmt: skip
            self.on_attention(call)

    def _say_note(self, name: str) -> None:
        """Say once what a reported module's values mean where that is not plain (:attr:`notes`)."""
        note = self.notes.get(name)
        if note is not None:
            self.warn_once(f"note:{name}", f"geomon: {name!r} is {note}")

    def _count_call(self, name: str) -> None:
        """Say once when a module computes attention again within one forward of the model: a layer shared across
        depths (ALBERT's one layer group run ``num_hidden_layers`` times) is logged under one name, its depths
        pooled, with nothing else to tell the user that the model's twelve layers are one key."""
        count = self.calls_in_forward.get(name, 0) + 1
        self.calls_in_forward[name] = count
        if count == self.components.get(name, 1) + 1:
            self.warn_once(f"repeated:{name}", f"geomon: attention module {name!r} computed attention more than once "
                           "in one forward of the model (a layer shared across depths, as in ALBERT, or a module "
                           "called twice): its entropy and max logit pool every call under that one name, not one "
                           "value per depth")  # fmt: skip

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        """Run a probe under ``no_grad``, turning its failure into a warning (``strict``: raising)."""
        busy, self.busy = self.busy, True
        try:
            with torch.no_grad():
                fn()
        except Exception as error:  # monitoring must never break training
            if self.strict:
                raise
            warnings.warn(f"geomon: attention capture in {name!r} failed: {error!r}", stacklevel=3)
        finally:
            self.busy = busy

    def report_found(self, name: str, found: Sequence[Found], padded: Tensor | None = None) -> None:
        """Report what an adapter found; ``padded``: the module's window padding rows (:attr:`padded_windows`),
        left out of each computation whose query rows they fit."""
        for item in found:
            dropped = item.dropped
            fits = padded is not None and padded.shape == (item.q.shape[0], item.q.shape[-2])
            if fits:
                dropped = padded if dropped is None else dropped | padded
            self.report(
                name + item.suffix,
                item.q,
                item.k,
                item.attn_mask,
                item.is_causal,
                item.scale,
                item.cross,
                item.pattern,
                dropped,
                item.leading,
            )

    def warn_once(self, key: str, message: str) -> None:
        if self.warn is not None:
            self.warn(f"capture:{key}", message)
        elif key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- global module hooks ------------------------------------------------------------------------------------

    def _enter(self, module: nn.Module, args: tuple) -> None:
        name = self.names.get(id(module))
        if name is not None and not self.busy and not in_backward():
            self.stack.append((id(module), name, self.reports + self.unseen))
            if isinstance(module, nn.MultiheadAttention) and len(args) >= 2:
                self.cross_hint[name] = crossed(args[0], args[1])

    def _note_window_padding(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the entry of a listed windowed attention module (its own pre-hook, after :meth:`_enter` pushed it, with
        the call's keywords: transformers' SAM passes ``hidden_states=``), note its window padding rows: worked out
        from its call, or those its enclosing block placed (:data:`FROM_BLOCK`)."""
        if not self.stack or self.stack[-1][0] != id(module) or self.busy or in_backward():
            return  # not tracked (geomon's own computation, a backward pass)
        rows, depth, name = self.window_padding[id(module)], len(self.stack) - 1, self.stack[-1][1]
        if isinstance(rows, str):  # FROM_BLOCK: outside a listed block (a caller of its own), none are placed
            block = next((d for d in range(depth - 1, -1, -1) if d in self.block_windows), None)
            if block is not None and self.block_windows[block] is not None:
                self.padded_windows[depth] = self.block_windows[block]
            return
        self.guarded(name, lambda: self._note_padded_windows(depth, rows(module, args, kwargs)))

    def _note_block_windows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the entry of a listed block that pads its map to whole windows (its own pre-hook, after :meth:`_enter`
        pushed it), note the padding rows of the windows it cuts (None: it does not pad this call), for the windowed
        attention it runs (:meth:`_note_window_padding`)."""
        if not self.stack or self.stack[-1][0] != id(module) or self.busy or in_backward():
            return
        rows, depth, name = self.window_blocks[id(module)], len(self.stack) - 1, self.stack[-1][1]
        self.block_windows[depth] = None  # noted even if placing them fails: no outer block's rows stand in
        self.guarded(name, lambda: self.block_windows.__setitem__(depth, rows(module, args, kwargs)))

    def _note_padded_windows(self, depth: int, rows: Tensor | None) -> None:
        if rows is not None:
            self.padded_windows[depth] = rows

    def window_rows(self, module: nn.Module) -> Tensor | None:
        """The window padding rows noted at the entry of ``module``, running (None: none noted)."""
        depth = next((i for i in range(len(self.stack) - 1, -1, -1) if self.stack[i][0] == id(module)), None)
        return None if depth is None else self.padded_windows.get(depth)

    def padded_rows(self, depth: int, batch: int, n_q: int) -> Tensor | None:
        """The window padding rows ``[batch, n_q]`` of the module running at ``depth`` (None: it has none, or none
        of that shape: a call that is not over its windows)."""
        rows = self.padded_windows.get(depth)
        return rows if rows is not None and rows.shape == (batch, n_q) else None

    def _leave(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        # torch passes (kwargs, output) after a forward, and (output,) alone when the forward raised
        key = id(module)
        name = self.names.get(key)
        if name is None or self.busy or in_backward():
            return
        depth = next((i for i in range(len(self.stack) - 1, -1, -1) if self.stack[i][0] == key), None)
        if depth is None:
            return
        before = self.stack[depth][2]
        del self.stack[depth:]  # with any module whose exit was missed
        padded = self.padded_windows.pop(depth, None)
        if self.padded_windows:
            self.padded_windows = {d: rows for d, rows in self.padded_windows.items() if d < depth}
        if self.block_windows:
            self.block_windows = {d: rows for d, rows in self.block_windows.items() if d < depth}
        read: list[ScoresCall | str | None] = []
        if self.softmax_rows:  # rows read at softmax calls: this call's, and none of a deeper call left behind
            read = self.softmax_rows.pop(depth, [])
            self.softmax_rows = {d: rows for d, rows in self.softmax_rows.items() if d < depth}
        if not self.stack:  # the model's forward ended: the next one counts its calls afresh
            self.calls_in_forward.clear()
        if len(rest) == 2:  # a projection a fallback may read back (see _projections)
            self.child_outputs.record(key, args, *rest, stack=self.stack)
        if len(rest) != 2 or self.reports + self.unseen != before:
            self.child_outputs.forget(key)
            return  # the forward raised, or its attention was already seen (or found unseen) inside
        kwargs, output = rest
        fallback = self.fallbacks.get(key)
        if fallback is not None:
            self.reports += 1  # handled, even if the fallback fails: no outer module reports it again
            with self.child_outputs.during(key):
                self.guarded(name, lambda: self.report_found(name, fallback(module, args, kwargs, output), padded))
        elif read:
            self._report_softmax(module, name, read)
        elif key in self.expected:
            self.unseen += 1
            self.unseen_names.setdefault(("expected", self.expected[key]), []).append(name)
        elif key in self.lookalikes:
            self.unseen += 1
            self.unseen_names.setdefault(("lookalike", type(module).__name__), []).append(name)

    def _report_softmax(self, module: nn.Module, name: str, read: list[ScoresCall | str | None]) -> None:
        """Attention seen only at the module's own softmax: reported when it was one softmax over its last
        dimension, or no more than the streams its class is known to take (:attr:`softmax_streams`), each under its
        own name; otherwise the module is named, with the others of its class, after the block
        (:meth:`say_unseen`)."""
        self.reports += 1
        label = type(module).__name__
        layouts = [entry for entry in read if isinstance(entry, str)]
        if layouts:
            self.unseen_names.setdefault(("layout", label), []).append(name)
            self.softmax_layouts.setdefault(label, layouts[0])
            return
        if None in read:
            self.unseen_names.setdefault(("softmax-dims", label), []).append(name)
            return
        known = len(self.softmax_streams.get(name, ())) or 1  # softmaxes per call: one, unless its class is listed
        if len(read) > known:  # more than that: what are they?
            self.unseen_names.setdefault(("softmaxes", label), []).append(name)
            self.softmax_counts.setdefault(label, set()).add(len(read))
            return
        on_scores = self.on_scores
        assert on_scores is not None
        for call in read:  # one, or one per stream its class is known to take (each under its own name)
            assert isinstance(call, ScoresCall)
            self._count_call(call.module)
            self._say_note(call.module)
            self.guarded(call.module, functools.partial(on_scores, call))

    def say_unseen(self) -> None:
        """After the block: one warning per kind of module that ran unseen, naming those modules (a model's twelve
        layers of one class make one warning, not twelve)."""
        for (category, label), names in self.unseen_names.items():
            unique = list(dict.fromkeys(names))
            shown = ", ".join(repr(n) for n in unique[:4]) + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")
            modules = f"geomon: {len(unique)} module(s) of class {label} ({shown})"
            if category == "layout":
                layout = self.softmax_layouts.pop(label, "")
                self.warn_once(f"layout:{label}", f"{modules} take a softmax over scores {layout}: which of those "
                               "holds the heads cannot be told, so their attention is not reported for such inputs "
                               "(the layout can depend on the input's length)")  # fmt: skip
            elif category == "softmax-dims":
                self.warn_once(f"softmax-dims:{label}", f"{modules} take a softmax over a dimension other than the "
                               "last of a [batch, heads, ...] tensor, as linear attention normalises its queries and "
                               "keys: it is not softmax attention over [queries, keys], so their attention is not "
                               "reported")  # fmt: skip
            elif category == "softmaxes":
                count = " or ".join(str(c) for c in sorted(self.softmax_counts.pop(label, ())))
                self.warn_once(f"softmaxes:{label}", f"{modules} take {count} softmaxes over [batch, heads, "
                               "queries, keys] scores in one call, which geomon cannot tell apart (a mix of attention "
                               "maps, or a softmax that is not attention): their attention is not "
                               "reported")  # fmt: skip
            elif category == "expected":
                self.warn_once(f"unseen:{label}", f"geomon: attention modules ({label}) ran but their attention "
                               f"was not seen: {shown}; see docs/guides/capture.md for what each implementation "
                               "exposes")  # fmt: skip
            else:
                self.warn_once(
                    f"lookalike:{label}",
                    f"{modules} look like attention but no attention computation was seen inside them, so they "
                    "have no attention entropy; geomon sees softmax "
                    "attention computed with F.scaled_dot_product_attention (called at run time), one of the "
                    "implementations in docs/guides/capture.md#not-seen-and-why, or (under the monitor) one softmax "
                    "over [batch, heads, queries, keys] (or [batch·heads, queries, keys]) scores whose heads the "
                    "module declares (num_heads, heads, ...). If it is softmax attention, compute it so; if it is "
                    "not (linear attention, a pooling), ignore this warning",
                )
        self.unseen_names.clear()

    @contextmanager
    def module_hooks(self) -> Iterator[None]:
        """Track the running modules of the model with global hooks, removed however the block exits (shared by
        the active sessions: see :func:`_global_hooks_joined`)."""
        _HOOK_SESSIONS.append(self)
        if len(_HOOK_SESSIONS) == 1:
            _install_global_hooks()
        try:
            yield
        finally:
            _HOOK_SESSIONS.remove(self)
            if not _HOOK_SESSIONS:
                _remove_global_hooks()

    @contextmanager
    def window_hooks(self) -> Iterator[None]:
        """A pre-hook (with the call's keywords) on each listed windowed attention module (:attr:`window_padding`)
        and on each block that pads a map for one (:attr:`window_blocks`), run after the global one that tracks it;
        removed however the block exits."""
        tables = ((self.window_padding, self._note_window_padding), (self.window_blocks, self._note_block_windows))
        handles = [
            module.register_forward_pre_hook(hook, with_kwargs=True)
            for module in self.model.modules()
            for table, hook in tables
            if id(module) in table
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- F.scaled_dot_product_attention -------------------------------------------------------------------------

    @contextmanager
    def sdpa_wrapped(self) -> Iterator[None]:
        """Report every call of ``F.scaled_dot_product_attention`` made inside the model, after it ran."""
        with SharedPatch.joined(F, "scaled_dot_product_attention", _sdpa_dispatcher, self):
            yield


#: ``make(original, sessions) -> dispatcher``: calls ``original`` once, then lets each of ``sessions`` (the live list
#: of the active sessions) report the call.
MakeDispatcher = Callable[[Callable, list[Session]], Callable]


class SharedPatch:
    """One attribute (a module global, a mapping entry, a class attribute) replaced for all active sessions.

    ``owner`` is a dict (entries) or any other object (its own ``__dict__`` attribute). Patches are keyed by
    ``(id(owner), name)``; each holds its owner, so the id cannot be reused while it is installed.
    """

    def __init__(self, owner: Any, name: str, make: MakeDispatcher) -> None:
        self.owner, self.name = owner, name
        #: a class's method it inherits (``torch.Tensor.softmax`` is ``TensorBase``'s): patched on the class itself,
        #: and on leaving deleted there again, so that the inherited one shows through as before
        self.inherited = not isinstance(owner, dict) and name not in vars(owner)
        self.original = getattr(owner, name) if self.inherited else self._get()
        made = _DISPATCHERS.get((id(owner), name))
        same = made is not None and all(a is b for a, b in zip(made[:3], (owner, self.original, make), strict=True))
        if made is None or not same or made[3]:  # made for something else, or its session list is in use: a new one
            sessions: list[Session] = []
            dispatcher = make(self.original, sessions)
            made = _DISPATCHERS[(id(owner), name)] = (owner, self.original, make, sessions, dispatcher)
        self.sessions: list[Session] = made[3]  # the one the dispatcher reads (empty while none is installed)
        self.dispatcher = made[4]
        self._set(self.dispatcher)

    def _get(self) -> Any:
        return (self.owner if isinstance(self.owner, dict) else vars(self.owner)).get(self.name)

    def _set(self, value: Any) -> None:
        if isinstance(self.owner, dict):
            self.owner[self.name] = value
        else:
            setattr(self.owner, self.name, value)

    @classmethod
    def join(cls, owner: Any, name: str, make: MakeDispatcher, session: Session) -> SharedPatch:
        """Add ``session`` to the patch of ``owner.name``, installing one (over whatever is there now) if needed."""
        key = (id(owner), name)
        patch = _INSTALLED.get(key)
        if patch is None or patch._get() is not patch.dispatcher:  # none, or replaced since by someone else
            patch = _INSTALLED[key] = cls(owner, name, make)
        patch.sessions.append(session)
        return patch

    def leave(self, session: Session) -> None:
        """Remove ``session``; the last one out restores the original if the dispatcher is still in place."""
        self.sessions.remove(session)
        if self.sessions:
            return
        key = (id(self.owner), self.name)
        if _INSTALLED.get(key) is self:
            del _INSTALLED[key]
        if self._get() is self.dispatcher:
            if self.inherited:
                delattr(self.owner, self.name)
            else:
                self._set(self.original)

    @classmethod
    @contextmanager
    def joined(cls, owner: Any, name: str, make: MakeDispatcher, session: Session) -> Iterator[SharedPatch]:
        """:meth:`join` for the block, :meth:`leave` however it exits."""
        patch = cls.join(owner, name, make, session)
        try:
            yield patch
        finally:
            patch.leave(session)


_INSTALLED: dict[tuple[int, str], SharedPatch] = {}  # the patches installed now, by (id(owner), name)
#: the last dispatcher made for each (id(owner), name): (owner, original, make, sessions, dispatcher), reused while
#: they are the same, so that one function stands in for the original at every measured step (a compiled graph that
#: traced it is not compiled again: see the global hooks below)
_DISPATCHERS: dict[tuple[int, str], tuple[Any, Any, Any, list, Any]] = {}

# -- global module hooks, one pair for all active sessions ------------------------------------------------------------
#
# The pair is installed under fixed keys of torch's global hook dictionaries (negative: torch's own handles count up
# from 0) and calls module-level functions, so that every measured step installs the very same hooks. A compiled
# model that runs inside a measured block (a compiled teacher beside the monitored student) traces them, and
# Dynamo's guards on the global hooks then see the same keys and functions at every measured step: the graph traced
# with them is reused instead of being compiled again at each one, up to Dynamo's recompile limit.

_HOOK_SESSIONS: list[Session] = []  # the sessions whose modules the global hooks track, in the order they joined
_PRE_HOOK_KEY, _POST_HOOK_KEY = -0x6E0A, -0x6E0B


def _enter_all(module: nn.Module, args: tuple) -> None:
    for session in tuple(_HOOK_SESSIONS):
        session._enter(module, args)


def _leave_all(module: nn.Module, args: tuple, *rest: Any) -> None:
    for session in tuple(_HOOK_SESSIONS):
        session._leave(module, args, *rest)


def _install_global_hooks() -> None:
    _module_hooks._global_forward_pre_hooks[_PRE_HOOK_KEY] = _enter_all
    _module_hooks._global_forward_hooks[_POST_HOOK_KEY] = _leave_all
    _module_hooks._global_forward_hooks_with_kwargs[_POST_HOOK_KEY] = True  # called (module, args, kwargs, output)
    _module_hooks._global_forward_hooks_always_called[_POST_HOOK_KEY] = True  # and (module, args, output) on error


def _remove_global_hooks() -> None:
    _module_hooks._global_forward_pre_hooks.pop(_PRE_HOOK_KEY, None)
    for hooks in (_module_hooks._global_forward_hooks, _module_hooks._global_forward_hooks_with_kwargs,
                  _module_hooks._global_forward_hooks_always_called):  # fmt: skip
        hooks.pop(_POST_HOOK_KEY, None)


def _sdpa_dispatcher(original: Callable, sessions: list[Session]) -> Callable:
    @functools.wraps(original)
    def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        for session in tuple(sessions):
            name = session.current()
            if name is not None:
                session.guarded(name, functools.partial(_report_sdpa, session, name, args, kwargs))
        return out

    return scaled_dot_product_attention


def _report_sdpa(session: Session, name: str, args: tuple, kwargs: dict) -> None:
    q, k, mask, is_causal, scale = _sdpa_arguments(args, kwargs)
    if q.ndim != 4 or k.ndim != 4:  # SDPA takes any batch dimensions; the module says which of them are heads
        folded = fold_batch_dims(q, k, mask, session.head_count(name))
        if isinstance(folded, str):
            session.reports += 1  # seen and said: the module's exit must not call it unseen too
            session.warn_once(f"layout:{name}", f"geomon: attention of {name!r} is not reported: it calls "
                              f"scaled_dot_product_attention with a {q.ndim}-D query {tuple(q.shape)}, and geomon "
                              f"reads [batch, heads, queries, head_dim]: {folded}")  # fmt: skip
            return
        q, k, mask = folded
    dropped = session.padded_rows(len(session.stack) - 1, q.shape[0], q.shape[-2])  # windows a block padded
    context = session.sdpa_context[-1] if session.sdpa_context else None
    if context is not None and context.name == name:
        _report_in_context(session, context, q, k, mask, is_causal, scale, dropped)
        return
    cross, leading = None, 0
    layout = session.sdpa_layout.get(name)
    if layout is not None:  # extra keys first (x-transformers' memory / zero key-values)
        cross, extra = layout
        aligned = k.shape[-2] - extra == q.shape[-2]
        if cross is False and not aligned:
            cross = None  # more keys than the call's tokens (a cache): the padding rule decides
        leading = extra if aligned and cross is False else 0
    session.report(name, q, k, mask, is_causal, scale, cross, dropped=dropped, leading=leading)


def _report_in_context(
    session: Session,
    context: SdpaContext,
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    dropped: Tensor | None = None,
) -> None:
    """An SDPA call made by a transformers attention function: heads unpacked, self / cross and the queries' place
    among the keys as the module's call says; ``dropped``: the window padding rows of the module's windows."""
    name = context.name
    if context.unplaced is not None:
        session.reports += 1  # seen, and said why it is not reported
        session.warn_once(f"unplaced:{name}", f"geomon: attention of {name!r} is not reported: {context.unplaced}")
        return
    if q.shape != context.query_shape:
        unpacked = unpack_gqa(q, mask, context.query_shape)
        if unpacked is None:
            session.reports += 1
            session.warn_once(
                f"layout:{name}",
                f"geomon: attention of {name!r} is not reported: the module's query {tuple(context.query_shape)} "
                f"reached F.scaled_dot_product_attention as {tuple(q.shape)}, a layout geomon cannot map back to "
                "its heads and query rows",
            )
            return
        q, mask, dropped = *unpacked, None
    leading = context.leading if k.shape[-2] == context.key_length else 0  # keys sliced: the queries' own
    session.report(name, q, k, mask, is_causal, scale, context.cross, dropped=dropped, leading=leading)


def unpack_gqa(q: Tensor, mask: Tensor | None, shape: torch.Size) -> tuple[Tensor, Tensor | None] | None:
    """Undo transformers' ``pack_gqa``: a one-token query ``[B, H, 1, Dh]`` passed to SDPA as ``[B, Hk, G, Dh]``
    (query head ``h = hk·G + g`` reads key head ``hk``: geomon's mapping), its per-head mask ``[B, H, 1, Nk]`` as
    ``[B, Hk, G, Nk]`` (a mask shared by the heads is passed as it is). None: not that layout.

    Example:
        >>> import torch
        >>> q = torch.randn(2, 8, 1, 4)  # 8 query heads, one token
        >>> packed = q.reshape(2, 2, 4, 4)  # 2 key heads, 4 query heads each
        >>> unpacked, _ = unpack_gqa(packed, None, q.shape)
        >>> torch.equal(unpacked, q), unpack_gqa(torch.randn(2, 3, 4, 4), None, q.shape)
        (True, None)
    """
    batch, heads, n_q, dim = shape
    if n_q != 1 or q.dim() != 4 or q.shape[0] != batch or q.shape[-1] != dim or q.shape[1] * q.shape[2] != heads:
        return None
    if mask is not None and mask.dim() == 4 and mask.shape[-2] != 1:
        if mask.shape[-3] * mask.shape[-2] != heads:
            return None
        mask = mask.reshape(mask.shape[0], heads, 1, mask.shape[-1])
    return q.reshape(batch, heads, 1, dim), mask


def _sdpa_arguments(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None, bool, float | None]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args, strict=False)) | kwargs
    return bound["query"], bound["key"], bound.get("attn_mask"), bool(bound.get("is_causal", False)), bound.get("scale")


def bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a call by parameter name (positional first, then keywords)."""
    return dict(zip(names, args, strict=False)) | kwargs
