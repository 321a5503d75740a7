"""The σReparam layer (Zhai et al., ICML 2023): a linear map whose weight is ``Ŵ = γ · W / σ(W)``.

``σ(W)`` is estimated by power iteration with a persistent left singular vector ``u`` (one step per training-mode
forward, as in the paper) and is differentiated through ``W``: ``σ = uᵀ W v`` with ``u`` and ``v`` held constant,
whose gradient is ``u vᵀ``, the gradient of the top singular value. The power step and ``σ`` are computed in float32
(float64 for float64 weights) with autocast disabled; the matrix product then runs in the caller's (autocast) dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from geomon.functional._common import compute_dtype
from geomon.functional.spectral_norm import _initial_vector, _normalize_or_keep

#: Lanczos steps at conversion (matrix-vector products with ``W`` and ``Wᵀ``, each): see _top_left_singular_vector.
LANCZOS_STEPS = 128


class SigmaReparamLinear(nn.Module):
    """A linear layer reparametrised as ``y = x Ŵᵀ + b`` with ``Ŵ = γ · W / σ(W)`` (σReparam).

    Parameters: ``weight`` (the raw ``W``), ``bias`` (optional) and the learnable scalar ``gamma``. Buffers (both
    in ``state_dict``): ``u``, the left singular vector estimate ``[out_features]``, and ``sigma``, the estimate of
    ``σ(W)`` from the last training-mode forward (detached). In training mode every forward first takes
    ``n_power_iter`` power steps that update ``u`` (without gradient); in eval mode ``u`` is frozen, so eval outputs
    are deterministic. The starting ``u`` comes from a private fixed-seed generator: the global RNG is untouched.

    Use :meth:`from_linear` to convert an existing ``nn.Linear`` (or Hugging Face ``Conv1D``) without changing the
    function it computes: ``γ`` starts at ``σ(W₀)`` and ``u`` at the converged top singular vector.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        transposed: store ``weight`` as ``[in, out]`` and compute ``x @ W + b``, the layout of Hugging Face's
            ``Conv1D`` (GPT-2); ``σ`` is the same for ``W`` and ``Wᵀ``.
        n_power_iter: power steps per training-mode forward (the paper uses 1).
        device: where the parameters live.
        dtype: dtype of ``weight``, ``bias`` and ``gamma``.

    Example:
        >>> import torch
        >>> linear = torch.nn.Linear(8, 4)
        >>> layer = SigmaReparamLinear.from_linear(linear).eval()
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(layer(x), linear(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        transposed: bool = False,
        n_power_iter: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(n_power_iter, int) or isinstance(n_power_iter, bool) or n_power_iter < 1:
            raise ValueError(f"n_power_iter must be a positive integer, got {n_power_iter!r}")
        self.in_features, self.out_features = in_features, out_features
        self.transposed, self.n_power_iter = bool(transposed), n_power_iter
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.gamma = nn.Parameter(torch.ones((), **factory))
        buffer_dtype = compute_dtype(self.weight)
        self.register_buffer("u", torch.zeros(out_features, device=device, dtype=buffer_dtype))
        self.register_buffer("sigma", torch.ones((), device=device, dtype=buffer_dtype))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of ``W`` and ``b``, then ``γ = σ(W)`` so that ``Ŵ = W`` (uses the RNG)."""
        fresh = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            self.weight.copy_(fresh.weight.mT if self.transposed else fresh.weight)
            if self.bias is not None:
                self.bias.copy_(fresh.bias)
        self.reset_sigma()

    @torch.no_grad()
    def reset_sigma(self) -> None:
        """Set ``u`` to the top left singular vector of ``W`` and ``γ`` to ``σ(W)``: the effective weight is ``W``.

        ``u`` comes from a Lanczos bidiagonalisation (:func:`_top_left_singular_vector`); ``γ`` is set to the
        estimate that :meth:`forward` computes from this ``u``, which equals ``σ(W)`` to the compute dtype's
        precision and makes ``γ / σ`` exactly one, so the layer's function is unchanged.
        """
        with torch.autocast(self.weight.device.type, enabled=False):
            matrix = self._matrix().detach().to(compute_dtype(self.weight))
            if bool(matrix.isfinite().all()):
                self.u.copy_(_top_left_singular_vector(matrix))
            else:  # no singular vector to speak of
                self.u.copy_(_initial_vector((self.out_features,), torch.float64, matrix.device))
            sigma = self._sigma(matrix)
        self.gamma.copy_(sigma)
        self.sigma.copy_(sigma)

    @classmethod
    def from_linear(cls, linear: nn.Module, n_power_iter: int = 1) -> SigmaReparamLinear:
        """A σReparam copy of ``linear`` (``nn.Linear`` or ``transformers``' ``Conv1D``) computing the same function.

        ``W`` and ``b`` are copied (same device, dtype and ``requires_grad``; ``γ`` requires grad when ``W`` does, so
        a frozen layer stays frozen); ``u`` is the converged top singular vector and ``γ = σ(W₀)``. The copy takes
        ``linear``'s mode (``training``): a layer converted in eval mode stays in eval mode, where ``u`` is frozen and
        the output equals ``linear``'s. The global RNG is not consumed.
        """
        if isinstance(linear, nn.Linear):
            in_features, out_features, transposed = linear.in_features, linear.out_features, False
        elif _is_conv1d(linear):
            in_features, out_features, transposed = linear.weight.shape[0], linear.weight.shape[1], True
        else:
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            transposed=transposed,
            n_power_iter=n_power_iter,
            device="meta",
            dtype=weight.dtype,
        )
        layer.weight = _copy_parameter(weight)
        layer.bias = None if linear.bias is None else _copy_parameter(linear.bias)
        layer.gamma = nn.Parameter(torch.ones((), device=weight.device, dtype=weight.dtype))
        buffer_dtype = compute_dtype(weight)
        layer.u = torch.zeros(out_features, device=weight.device, dtype=buffer_dtype)
        layer.sigma = torch.ones((), device=weight.device, dtype=buffer_dtype)
        layer.reset_sigma()
        layer.gamma.requires_grad_(weight.requires_grad)
        return layer.train(linear.training)

    def _matrix(self) -> Tensor:
        """``W`` as ``[out, in]`` (a view: gradients flow to ``weight``)."""
        return self.weight.mT if self.transposed else self.weight

    def _sigma(self, matrix: Tensor) -> Tensor:
        """``σ = uᵀ W v = |Wᵀ u|`` with ``v = Wᵀu / |Wᵀu|``; ``u`` and ``v`` constant, gradient ``u vᵀ`` into ``W``."""
        u = self.u.to(matrix.dtype, copy=True)  # a copy: a later forward's power step must not touch saved tensors
        wtu = matrix.mT @ u
        v = _normalize_or_keep(wtu.detach(), torch.zeros_like(wtu))
        return wtu @ v

    @torch.no_grad()
    def _power_step(self, matrix: Tensor) -> None:
        u = self.u.to(matrix.dtype)
        v = torch.zeros(matrix.shape[1], device=matrix.device, dtype=matrix.dtype)
        for _ in range(self.n_power_iter):
            v = _normalize_or_keep(matrix.mT @ u, v)
            u = _normalize_or_keep(matrix @ v, u)
        self.u.copy_(u)

    def estimate_sigma(self) -> Tensor:
        """``σ(W)`` from the current ``u`` with gradient through ``W`` (no power step, no buffer written)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return self._sigma(self._matrix().to(compute_dtype(self.weight)))

    def effective_weight(self) -> Tensor:
        """``Ŵ = γ · W / σ(W)`` in ``weight``'s layout and dtype, from the current ``u`` (no power step)."""
        return self._effective_weight(update=False)

    def _effective_weight(self, update: bool) -> Tensor:
        dtype = compute_dtype(self.weight)
        with torch.autocast(self.weight.device.type, enabled=False):
            weight = self.weight.to(dtype)
            matrix = weight.mT if self.transposed else weight
            if update:
                self._power_step(matrix.detach())
            sigma = self._sigma(matrix)
            if update:
                self.sigma.copy_(sigma.detach())
            zero = sigma == 0  # a zero weight: Ŵ = 0, without 0/0 (NaN still propagates)
            scale = torch.where(zero, 0.0, self.gamma.to(dtype) / torch.where(zero, 1.0, sigma))
            return (weight * scale).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x Ŵᵀ + b`` (``x Ŵ + b`` when transposed); a training-mode call first advances ``u``."""
        weight = self._effective_weight(update=self.training)
        if not self.transposed:
            return nn.functional.linear(x, weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])  # the exact operations of transformers' Conv1D
        out = flat @ weight if self.bias is None else torch.addmm(self.bias, flat, weight)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"transposed={self.transposed}, n_power_iter={self.n_power_iter}"
        )


def _top_left_singular_vector(matrix: Tensor) -> Tensor:
    """The unit top left singular vector (float64) of ``matrix`` ``[out, in]``, by matrix-vector products only.

    Golub–Kahan–Lanczos bidiagonalisation with full reorthogonalisation, started from the private fixed-seed vector:
    ``LANCZOS_STEPS`` products with ``W`` and ``Wᵀ`` (exact when ``min(out, in)`` is smaller: the start vector is
    taken in the row space of ``W``, so the Krylov space never spends a step on its null space). Where power iteration
    stalls on the tiny gap ``σ₂/σ₁`` of a randomly initialised weight, this reaches the precision of the products
    (float32 for all but float64 weights) even for a random 2048 x 2048 matrix, without the cost of a full SVD.
    """
    out_features, in_features = matrix.shape
    steps = min(LANCZOS_STEPS, out_features, in_features)
    tolerance = 1e-12 * float(matrix.norm())
    left = torch.zeros(steps, out_features, dtype=torch.float64, device=matrix.device)
    right = torch.zeros(steps, in_features, dtype=torch.float64, device=matrix.device)
    start = (matrix.mT @ _initial_vector((out_features,), matrix.dtype, matrix.device)).double()
    start_norm = start.norm()
    if float(start_norm) <= tolerance:  # a zero weight (or a start vector in its left null space)
        return _initial_vector((out_features,), torch.float64, matrix.device)
    right[0] = start / start_norm
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for j in range(steps):
        u = _orthogonalize((matrix @ right[j].to(matrix.dtype)).double(), left[:j])
        alpha = u.norm()
        if float(alpha) <= tolerance:
            break
        left[j], alphas = u / alpha, [*alphas, alpha]
        if j + 1 == steps:
            break
        v = _orthogonalize((matrix.mT @ left[j].to(matrix.dtype)).double(), right[: j + 1])
        beta = v.norm()
        if float(beta) <= tolerance:
            break
        right[j + 1], betas = v / beta, [*betas, beta]
    k = len(alphas)
    if k == 0:  # a zero weight (or a start vector in its null space)
        return _initial_vector((out_features,), torch.float64, matrix.device)
    bidiagonal = torch.diag(torch.stack(alphas))
    if k > 1:  # a Krylov space that closed after one step (a rank-one weight) has no superdiagonal
        bidiagonal = bidiagonal + torch.diag(torch.stack(betas[: k - 1]), 1)
    top = torch.linalg.svd(bidiagonal)[0][:, 0] @ left[:k]
    return top / top.norm()


def _orthogonalize(x: Tensor, basis: Tensor) -> Tensor:
    """``x`` minus its projection on the orthonormal rows of ``basis``, twice (twice is enough)."""
    for _ in range(2):
        x = x - basis.mT @ (basis @ x)
    return x


def _copy_parameter(parameter: Tensor) -> nn.Parameter:
    return nn.Parameter(parameter.detach().clone(), requires_grad=parameter.requires_grad)


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly ``transformers.pytorch_utils.Conv1D`` (checked without importing transformers)."""
    import sys

    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and type(module) is getattr(pytorch_utils, "Conv1D", None)
