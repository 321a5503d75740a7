"""The one piece of machinery shared by geomon's metrics: a torchmetrics state made of a statistics tuple."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torchmetrics import Metric


class StatsMetric(Metric):
    """A :class:`torchmetrics.Metric` whose state is the fields of one ``geomon.functional`` statistics tuple.

    Every field is a metric state reduced across processes with a sum, or with a max for the fields named in
    ``max_fields``; streaming, ``reset`` and ``.to()`` come from torchmetrics. States are persistent (they are in
    ``state_dict()``, so a resumed run continues its window), and the DDP sync is an in-place all-reduce of a copy,
    while torchmetrics' cache of the local values holds the state tensors themselves: two copies of a state whatever
    the world size (torchmetrics' default caches a third and gathers every rank's copy first;
    tests/metrics/test_sync_memory.py).
    """

    full_state_update: ClassVar[bool] = False
    max_fields: ClassVar[frozenset[str]] = frozenset()

    def _add_stats_states(self, initial: NamedTuple) -> None:
        self._stats_type = type(initial)
        for name, value in initial._asdict().items():
            reduce = "max" if name in self.max_fields else "sum"
            self.add_state(name, default=value, dist_reduce_fx=reduce, persistent=True)
            self._defaults[name] = _lean(value)  # add_state keeps a full deep copy as the default: one element will do

    def _apply(self, fn: Any, exclude_state: Any = "") -> Any:
        # torchmetrics applies ``fn`` to the defaults too, which would materialise them: keep them lean
        this = super()._apply(fn, exclude_state)
        for name, default in this._defaults.items():
            if isinstance(default, torch.Tensor) and default.dim() > 0 and default.stride() != (0,) * default.dim():
                this._defaults[name] = _lean(default)
        return this

    def _accumulate(self, stats: NamedTuple) -> None:
        for name, value in stats._asdict().items():
            current = getattr(self, name)
            setattr(self, name, torch.maximum(current, value) if name in self.max_fields else current + value)

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # ``sync`` has cached the local values and restores them after ``compute``. Reduce a copy, never the state
        # tensor itself: a MetricCollection compute group shares that tensor between metrics.
        group = process_group or self.process_group
        for name in self._defaults:
            op = dist.ReduceOp.MAX if name in self.max_fields else dist.ReduceOp.SUM
            reduced = getattr(self, name).clone()
            dist.all_reduce(reduced, op=op, group=group)
            setattr(self, name, reduced)

    def _copy_state_dict(self) -> dict[str, Any]:
        # What ``sync`` caches to restore after ``compute``. torchmetrics clones every state; the tensors themselves
        # will do, since ``_sync_dist`` reduces copies and nothing writes a state in place between sync and unsync
        # (``forward``, the other caller, is replaced below): one full-size copy fewer at every logging step.
        return {name: getattr(self, name) for name in self._defaults}

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Only ``update``: a per-batch value would cost an eigen-solve (and host syncs) on every step."""
        self.update(*args, **kwargs)

    def _stats(self) -> Any:
        return self._stats_type(*(getattr(self, name) for name in self._stats_type._fields))


def _lean(value: torch.Tensor) -> torch.Tensor:
    """A default with ``value``'s shape, dtype and device holding one element: reset clones it into a full state,
    and torchmetrics keeps no second full-size copy of every state (a C x D float64 class-sum default was as large
    as the state)."""
    if value.dim() == 0 or (not value.is_meta and bool(value.ne(value.reshape(-1)[0]).any())):
        return value.detach().clone()  # not one repeated value: keep it whole
    return value.detach().reshape(-1)[:1].clone().reshape((1,) * value.dim()).expand(value.shape)


def zeros(*shape: int) -> torch.Tensor:
    """A float64 zero state of the given shape."""
    return torch.zeros(shape, dtype=torch.float64)


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
