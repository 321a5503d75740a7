"""What probes need from ``torch.distributed`` outside ``Metric.compute``: a sum over processes that all ranks agree
on, and whole weights under sharded data parallelism.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a ``DTensor`` sharded over the ranks; its
whole value is one all-gather away (:func:`whole`, a collective). FSDP1 (the ``FullyShardedDataParallel`` wrapper)
flattens a unit's parameters into one ``FlatParameter``: outside the unit's forward a module's ``weight`` is then this
rank's piece of a flat vector (``use_orig_params=True``) or a view of freed memory (``use_orig_params=False``), so
reading it would give a wrong value or crash; :func:`fsdp1_flattened` tells such modules apart, and geomon does not
read their weights.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize


def multi_process() -> bool:
    """Whether a default process group of more than one process is running (values must then be kept in step)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def synced_sum(value: Tensor) -> Tensor:
    """``value`` summed over the default process group (a copy; ``value`` itself is unchanged)."""
    total = value.detach().clone()
    if multi_process():
        dist.all_reduce(total)
    return total


def whole(tensor: Tensor) -> Tensor:
    """``tensor`` detached; a sharded ``DTensor`` (FSDP2) is all-gathered into an ordinary tensor, which is a
    collective: every rank must call this at the same point."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach()


def fsdp1_flattened(module: nn.Module) -> bool:
    """Whether FSDP1 holds ``module``'s own parameters in a flat parameter (so that its ``weight`` outside forward is
    not the weight): FSDP1 marks the original parameters (``use_orig_params=True``) or replaces them with plain tensor
    attributes (``use_orig_params=False``)."""
    if any(getattr(p, "_fsdp_flattened", False) for p in module.parameters(recurse=False)):
        return True
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and not isinstance(weight, nn.Parameter)
        and "weight" not in module._buffers
        and not parametrize.is_parametrized(module, "weight")
        # torch.nn.utils.prune and the hook-based spectral_norm / weight_norm also leave a plain tensor as `weight`,
        # recomputed from parameters of their own
        and not any(name in module._parameters for name in _HOOK_WEIGHT_SOURCES)
    )


#: Parameters from which ``torch.nn.utils.prune`` (``weight_orig``), the hook-based ``spectral_norm``
#: (``weight_orig``) and ``weight_norm`` (``weight_g``, ``weight_v``) recompute a plain-tensor ``weight``.
_HOOK_WEIGHT_SOURCES = ("weight_orig", "weight_g", "weight_v")


def fsdp1_units(model: nn.Module) -> list[str]:
    """Names of the ``FullyShardedDataParallel`` (FSDP1) wrappers in ``model`` (``""`` for the model itself)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support has no FSDP
        return []
    return [name for name, module in model.named_modules() if isinstance(module, FullyShardedDataParallel)]


def fsdp1_whole_parameters(model: nn.Module) -> AbstractContextManager[object]:
    """A context in which the FSDP1 units inside ``model`` hold their parameters whole (``summon_full_params``, no
    writeback): a collective that gathers every parameter at once, so every rank must enter it at the same point;
    without FSDP1 units, nothing."""
    if not fsdp1_units(model):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(model, writeback=False)
