"""The Q/K projections a recompute adapter needs, as the model computed them in the call being reported.

A module-level adapter (a *fallback*: timm's attention with its fused path off, Bloom, MPT, Longformer, ...) reports
Q and K at its module's exit, from the module's input and projections. Calling a projection again is not always
harmless: one that draws random numbers in training (a LoRA adapter's ``lora_dropout``) would give another sample
than the model used, and would move the random stream the rest of the training reads (the next dropout masks, so
the loss). So, while a fallback's module runs, the output of each of its direct children is kept (a reference; its
input too) as the child returns, and :func:`projected` hands that output back when the adapter asks for the child
applied to the same input (the same view of the same storage), and the output has not been changed in place since
(its version counter, which Longformer's in-place ``/= sqrt(d)`` moves). Otherwise the projection is computed again:
only the output rows needed of a plain ``nn.Linear``; any other module through its ``forward`` under a forked
random state, so training's random stream is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Seen(NamedTuple):
    """One call of a fallback module's child: its first input and its output, and the output's version then."""

    input: Any
    output: Any
    version: int | None


_NOW: list[dict[int, list[Seen]]] = [{}]  # the records of the children of the fallback running now (by id)


class ChildOutputs:
    """Keeps the outputs of the direct children of the fallback modules while those modules run."""

    def __init__(self) -> None:
        self.parent_of: dict[int, int] = {}  # child id -> its fallback module's id
        self.children: dict[int, tuple[int, ...]] = {}  # fallback module id -> its children's ids
        self.records: dict[int, list[Seen]] = {}

    def watch(self, module: nn.Module) -> None:
        """Keep the outputs of ``module``'s direct children while it runs."""
        children = tuple(id(child) for child in module.children())
        self.children[id(module)] = children
        for child in children:
            self.parent_of[child] = id(module)

    def record(self, key: int, args: tuple, kwargs: dict, output: Any, *, running: Iterator[int]) -> None:
        """At a module's exit: keep its output if it is a watched child called inside its fallback module."""
        parent = self.parent_of.get(key)
        if parent is None or parent not in running:
            return
        first = args[0] if args else next(iter(kwargs.values()), None)
        self.records.setdefault(key, []).append(Seen(first, output, _version(output)))

    @contextmanager
    def during(self, module_id: int) -> Iterator[None]:
        """Make the records of ``module_id``'s children readable by :func:`projected` while its fallback runs;
        forget them afterwards."""
        children = self.children.get(module_id, ())
        _NOW[0] = {child: self.records[child] for child in children if child in self.records}
        try:
            yield
        finally:
            _NOW[0] = {}
            self.forget(module_id)

    def forget(self, module_id: int) -> None:
        for child in self.children.get(module_id, ()):
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
    return (
        isinstance(a, Tensor)
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def seen_calls(child: nn.Module) -> list[Seen]:
    """The calls of ``child`` (a direct child of the module whose fallback runs now) during that module's call."""
    return _NOW[0].get(id(child), [])


def unchanged_output(seen: Seen) -> Tensor | None:
    """The call's output if it is a tensor not changed in place since the child returned it, else None."""
    if seen.version is None or _version(seen.output) != seen.version:
        return None
    return seen.output


def recorded(proj: nn.Module, x: Tensor) -> Tensor | None:
    """``proj(x)`` as the model computed it in this call, unchanged since; None if it was not seen so."""
    for seen in reversed(seen_calls(proj)):
        output = unchanged_output(seen) if _same_view(seen.input, x) else None
        if output is not None:
            return output
    return None


def projected(proj: nn.Module, x: Tensor, width: int | None = None) -> Tensor:
    """``proj(x)``'s first ``width`` output features (all: None) as the model computed them in this call, or
    computed again without touching training's random stream (see the module)."""
    output = recorded(proj, x)
    if output is not None:
        return output if width is None else output[..., :width]
    if type(proj) is nn.Linear:  # only the rows needed; no random numbers drawn
        weight = proj.weight if width is None else proj.weight[:width]
        bias = None if proj.bias is None or width is None else proj.bias[:width]
        return F.linear(x, weight, proj.bias if width is None else bias)
    if x.device.type == "cpu":
        forked = torch.random.fork_rng(devices=[])
    else:  # the host's generator and the accelerator's
        forked = torch.random.fork_rng(devices=[x.device.index or 0], device_type=x.device.type)
    with forked:
        output = proj.forward(x)
    return output if width is None else output[..., :width]
