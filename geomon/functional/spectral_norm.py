"""Spectral norm by power iteration with a persistent vector (the σReparam diagnostic, Zhai et al., ICML 2023).

``σ(W) = max_{|v|=1} |W v|``. One power step: ``v = normalize(Wᵀ u)``, ``u = normalize(W v)``; the estimate is
``σ ≈ |Wᵀ u|`` for the current unit vector ``u``, a lower bound of ``σ`` that converges to it. Keeping ``u``
between calls (a warm start) makes one step per monitored step enough once converged, as in σReparam.
Cost per step: two matrix-vector products, ``4·out·in`` FLOPs; memory: ``u`` (``out`` floats).

The first vector is drawn from a private, fixed-seed generator: the user's random streams are never consumed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geomon.functional._common import autocast_off, check_float_tensor

#: Power steps on a cold start (no vector given): the vector's error decays like (σ₂/σ₁)^(2·steps), the relative
#: error of σ like (σ₂/σ₁)^(4·steps).
COLD_START_STEPS = 100


def _initial_vector(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(shape, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(u, dim=-1).to(device=device, dtype=dtype)


def _normalize_or_keep(x: Tensor, previous: Tensor) -> Tensor:
    """``x / |x|``, or ``previous`` where ``x`` is zero (a zero weight must not zero the persistent vector)."""
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp(min=torch.finfo(x.dtype).tiny), previous)


def _validate(w: Tensor, u: Tensor | None, n_iter: int | None) -> None:
    check_float_tensor(w, "w", tuple(range(2, 9)), "[..., out, in]")
    if u is not None:
        check_float_tensor(u, "u", w.ndim - 1, "[..., out]")
        if u.shape != w.shape[:-1]:
            raise ValueError(f"u must have shape {tuple(w.shape[:-1])} ([..., out] of w), got {tuple(u.shape)}")
    if n_iter is not None and (not isinstance(n_iter, int) or n_iter < 0):
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")


def _spectral_norm_update(w: Tensor, u: Tensor | None = None, *, n_iter: int | None = None) -> Tensor:
    """Advance the left singular vector ``u`` by ``n_iter`` power steps (default: 1 warm, 100 cold); no sync."""
    _validate(w, u, n_iter)
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    weight = w.detach().to(dtype)
    if u is None:
        u = _initial_vector(tuple(w.shape[:-1]), dtype, w.device)
        steps = COLD_START_STEPS if n_iter is None else n_iter
    else:
        u = u.detach().to(dtype)
        steps = 1 if n_iter is None else n_iter
    v = torch.zeros(weight.shape[:-2] + weight.shape[-1:], dtype=dtype, device=w.device)
    with autocast_off(w.device):  # float32 products even inside the caller's autocast region
        for _ in range(steps):
            v = _normalize_or_keep((weight.mT @ u.unsqueeze(-1)).squeeze(-1), v)
            u = _normalize_or_keep((weight @ v.unsqueeze(-1)).squeeze(-1), u)
    return u


def _spectral_norm_compute(w: Tensor, u: Tensor) -> Tensor:
    """The estimate ``σ ≈ |Wᵀ u|`` for a unit vector ``u``."""
    weight = w.detach().to(u.dtype)
    with autocast_off(w.device):
        return (weight.mT @ u.unsqueeze(-1)).squeeze(-1).norm(dim=-1)


def spectral_norm(w: Tensor, *, u: Tensor | None = None, n_iter: int | None = None) -> tuple[Tensor, Tensor]:
    """Largest singular value of ``w`` by power iteration, with a vector to warm-start the next call.

    Args:
        w: weight ``[out, in]`` or a batch ``[..., out, in]``; computed in float32 (float64 for float64 input).
        u: left singular vector estimate ``[..., out]`` from a previous call; None starts cold (an all-zero vector
            is refused: checking it reads one flag from the device).
        n_iter: power steps; default 1 with ``u`` (a warm start) and 100 without.

    Returns:
        ``(sigma, u)``: ``sigma`` of shape ``[...]`` and the updated unit vector to pass next time.

    Example:
        >>> import torch
        >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> sigma, u = spectral_norm(w)
        >>> round(float(sigma), 5)
        3.0
    """
    if u is not None and isinstance(w, Tensor) and u.shape == w.shape[:-1] and not bool((u != 0).any(dim=-1).all()):
        raise ValueError("u holds an all-zero vector, which power iteration cannot turn (σ would read 0): pass "
                         "u=None to start cold, or the u a previous call returned")  # fmt: skip
    u = _spectral_norm_update(w, u, n_iter=n_iter)
    return _spectral_norm_compute(w, u), u
