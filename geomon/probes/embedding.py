"""RankMe and alpha-ReQ of one stream of embeddings, over windows of enough rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geomon.functional._embedding import _eigvalsh_descending
from geomon.metrics import AlphaReQ, RankMe
from geomon.probes._sync import synced_sum


class EmbeddingProbe:
    """Accumulates rows ``[..., D]`` of one probe until the window holds ``min_rows`` (over all processes), then
    reports ``geomon/rankme/<name>`` and, where ``D > 100``, ``geomon/alpha_req/<name>`` and starts a new window.

    RankMe is biased low on few rows (METRICS.md §1), hence the default window of ``4 x D`` rows.
    """

    def __init__(self, name: str, num_features: int, *, min_rows: int | None = None) -> None:
        self.name, self.num_features = name, num_features
        self.min_rows = 4 * num_features if min_rows is None else min_rows
        self.rankme = RankMe(num_features, min_samples=1)
        self.alpha = AlphaReQ(num_features) if num_features > 100 else None

    def to(self, device: torch.device) -> EmbeddingProbe:
        self.rankme.to(device)
        if self.alpha is not None:
            self.alpha.to(device)
        return self

    def update(self, rows: Tensor) -> None:
        self.rankme.update(rows)
        if self.alpha is not None:
            self.alpha.update(rows)

    def compute(self, spectrum: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Values when the window is full (all ranks decide from the same synced count), else nothing yet."""
        if float(synced_sum(self.rankme.n)) < self.min_rows:
            return {}, {}
        scalars = {f"geomon/rankme/{self.name}": self.rankme.compute()}
        details = {}
        if spectrum:  # singular values of the window's rows, for the spectrum plot
            with self.rankme.sync_context():
                details[f"geomon/rankme/{self.name}"] = _eigvalsh_descending(self.rankme.gram).clamp(min=0).sqrt()
        self.rankme.reset()
        if self.alpha is not None:
            scalars[f"geomon/alpha_req/{self.name}"] = self.alpha.compute()
            self.alpha.reset()
        return scalars, details

    def state_dict(self) -> dict[str, Any]:
        alpha = None if self.alpha is None else self.alpha.state_dict()
        return {"d": self.num_features, "min_rows": self.min_rows, "rankme": self.rankme.state_dict(), "alpha": alpha}

    @classmethod
    def from_state_dict(cls, name: str, state: dict[str, Any]) -> EmbeddingProbe:
        probe = cls(name, state["d"], min_rows=state["min_rows"])
        probe.rankme.load_state_dict(state["rankme"])
        if probe.alpha is not None and state["alpha"] is not None:
            probe.alpha.load_state_dict(state["alpha"])
        return probe
