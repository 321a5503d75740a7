"""The one collective a probe needs outside ``Metric.compute``: a sum over processes that all ranks agree on."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def synced_sum(value: Tensor) -> Tensor:
    """``value`` summed over the default process group (a copy; ``value`` itself is unchanged)."""
    total = value.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total
