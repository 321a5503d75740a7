"""σ(W) and stable rank of chosen weights, by warm-started power iteration at each logging step."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from geomon.metrics import SpectralNorm
from geomon.probes._sync import whole


def full_weight(module: nn.Module) -> Tensor:
    """The module's whole 2-D weight, detached; a sharded ``DTensor`` (FSDP2) is gathered, which is a collective:
    every rank must call this at the same point (the monitor's compute does)."""
    return whole(module.weight)


class SpectralProbe:
    """``geomon/spectral/sigma/<module>`` and ``geomon/spectral/stable_rank/<module>`` (``|W|_F² / σ²``)."""

    def __init__(self, names: list[str]) -> None:
        self.metrics = {name: SpectralNorm() for name in names}

    def compute(self, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for name, metric in self.metrics.items():
            weight = full_weight(modules[name])
            metric.to(weight.device).update(weight)
            sigma = metric.compute()
            values[f"geomon/spectral/sigma/{name}"] = sigma
            values[f"geomon/spectral/stable_rank/{name}"] = weight.double().square().sum() / sigma.double().square()
        return values

    def state_dict(self) -> dict[str, Any]:
        return {name: m.state_dict() for name, m in self.metrics.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, metric_state in state.items():
            if name in self.metrics:
                self.metrics[name].load_state_dict(metric_state)
