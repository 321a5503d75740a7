"""The one interface every probe has, and what a probe's computation returns.

A probe watches one thing (an attention layer, an embedding stream, the head's input and neural collapse, a weight's
spectrum) under a stable name. Its ``spec`` is the shape of its state (``None`` until known); a
:class:`~geomon.probes.plan.Plan` allocates the state, arms the probe's hooks for a measured step, and calls
:meth:`Probe.compute` on every rank in the same order. ``compute`` is a collective: it reduces the state over the
processes *before* deciding anything from it, so every rank takes the same branches and logs the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from geomon._guard import Guard

FLOAT64 = 8  # bytes


@dataclass
class Values:
    """What one :meth:`Plan.compute` produced: scalars to log, per-head vectors and spectra to draw (same keys)."""

    scalars: dict[str, Tensor] = field(default_factory=dict)
    details: dict[str, Tensor] = field(default_factory=dict)
    spectra: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Step:
    """The step a probe is armed for: its labels, the guard its hooks run under, whether it is a fill step (one
    between measured steps, on which only the probes that stream rows run: see :meth:`Probe.lead_steps`), and the
    batch's token mask (``[B, N]``, True or nonzero = a real token, padding otherwise; ``None``: every position)."""

    labels: Tensor | None
    guard: Guard
    fill: bool = False
    token_mask: Tensor | None = None
    #: the one probe whose rows ``token_mask`` describes (a sequence-to-sequence model's decoder mask: the head's
    #: input); None: every probe whose rows it aligns with
    token_mask_rows: str | None = None
    ran: set[str | None] = field(default_factory=set)  #: the watched modules whose hooks ran ("": attention seen)
    _row_masks: dict[torch.device, Tensor] = field(default_factory=dict)

    def row_mask(self, device: torch.device) -> Tensor:
        """``token_mask`` as one bool flag per row (``[B·N]``) on ``device``: made once per device for the step, for
        every probe and call that reads it (asynchronous only from the host to an accelerator: an asynchronous copy
        to the host could be read before it lands)."""
        found = self._row_masks.get(device)
        if found is None:
            mask = self.token_mask
            assert mask is not None
            mask = mask.to(device, non_blocking=device.type != "cpu" and mask.device.type == "cpu")
            found = self._row_masks[device] = (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)
        return found


@dataclass
class Context:
    """What :meth:`Probe.compute` may read: the model's modules by plain name, the guard, the options of this call."""

    modules: dict[str, nn.Module]
    guard: Guard
    spectra: bool = False  #: also return the singular values of closed embedding windows


class Probe:
    """One watched thing. Subclasses set ``kind`` and implement what applies of the methods below."""

    kind: ClassVar[str]
    #: computed from the model's weights at compute time: no streamed state, nothing to agree on across ranks
    weight_based: ClassVar[bool] = False

    def __init__(self, name: str, spec: tuple[int, ...] | None) -> None:
        self.name = name
        self.spec = spec  #: shape of the state; ``None`` until the first tensor shows it
        self.agreed = spec is not None  #: every rank holds this probe with this spec (see Plan.agree)

    @property
    def pid(self) -> str:
        """The probe's identity in the plan, ``<kind>:<name>``: plans are ordered by it."""
        return f"{self.kind}:{self.name}"

    @property
    def module(self) -> str | None:
        """The module (plain name) whose forward the probe hooks, or ``None``."""
        return None

    def keys(self) -> list[str]:
        """Every scalar key the probe can log."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Memory of the state once allocated (torchmetrics' one-element reset defaults included); 0 while ``spec``
        is None."""
        return 0

    def allocate(self, device: torch.device) -> None:
        """Create the (zero) state for ``spec`` on ``device``, if it does not exist yet."""

    def to(self, device: torch.device) -> None:
        """Move the state to ``device``."""

    def arm(self, module: nn.Module, step: Step) -> list[RemovableHandle]:
        """Register the hooks of a measured step on :attr:`module`; the plan removes them after the step."""
        return []

    def lead_steps(self, world_size: int) -> int:
        """How many optimizer steps, the measured one included, this probe's hooks run on before each compute: 1
        (measured steps only) unless the probe streams rows into a window that one step cannot fill (see
        :class:`~geomon.probes.embedding.EmbeddingProbe`). Decided on the host, from shapes: no sync."""
        return 1

    def compute(self, context: Context, out: Values) -> None:
        """Add this probe's values to ``out`` (a collective: every rank calls it at the same point)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the spec has been checked by the plan)."""


def steps_to_fill(min_rows: int, rows_per_step: int | None, world_size: int) -> int:
    """Steps of ``rows_per_step`` rows on each of ``world_size`` processes that a window of ``min_rows`` needs (1 while
    the rows per step are unknown).

    Example:
        >>> steps_to_fill(3072, 8, 1), steps_to_fill(256, 8, 2), steps_to_fill(3072, 4096, 1)
        (384, 16, 1)
    """
    if not rows_per_step:
        return 1
    return max(1, -(-min_rows // (world_size * rows_per_step)))


def metric_bytes(metric: Any) -> int:
    """Bytes a torchmetrics metric holds in its states, their reset defaults and its buffers (a default expanded
    from one element holds one element)."""
    tensors = [getattr(metric, name) for name in metric._defaults] + list(metric._defaults.values())
    tensors += list(metric.buffers())
    tensors = [t for t in tensors if isinstance(t, Tensor)]
    return sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for t in tensors)
