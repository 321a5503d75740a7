"""The attention-entropy lower bound of Zhai et al. (ICML 2023), Theorem 3.1.

For a logit map whose spectral norm, times that of the inputs' Gram and the softmax scale, is ``𝛔``, and ``T`` keys:
``β = exp(-𝛔 sqrt(T/(T-1)))`` and
``Ent ≥ log(1 + (T-1)β) + 𝛔 sqrt(T(T-1)) β / (1 + (T-1)β)``.
At ``𝛔 = 0`` the bound is ``log T`` (uniform attention); it falls towards 0 as ``𝛔`` grows, which is why a
growing spectral norm lets attention entropy collapse.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy_lower_bound(sigma: Tensor | float, n_keys: int) -> Tensor:
    """Theorem 3.1's lower bound on the attention entropy (nats) of any row.

    Args:
        sigma: ``𝛔 = |W_K W_Qᵀ|₂ · |X Xᵀ|₂`` with the softmax scale folded in; a tensor of any shape, ``>= 0``.
        n_keys: the number of keys ``T >= 1`` (``T = 1`` gives 0: one key, no uncertainty).

    Returns:
        The bound, element-wise, as a float64 tensor of ``sigma``'s shape.

    Example:
        >>> round(float(entropy_lower_bound(5.0, 16)), 4)
        0.4903
    """
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 1:
        raise ValueError(f"n_keys must be a positive integer, got {n_keys!r}")
    if isinstance(sigma, complex) or (isinstance(sigma, torch.Tensor) and sigma.is_complex()):
        raise ValueError("sigma must be real and >= 0 (a product of spectral norms), got a complex value")
    try:
        s = torch.as_tensor(sigma, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            "sigma must be a real number >= 0 or a real tensor (or nested sequence of numbers) of them, got "
            f"{type(sigma).__name__}"
        ) from None
    if bool((s < 0).any()) or bool(s.isnan().any()):
        raise ValueError("sigma must be real and >= 0 (a product of spectral norms)")
    if n_keys == 1:
        return torch.zeros_like(s)
    t = float(n_keys)
    beta = torch.exp(-s * math.sqrt(t / (t - 1)))
    spread = 1 + (t - 1) * beta
    tail = torch.where(beta > 0, s * math.sqrt(t * (t - 1)) * beta / spread, 0.0)
    return torch.log(spread) + tail
