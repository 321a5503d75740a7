"""Which implementation runs: the torch reference or a Triton kernel (imported lazily, never at ``import geomon``).

``backend="torch"`` always runs the reference. ``"triton"`` runs the kernel or raises, naming why it cannot.
``"auto"`` runs the kernel on CUDA tensors when triton imports and the case is supported, the reference otherwise.
On the CPU the kernels run only when asked for and ``TRITON_INTERPRET=1`` was set before triton was imported (that is
how CI tests them). When ``"auto"`` leaves CUDA tensors to the reference (triton missing, a case the kernel does not
cover), a :class:`~geomon.GeomonWarning` says so once per operation and reason: the values are the same, the cost is
not.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Literal

from torch import Tensor

from geomon.functional._common import GeomonWarning

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def triton_unavailable_reason(*tensors: Tensor | None) -> str | None:
    """Why the Triton kernels cannot run on these tensors here, or None if they can."""
    devices = sorted({t.device.type for t in tensors if t is not None})
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if devices != ["cuda"] and not (interpreted and devices == ["cpu"]):
        return (
            f"the tensors are on {'/'.join(devices)}; the kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
        )
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'geomon[triton]')"
    return None


def choose_backend(backend: str, op: str, *tensors: Tensor | None, unsupported: str | None = None) -> str:
    """Resolve ``backend`` for ``op`` on ``tensors``; ``unsupported`` names a case the kernel does not cover."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = unsupported or triton_unavailable_reason(*tensors)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"{op}: backend='triton' cannot run: {reason}")
        return "triton"
    on_cuda = all(t.device.type == "cuda" for t in tensors if t is not None)
    if reason is not None and on_cuda:
        _say_once(op, reason)
    return "triton" if reason is None and on_cuda else "torch"


#: ``(op, reason)`` pairs already announced in this process.
_ANNOUNCED: set[tuple[str, str]] = set()


def _say_once(op: str, reason: str) -> None:
    if (op, reason) in _ANNOUNCED:
        return
    _ANNOUNCED.add((op, reason))
    warnings.warn(f"geomon: {op} on CUDA runs on the torch path (same values, slower than the kernel): {reason}",
                  GeomonWarning, stacklevel=3)  # fmt: skip
