"""Neural collapse of the features entering a classifier head, against that head, over windows of rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from geomon import keys
from geomon.capture._session import in_backward
from geomon.capture.modules import weight_out_in
from geomon.functional._dispatch import Backend
from geomon.metrics import NeuralCollapse
from geomon.probes._sync import multi_process, synced_sum, whole
from geomon.probes.base import FLOAT64, Context, Probe, Step, Values, steps_to_fill

#: Label of rows that carry no class (Hugging Face's convention for padding and the last position of a sequence).
IGNORE_INDEX = -100

#: Statistics :func:`geomon.functional.neural_collapse` returns, logged as ``geomon/nc/<stat>/<head>.input``.
STATS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4", "cdnv", "gnc2_mean", "gnc2_var",
         "unc3", "nc3_cos_mean", "coincident_pairs")  # fmt: skip


class CollapseProbe(Probe):
    """NC1-NC4, CDNV, GNC2 and UNC3 of one head's input features under ``geomon/nc/<stat>/<head>.input``.

    Fed by a hook on the head with the step's labels (one per row of the head's input; ``-100`` = none; other labels
    outside ``[0, C)`` are ignored too and counted, and the count is reported once). A window closes once it holds
    ``min_rows`` labelled rows over all processes; ``nc4`` compares against the class means of the previous window
    (so it is not logged in the first one); ``nc3`` and ``unc3`` use the head's weight of the window's last measured
    step. Like the head input's RankMe, the window is filled from the steps just before each compute when one step
    has too few rows (:meth:`lead_steps`): on those fill steps the head's weight is read only when it is a local tensor
    (a sharded FSDP2 weight would need a collective there), else their rows get no ``nc4`` decision.
    State: ``O(C·D + D²)`` float64.
    """

    kind = "collapse"

    def __init__(self, head: str, classes: int, features: int, *, min_rows: int | None = None,
                 backend: Backend = "auto") -> None:  # fmt: skip
        super().__init__(head + ".input", (classes, features))
        self.head, self.backend = head, backend
        self.min_rows = 4 * features if min_rows is None else min_rows
        self.metric: NeuralCollapse | None = None
        self.ignored: Tensor | None = None  # rows whose label lay outside [0, C), counted on the device
        self.rows_per_step: int | None = None  #: rows of the latest hooked call (a host-side int, from the shape)

    def lead_steps(self, world_size: int) -> int:
        return steps_to_fill(self.min_rows, self.rows_per_step, world_size)

    @property
    def module(self) -> str | None:
        return self.head

    def keys(self) -> list[str]:
        return [keys.key(keys.nc(stat), self.name) for stat in STATS]

    def state_bytes(self) -> int:
        c, d = self.spec  # type: ignore[misc]
        # the states (counts, sums, squared norms, Gram, 3 scalars), their one-element defaults, nc4's reference
        # means, the weight copy
        return (2 * c + c * d + d * d + 3 + 7 + 2 * c * d) * FLOAT64

    def allocate(self, device: torch.device) -> None:
        if self.metric is None:
            c, d = self.spec  # type: ignore[misc]
            self.metric = NeuralCollapse(c, d, backend=self.backend, ignore_index=IGNORE_INDEX).to(device)
            self.ignored = torch.zeros((), dtype=torch.long, device=device)

    def to(self, device: torch.device) -> None:
        if self.metric is not None:
            self.metric.to(device)
            self.ignored = self.ignored.to(device)  # type: ignore[union-attr]

    def arm(self, module: nn.Module, step: Step) -> list[RemovableHandle]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor) and not in_backward():
                step.ran.add(self.module)
                step.guard.run(f"neural collapse of {self.name!r}", self._on_head, module, inputs[0], step)

        return [module.register_forward_hook(hook, always_call=True)]

    def _on_head(self, module: nn.Module, features: Tensor, step: Step) -> None:
        self.rows_per_step = features.numel() // max(1, features.shape[-1]) if features.ndim else None
        if step.fill:  # between measured steps: no collective, no warning; rows without labels are not counted
            if step.labels is not None:
                weight, bias = weight_out_in(module), getattr(module, "bias", None)
                local = not any(hasattr(t, "full_tensor") for t in (weight, bias) if t is not None)
                self.update(features, step.labels, weight.detach() if local else None,
                            None if bias is None or not local else bias.detach())  # fmt: skip
            return
        # the weight first, on every rank alike: gathering a sharded one (FSDP2) is a collective, so nothing that may
        # differ between ranks (labels, a failing capture) may decide whether it happens
        weight = whole(weight_out_in(module))
        bias = getattr(module, "bias", None)
        bias = None if bias is None else whole(bias)
        if step.labels is None:
            step.guard.warn_once("labels", "geomon: neural collapse is on but this step has no labels (pass labels= "
                                 "to Monitor.step, or labels_fn= to GeomonCallback); its rows are skipped "
                                 "(neural_collapse=False silences this)")  # fmt: skip
            self.allocate(features.device)
            assert self.metric is not None
            self.metric.record_weight(weight)  # nc3 / unc3 read the weight of the last measured step
            return
        self.update(features, step.labels, weight, bias)

    def update(self, features: Tensor, labels: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
        """Add head inputs ``[..., D]`` with their labels (same leading shape)."""
        rows = features.detach().reshape(-1, features.shape[-1])
        labels = labels.to(rows.device).reshape(-1).long()
        if labels.shape[0] != rows.shape[0]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not align with the head's input rows {tuple(features.shape)}: "
                "give one label per row (return aligned labels from labels_fn)"
            )
        self.allocate(rows.device)
        assert self.metric is not None and self.ignored is not None
        outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.metric.num_classes))
        self.ignored += outside.sum()  # counted on the device: no host sync on a measured step
        self.metric.update(rows, labels.masked_fill(outside, IGNORE_INDEX), weight, bias)

    def compute(self, context: Context, out: Values) -> None:
        metric = self.metric
        assert metric is not None and self.ignored is not None
        ignored = int(synced_sum(self.ignored))
        if ignored:
            self.ignored.zero_()
            context.guard.warn_once("ignored-labels", f"geomon: {ignored} rows fed to neural collapse of {self.name!r} "
                                    f"had labels outside [0, {metric.num_classes}) other than {IGNORE_INDEX} and were "
                                    "ignored (this is said once)")  # fmt: skip
        if float(synced_sum(metric.count.sum())) < self.min_rows:
            return
        if multi_process():  # a rank without labelled rows holds no weight: every rank takes the same (DDP: equal)
            have = metric._weight is not None
            weight = metric._weight if have else torch.zeros(self.spec, dtype=torch.float64, device=metric.count.device)
            total = synced_sum(weight.double())
            holders = synced_sum(torch.tensor(float(have), dtype=torch.float64, device=total.device))
            metric.record_weight(total / holders)
        with metric.sync_context():
            result = type(metric).compute(metric)  # the unwrapped compute: the context has synced the window
        metric.reset()
        for stat, value in result.items():
            if not (stat == "nc4" and not bool(value.isfinite())):  # nc4 needs a previous window's class means
                out.scalars[keys.key(keys.nc(stat), self.name)] = value

    def state_dict(self) -> dict[str, Any]:
        if self.metric is None:
            return {}
        return {"min_rows": self.min_rows, "metric": self.metric.state_dict(), "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.metric is not None:
            self.metric.load_state_dict(state["metric"])
            self.rows_per_step = state.get("rows_per_step")  # a resumed run fills on the steps the whole run would
