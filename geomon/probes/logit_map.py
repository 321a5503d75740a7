"""σReparam diagnostics of attention layers: the spectral norm of each head's logit map, and the entropy lower bound.

Head ``h`` scores ``s_ij = scale · x_iᵀ W_Q,hᵀ W_K,h x_j``; its logit map ``A_h = W_Q,hᵀ W_K,h`` is ``D x D``, but
``σ(A_h) = σ(R_Q,h R_K,hᵀ)`` with ``W_Q,hᵀ = Q_Q,h R_Q,h`` and ``W_K,hᵀ = Q_K,h R_K,h`` (thin QR, ``R`` is
``Dh x Dh``), so nothing larger than ``D x Dh`` is formed: ``O(H·D·Dh²)`` FLOPs per layer, in float64.

With the largest ``|X Xᵀ|₂ = σ_max(X)²`` over the sequences entering the layer, Theorem 3.1 of Zhai et al. bounds
every row's entropy from below (:func:`geomon.functional.entropy_lower_bound`). The bound needs the logits to be
exactly that bilinear form: it is not reported for layers with rotary embeddings or QK-norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from geomon import keys
from geomon.capture._session import in_backward
from geomon.capture.modules import weight_out_in
from geomon.functional import entropy_lower_bound
from geomon.probes._sync import whole
from geomon.probes.base import Context, Probe, Step, Values


def head_count(module: nn.Module, default: int | None = None) -> int | None:
    """Query heads of an attention module as its attributes or config say, else ``default``."""
    for name in ("n_head", "num_heads", "num_attention_heads", "n_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    value = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return value if isinstance(value, int) else default


def _whole(weight: Tensor, gather: bool) -> Tensor:
    """A sharded ``DTensor`` (FSDP2) as the whole weight: gathered (a collective, every rank must call it at the same
    point) or, for a layout check, a meta tensor of its global shape (no communication)."""
    if gather or not hasattr(weight, "full_tensor"):
        return whole(weight)
    return torch.empty(weight.shape, dtype=weight.dtype, device="meta")


def qk_weights(module: nn.Module, *, gather: bool = True) -> tuple[Tensor, Tensor, float, bool] | None:
    """``(W_Q [H, Dh, D], W_K [Hk, Dh, D], scale, has_qk_norm)`` of an attention module whose layout is known
    (fused ``qkv``/``c_attn`` as in nanoGPT, timm and GPT-2; separate ``q_proj``/``k_proj``; ``in_proj_weight`` of
    ``nn.MultiheadAttention``), else ``None``. Sharded weights (FSDP2 ``DTensor``) are gathered whole, a collective;
    ``gather=False`` returns meta tensors of their shapes instead, for a layout check without communication."""
    heads = head_count(module)
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:
            return None
        w_q, w_k, _ = _whole(module.in_proj_weight.detach(), gather).chunk(3, dim=0)
        heads = module.num_heads
    elif hasattr(module, "q_proj") and hasattr(module, "k_proj") and heads is not None:
        w_q, w_k = _whole(weight_out_in(module.q_proj), gather), _whole(weight_out_in(module.k_proj), gather)
    elif isinstance(fused := getattr(module, "qkv", None) or getattr(module, "c_attn", None), nn.Module):
        weight = _whole(weight_out_in(fused), gather)
        if weight.shape[0] % 3 or heads is None:
            return None
        w_q, w_k, _ = weight.chunk(3, dim=0)
    else:
        return None
    head_dim = getattr(module, "head_dim", None) or w_q.shape[0] // heads
    if w_q.shape[0] != heads * head_dim or w_k.shape[0] % head_dim:
        return None
    scale = getattr(module, "scale", None) or getattr(module, "scaling", None)
    scale = float(scale) if isinstance(scale, (int, float)) else 1.0 / math.sqrt(head_dim)
    qk_norm = any(not isinstance(getattr(module, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm"))
    d = w_q.shape[1]
    return w_q.reshape(heads, head_dim, d), w_k.reshape(-1, head_dim, d), scale, qk_norm


def logit_map_sigma(w_q: Tensor, w_k: Tensor, scale: float) -> Tensor:
    """``σ(W_Q,hᵀ W_K,h) · scale`` per query head ``[H]`` (float64); query head ``h`` reads key head
    ``h // (H / Hk)``."""
    w_q, w_k = w_q.double(), w_k.double()
    w_k = w_k.repeat_interleave(w_q.shape[0] // w_k.shape[0], dim=0)
    r_q = torch.linalg.qr(w_q.transpose(1, 2)).R  # [H, Dh, Dh]
    r_k = torch.linalg.qr(w_k.transpose(1, 2)).R
    return torch.linalg.matrix_norm(r_q @ r_k.transpose(1, 2), 2) * scale


class LogitMapProbe(Probe):
    """``geomon/spectral/logit_sigma/<module>`` (largest over heads, per head in details) of an attention module
    with a known layout and, with ``bound=True``, ``geomon/spectral/entropy_bound/<module>`` from the inputs seen on
    the measured step (a forward pre-hook records ``max σ_max(X)²`` and the sequence length)."""

    kind = "logit_map"
    weight_based = True

    def __init__(self, name: str, *, bound: bool = False) -> None:
        super().__init__(name, ())
        self.bound = bound
        self.seen: tuple[Tensor, int, bool] | None = None  # (max |X|², sequence length, rotary) of the measured step

    @property
    def module(self) -> str | None:
        return self.name if self.bound else None

    def keys(self) -> list[str]:
        families = (keys.LOGIT_SIGMA, keys.ENTROPY_BOUND) if self.bound else (keys.LOGIT_SIGMA,)
        return [keys.key(family, self.name) for family in families]

    def arm(self, module: nn.Module, step: Step) -> list[RemovableHandle]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not in_backward():
                step.guard.run(f"entropy-bound input of {self.name!r}", self._record, module, args, kwargs)

        return [module.register_forward_pre_hook(hook, with_kwargs=True)]

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        if not isinstance(x, Tensor) or x.ndim != 3:
            return
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            x = x.transpose(0, 1)
        rotary = kwargs.get("position_embeddings") is not None or kwargs.get("rotary_pos_emb") is not None
        gram = torch.linalg.matrix_norm(x.detach().double(), 2).amax().square()
        if self.seen is not None:
            gram = torch.maximum(gram, self.seen[0])
        self.seen = (gram, x.shape[1], rotary)

    def compute(self, context: Context, out: Values) -> None:
        seen, self.seen = self.seen, None
        w_q, w_k, scale, qk_norm = qk_weights(context.modules[self.name])  # type: ignore[misc]
        sigma = logit_map_sigma(w_q, w_k, scale)
        key = keys.key(keys.LOGIT_SIGMA, self.name)
        out.scalars[key], out.details[key] = sigma.max(), sigma
        if self.bound and seen is not None and not seen[2] and not qk_norm and seen[1] > 1:
            out.scalars[keys.key(keys.ENTROPY_BOUND, self.name)] = entropy_lower_bound(sigma.max() * seen[0], seen[1])
