"""Neural collapse of the features entering a classifier head, against that head, over windows of rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geomon.capture.modules import weight_out_in
from geomon.functional._dispatch import Backend
from geomon.metrics import NeuralCollapse
from geomon.probes._sync import synced_sum, whole

#: Label of rows that carry no class (Hugging Face's convention for padding and the last position of a sequence).
IGNORE_INDEX = -100


class CollapseProbe:
    """NC1-NC4, CDNV, GNC2 and UNC3 of one head's input features under ``geomon/nc/<stat>/<name>``.

    A window closes once it holds ``min_rows`` labelled rows over all processes; ``nc4`` compares against the class
    means of the previous window (so it is NaN in the first one). State: ``O(C·D + D²)`` float64.
    """

    def __init__(
        self, name: str, num_classes: int, num_features: int, *, min_rows: int | None = None,
        backend: Backend = "auto",
    ) -> None:  # fmt: skip
        self.name, self.num_classes, self.num_features = name, num_classes, num_features
        self.min_rows = 4 * num_features if min_rows is None else min_rows
        self.metric = NeuralCollapse(num_classes, num_features, backend=backend, ignore_index=IGNORE_INDEX)

    def update(self, features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        """Add head inputs ``[..., D]`` with their labels (same leading shape; ``-100`` = no label)."""
        rows = features.reshape(-1, features.shape[-1])
        labels = labels.to(rows.device).reshape(-1)
        if labels.shape[0] != rows.shape[0]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not align with the head's input rows {tuple(features.shape)}: "
                "give one label per row (return aligned labels from labels_fn)"
            )
        self.metric.to(rows.device).update(rows, labels.long(), weight, bias)

    def compute(self) -> dict[str, Tensor]:
        if float(synced_sum(self.metric.count.sum())) < self.min_rows:
            return {}
        values = {f"geomon/nc/{stat}/{self.name}": value for stat, value in self.metric.compute().items()}
        self.metric.reset()
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.num_classes, "d": self.num_features, "min_rows": self.min_rows,
                "metric": self.metric.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["c"], state["d"]) != (self.num_classes, self.num_features):
            raise ValueError(f"checkpoint's neural-collapse probe {self.name!r} is {state['c']} x {state['d']}, "
                             f"the model's head is {self.num_classes} x {self.num_features}")  # fmt: skip
        self.metric.load_state_dict(state["metric"])


def head_weight(module: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [C, D], bias [C] or None)`` of a head, transposing Hugging Face's ``Conv1D`` layout; sharded
    ``DTensor`` parameters (FSDP2) are gathered whole, a collective (every rank must call this at the same point)."""
    weight = whole(weight_out_in(module))
    bias = getattr(module, "bias", None)
    return weight, None if bias is None else whole(bias)
