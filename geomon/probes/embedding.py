"""RankMe and alpha-ReQ of one stream of embeddings, over windows of enough rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geomon.functional._embedding import _eigvalsh_descending
from geomon.functional.alpha_req import _alpha_req_compute
from geomon.functional.rankme import _rankme_compute
from geomon.metrics import RankMe
from geomon.probes._sync import synced_sum


class EmbeddingProbe:
    """Accumulates rows ``[..., D]`` of one probe until the window holds ``min_rows`` (over all processes), then
    reports ``geomon/rankme/<name>`` and, where ``D > 100``, ``geomon/alpha_req/<name>`` and starts a new window.

    RankMe is biased low on few rows (METRICS.md §1), hence the default window of ``4 x D`` rows. Both metrics are
    computed from one accumulated Gram (:class:`~geomon.metrics.RankMe`'s state), synced once per window.
    """

    def __init__(self, name: str, num_features: int, *, min_rows: int | None = None) -> None:
        self.name, self.num_features = name, num_features
        self.min_rows = 4 * num_features if min_rows is None else min_rows
        self.rankme = RankMe(num_features, min_samples=1)
        self.with_alpha = num_features > 100  # alpha-ReQ's default fit runs over eigenvalues 11..100

    def to(self, device: torch.device) -> EmbeddingProbe:
        self.rankme.to(device)
        return self

    def update(self, rows: Tensor) -> None:
        self.rankme.update(rows)

    def compute(self, spectrum: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Values when the window is full (all ranks decide from the same synced count), else nothing yet."""
        if float(synced_sum(self.rankme.n)) < self.min_rows:
            return {}, {}
        key = f"geomon/rankme/{self.name}"
        scalars, details = {}, {}
        with self.rankme.sync_context():  # one all-reduce of the window's sums serves every value below
            stats = self.rankme._stats()
            scalars[key] = _rankme_compute(stats, eps=self.rankme.eps, min_samples=1)
            if self.with_alpha:
                scalars[f"geomon/alpha_req/{self.name}"] = _alpha_req_compute(stats)[0]
            if spectrum:  # singular values of the window's rows, for the spectrum plot
                details[key] = _eigvalsh_descending(stats.gram).clamp(min=0).sqrt()
        self.rankme.reset()
        return scalars, details

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.num_features, "min_rows": self.min_rows, "rankme": self.rankme.state_dict()}

    @classmethod
    def from_state_dict(cls, name: str, state: dict[str, Any]) -> EmbeddingProbe:
        probe = cls(name, state["d"], min_rows=state["min_rows"])
        probe.rankme.load_state_dict(state["rankme"])  # a checkpoint's separate alpha state held the same sums
        return probe
