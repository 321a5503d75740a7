"""The Q/K projections a recompute adapter needs, as the model computed them in the call being reported.

A module-level adapter (a *fallback*: timm's attention with its fused path off, Bloom, MPT, Longformer, ...) reports
Q and K at its module's exit, from the module's input and projections. Calling a projection again is not always
harmless: one that draws random numbers in training (a LoRA adapter's ``lora_dropout``) would give another sample
than the model used, and would move the random stream the rest of the training reads (the next dropout masks, so
the loss). So, while a fallback's module runs, the output of each of its direct children named as a projection
(:data:`PROJECTIONS`) is kept (a reference; its input too) as the child returns, and :func:`projected` hands that
output back when the adapter asks for the child applied to the same input (the same view of the same storage), and
the output has not been changed in place since (its version counter). Otherwise the projection is computed again:
only the output rows needed of a plain ``nn.Linear``; any other module through its ``forward``, under a forked
random state so that training's random stream is untouched, and only in eval mode (:class:`NotReadBack` in
training: calling it again would also run its submodules' hooks and update any state they keep, such as a
quantisation observer's).

What read-back cannot see: a forward hook of the projection itself that replaces its output (geomon's global hook
runs before the module's own: the output before that hook is read back), and writes that do not move the version
counter (through ``.data``, or a tensor made under ``inference_mode``, which has none: never read back).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the attribute names of the projections the adapters read (timm, Bloom, MPT, nanoGPT, MaxViT, Longformer)
PROJECTIONS = frozenset({"qkv", "q_proj", "k_proj", "query_key_value", "Wqkv", "c_attn", "to_qkv", "query", "key",
                         "query_global", "key_global"})  # fmt: skip


class NotReadBack(RuntimeError):
    """A projection whose output in the call was not seen, which geomon will not call again in training."""


class Seen(NamedTuple):
    """One call of a fallback module's child: its first input and its output, and the output's version then."""

    input: Any
    output: Any
    version: int | None


#: the records of the children of the fallback running now, by child id
_NOW: contextvars.ContextVar[dict[int, list[Seen]] | None] = contextvars.ContextVar("geomon_children", default=None)


class ChildOutputs:
    """Keeps the outputs of the fallback modules' projections while those modules run."""

    def __init__(self) -> None:
        self.parent_of: dict[int, int] = {}  # child id -> its fallback module's id
        self.children: dict[int, tuple[int, ...]] = {}  # fallback module id -> its projections' ids
        self.records: dict[int, list[Seen]] = {}

    def watch(self, module: nn.Module) -> None:
        """Keep the outputs of ``module``'s direct children named as projections while it runs."""
        children = tuple(id(child) for name, child in module.named_children() if name in PROJECTIONS)
        self.children[id(module)] = children
        for child in children:
            self.parent_of[child] = id(module)

    def record(self, key: int, args: tuple, kwargs: dict, output: Any, *, stack: list[tuple[int, str, int]]) -> None:
        """At a module's exit: keep its output if it is a watched child called inside its fallback module (running:
        on ``stack``, the session's running modules)."""
        parent = self.parent_of.get(key)
        if parent is None or all(entry[0] != parent for entry in stack):
            return
        first = args[0] if args else next(iter(kwargs.values()), None)
        self.records.setdefault(key, []).append(Seen(first, output, _version(output)))

    @contextmanager
    def during(self, module_id: int) -> Iterator[None]:
        """Make the records of ``module_id``'s children readable by :func:`projected` while its fallback runs;
        forget them afterwards."""
        children = self.children.get(module_id, ())
        token = _NOW.set({child: self.records[child] for child in children if child in self.records})
        try:
            yield
        finally:
            _NOW.reset(token)
            self.forget(module_id)

    def forget(self, module_id: int | None = None) -> None:
        """Drop the records of ``module_id``'s children (None: all of them)."""
        if module_id is None:
            self.records.clear()
        for child in self.children.get(module_id, ()) if module_id is not None else ():
            self.records.pop(child, None)


def _version(tensor: Any) -> int | None:
    """The tensor's version counter (None where it has none to read: not a tensor, an inference tensor)."""
    if not isinstance(tensor, Tensor):
        return None
    try:
        return tensor._version
    except RuntimeError:  # inference tensors do not count their versions
        return None


def _same_view(a: Any, b: Tensor) -> bool:
    """Whether ``a`` is ``b``, or the same view of the same storage (never for storage-less tensors)."""
    if a is b:
        return True
    if not isinstance(a, Tensor) or a.device != b.device or a.dtype != b.dtype or a.layout != b.layout:
        return False
    try:
        pointer = a.data_ptr()
        return bool(pointer) and a.shape == b.shape and a.stride() == b.stride() and pointer == b.data_ptr()
    except (RuntimeError, NotImplementedError):  # nested, sparse, fake tensors: not compared
        return False


def seen_calls(child: nn.Module) -> list[Seen]:
    """The calls of ``child`` (a projection of the module whose fallback runs now) during that module's call."""
    return (_NOW.get() or {}).get(id(child), [])


def read_back(proj: nn.Module, x: Tensor, *, changed: int = 0) -> Tensor | None:
    """``proj(x)`` as the model computed it in this call, changed in place exactly ``changed`` times since (a
    module that scales its projection in place: the scaled output); None if it was not seen so."""
    for seen in reversed(seen_calls(proj)):
        if seen.version is None or not _same_view(seen.input, x) or not isinstance(seen.output, Tensor):
            continue
        if _version(seen.output) == seen.version + changed:
            return seen.output
    return None


def projected(proj: nn.Module, x: Tensor, width: int | None = None) -> Tensor:
    """``proj(x)``'s first ``width`` output features (all: None) as the model computed them in this call, or
    computed again without touching training (see the module)."""
    output = read_back(proj, x)
    if output is not None:
        return output if width is None else output[..., :width]
    if type(proj) is nn.Linear:  # only the rows needed; no random numbers drawn, no hooks run
        weight = proj.weight if width is None else proj.weight[:width]
        bias = None if proj.bias is None or width is None else proj.bias[:width]
        return F.linear(x, weight, proj.bias if width is None else bias)
    if proj.training:
        raise NotReadBack(f"its projection {type(proj).__name__} is not a plain nn.Linear and its output in this call "
                          "could not be read back; calling it again in training could change training (its dropout, "
                          "hooks, observers), so this call is not reported")  # fmt: skip
    with _forked(x, proj):
        output = proj.forward(x)
    return output if width is None else output[..., :width]


@contextmanager
def _forked(x: Tensor, proj: nn.Module) -> Iterator[None]:
    """The random state of the host and of every accelerator ``x`` and ``proj``'s weights are on, restored after."""
    devices = {x.device, *(p.device for p in proj.parameters())}
    accelerators = sorted({d.type for d in devices if d.type != "cpu"})
    if not accelerators:
        with torch.random.fork_rng(devices=[]):
            yield
        return
    kind = accelerators[0]  # one accelerator type per model
    indices = sorted({d.index or 0 for d in devices if d.type == kind})
    with torch.random.fork_rng(devices=indices, device_type=kind):
        yield
