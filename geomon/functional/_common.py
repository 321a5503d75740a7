"""Shared pieces of the functional metrics: input validation, dtypes, stats arithmetic.

Every check here reads only shapes and dtypes (metadata), so it never forces a host-device sync: it is safe to call
on every monitored step. Checks that need the data itself (labels out of range, non-finite values) live where the
values are computed, on the logging step.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TypeVar

import torch
from torch import Tensor

StatsT = TypeVar("StatsT", bound=tuple)

#: Row-by-column tiles of temporary matrices are kept under this many elements (64 MiB in fp32).
TILE_ELEMENTS = 1 << 24


class GeomonWarning(UserWarning):
    """A metric could not be computed meaningfully and returned NaN (too few samples, non-finite data...)."""


def warn(message: str) -> None:
    """Emit a :class:`GeomonWarning` pointing at the caller of the public function."""
    warnings.warn(message, GeomonWarning, stacklevel=3)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Turn off ``torch.autocast`` on ``device`` while geomon computes, so that a metric documented as computed in
    float32 is, also when it is called inside the model's autocast region (a forward hook under bf16-mixed training):
    autocast would otherwise run its float32 matrix products in bfloat16 / float16."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to turn off
        return contextlib.nullcontext()


def check_float_tensor(x: object, name: str, ndim: int | tuple[int, ...], shape_doc: str) -> Tensor:
    """Check that ``x`` is a real floating-point tensor with the expected number of dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(
            f"{name} must be a real floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in allowed:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    return x


def check_number(x: object, name: str, what: str) -> float:
    """Check that ``x`` is a real Python number (not a bool, str, list or None); ``what`` says what is allowed."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    return float(x)


def check_flag(x: object, name: str) -> bool:
    """Check that ``x`` is a bool (a str or None would otherwise be read as truthy or falsy)."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be True or False, got {type(x).__name__} {x!r}")
    return x


def is_index_tensor(x: Tensor) -> bool:
    """Whether ``x`` holds integers that can index classes (not float, complex or bool)."""
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def check_int_tensor(x: object, name: str, shape_doc: str) -> Tensor:
    """Check that ``x`` is a 1-D integer tensor (class labels)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if not is_index_tensor(x):
        raise TypeError(f"{name} must be an integer tensor (int64, int32, ...), got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape {shape_doc} (1-D), got {tuple(x.shape)}")
    return x


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a batch is computed in: float64 stays float64, everything else is upcast to float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


#: The one-shot functions rescale float64 inputs whose largest ``|value|`` lies outside ``[2^-SAFE_EXPONENT,
#: 2^SAFE_EXPONENT]``: their float64 Gram (squares summed over rows) would otherwise overflow (above about 1e154) or
#: underflow (below about 1e-162) although every value is finite.
SAFE_EXPONENT = 250


def scale_by_power_of_two(x: Tensor, exponent: int) -> Tensor:
    """``x · 2^exponent`` in two steps, so that no factor overflows (``|exponent|`` may exceed 1023 for subnormal data).
    Exact for every value whose result is a normal number."""
    first = exponent // 2
    return x * 2.0**first * 2.0 ** (exponent - first)


def rescale_extreme(x: object) -> tuple[object, int]:
    """``(x · 2^-e, e)`` when ``x`` is a float64 tensor whose largest ``|value|``, ``f · 2^e`` with ``f`` in
    ``[0.5, 1)``, is finite, non-zero and outside ``[2^-SAFE_EXPONENT, 2^SAFE_EXPONENT]``; ``(x, 0)`` otherwise
    (other dtypes cannot overflow a float64 Gram; non-finite data keeps its NaN/Inf warnings; anything that is not a
    tensor is left to the validation). The scaled data has its largest ``|value|`` in ``[0.5, 1)``: exact, except
    that values below ``2^-1022`` of the largest lose bits (their products are far below float64 resolution of a
    Gram anyway). Reads the data: a host sync, for the one-shot functions only."""
    if not isinstance(x, Tensor) or x.dtype != torch.float64 or x.numel() == 0:
        return x, 0
    largest = x.detach().abs().amax()
    if not bool(torch.isfinite(largest) & (largest > 0)):
        return x, 0
    exponent = int(torch.frexp(largest).exponent.item())
    if -SAFE_EXPONENT <= exponent <= SAFE_EXPONENT:
        return x, 0
    return scale_by_power_of_two(x, -exponent), exponent


def nan(device: torch.device | str | None = None) -> Tensor:
    """A float64 NaN scalar, the documented value of a metric that cannot be computed."""
    return torch.tensor(float("nan"), dtype=torch.float64, device=device)


def sum_stats(a: StatsT, b: StatsT) -> StatsT:
    """Element-wise sum of two statistics tuples of the same kind (how streams and processes combine)."""
    return type(a)(*(x + y for x, y in zip(a, b, strict=True)))
