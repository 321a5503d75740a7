"""The one piece of machinery shared by geomon's metrics: a torchmetrics state made of a statistics tuple."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torchmetrics import Metric


class StatsMetric(Metric):
    """A :class:`torchmetrics.Metric` whose state is the fields of one ``geomon.functional`` statistics tuple.

    Every field is a metric state reduced across processes with a sum, or with a max for the fields named in
    ``max_fields``; streaming, ``reset``, ``.to()``, checkpoints and DDP sync then come from torchmetrics.
    """

    full_state_update: ClassVar[bool] = False
    max_fields: ClassVar[frozenset[str]] = frozenset()

    def _add_stats_states(self, initial: NamedTuple) -> None:
        self._stats_type = type(initial)
        for name, value in initial._asdict().items():
            self.add_state(name, default=value, dist_reduce_fx="max" if name in self.max_fields else "sum")

    def _accumulate(self, stats: NamedTuple) -> None:
        for name, value in stats._asdict().items():
            current = getattr(self, name)
            setattr(self, name, torch.maximum(current, value) if name in self.max_fields else current + value)

    def _stats(self) -> Any:
        return self._stats_type(*(getattr(self, name) for name in self._stats_type._fields))


def zeros(*shape: int) -> torch.Tensor:
    """A float64 zero state of the given shape."""
    return torch.zeros(shape, dtype=torch.float64)


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
