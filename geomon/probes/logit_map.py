"""σReparam diagnostics of attention layers: the spectral norm of each head's logit map, and the entropy lower bound.

Head ``h`` scores ``s_ij = scale · x_iᵀ W_Q,hᵀ W_K,h x_j``; its logit map ``A_h = W_Q,hᵀ W_K,h`` is ``D x D``, but
``σ(A_h) = σ(R_Q,h R_K,hᵀ)`` with ``W_Q,hᵀ = Q_Q,h R_Q,h`` and ``W_K,hᵀ = Q_K,h R_K,h`` (thin QR, ``R`` is
``Dh x Dh``), so nothing larger than ``D x Dh`` is formed: ``O(H·D·Dh²)`` FLOPs per layer, in float64
(:func:`logit_map_sigma`, the exact form). ``logit_sigma`` is logged by warm-started power iteration instead, as
:func:`geomon.functional.spectral_norm` does for a weight (:func:`logit_map_sigma_power`): the first compute takes
the exact form and keeps each head's left singular vector ``u_h`` (``[H, D]``, in the probe's state and
checkpoints); each later one advances ``u_h`` by a few power steps through matrix-vector products
``A_h v = W_Q,hᵀ (W_K,h v)`` (:attr:`LogitMapProbe.power_steps` steps of ``4·D·Dh`` multiply-adds per head, nothing
of size ``D x D``, no QR or SVD, no host sync unless :attr:`LogitMapProbe.power_tol` asks for a convergence check), and
logs ``σ_h ≈ |A_hᵀ u_h|``, a lower bound that converges to ``σ_h``: the warm start tracks weights that move a little
between computes, as training moves them. ``LogitMapProbe.method = "exact"`` (class-wide, or on
one probe) logs the exact form on every compute instead. The entropy bound below
always uses the exact form: a bound must not rest on an estimate from below.

With rotary position embeddings the logits are ``x_iᵀ W_Qᵀ R_{j-i} W_K x_j`` (``R_r`` a rotation by the offset):
every offset has its own logit map, whose norm differs from ``σ(W_Qᵀ W_K)`` (the map at offset 0 only), so for such
layers (a ``rope`` / ``position_embeddings`` / ``rotary_pos_emb`` / ``freqs_cis`` argument seen in a forward) the
logit-map σ is not logged, with one warning.

The entropy bound (Theorem 3.1 of Zhai et al., :func:`geomon.functional.entropy_lower_bound`) holds for rows whose
logits are exactly ``x_iᵀ M x_j`` over the same ``T`` keys ``x_j`` that the row's own ``x_i`` is one of: then
``|a_i| <= |M| |X|² ``. geomon logs it only where the measured step shows exactly that:

- Q/K projection biases are folded in exactly: ``x' = [x, 1]`` and ``W_Q' = [W_Q, b_Q]``; the key bias only adds
  ``q_i · b_K`` to every logit of row ``i``, which softmax ignores, so ``W_K' = [W_K, 0]``. The bound then uses
  ``σ(W_Q'ᵀ W_K')`` and ``|X' X'ᵀ|₂``.
- Causal rows are not covered by a layer-wide value: row ``i`` sees ``i`` keys, its bound is that of ``(σ_i, i)``,
  which grows with the key count, and the first row (one key, entropy 0) leaves 0 as the only value below every row.
- Masks and additive terms (padding, ALiBi, relative position biases), rotary embeddings, QK-norm, keys that are
  not the layer's own input (cross-attention, caches, extra key tokens) are outside the theorem.

Whether a layer qualifies is read off the measured step: its forward's arguments (pre-hook) and the attention
computations the capture attributes to it (causal flag, mask, query and key counts); a layer with no captured
computation on the step has nothing to check and gets no bound. Each reason is said once, naming the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks
from torch.utils.hooks import RemovableHandle

from geomon import keys
from geomon._guard import Guard
from geomon._reparam_layer import SigmaReparamLinear
from geomon.capture._session import AttentionCall, in_backward
from geomon.capture.modules import HEAD_COUNT_ATTRIBUTES, head_count, linear_like, weight_out_in
from geomon.functional import entropy_lower_bound
from geomon.functional.spectral_norm import _normalize_or_keep
from geomon.probes._sync import multi_process, whole
from geomon.probes.base import Context, Probe, Step, Values

#: Forward arguments that carry rotary position embeddings (timm EVA ``rope``, Hugging Face ``position_embeddings``,
#: ``rotary_pos_emb`` / ``freqs_cis`` of other implementations).
ROTARY_ARGUMENTS = ("rope", "position_embeddings", "rotary_pos_emb", "freqs_cis", "rotary_emb")
#: Forward arguments that carry the keys' source when it is not the module's input (cross-attention).
KEY_SOURCE_ARGUMENTS = ("key_value_states", "encoder_hidden_states")


def _whole(weight: Tensor, gather: bool) -> Tensor:
    """A sharded ``DTensor`` (FSDP2) as the whole weight: gathered (a collective, every rank must call it at the same
    point) or, for a layout check, a meta tensor of its global shape (no communication)."""
    if gather or not hasattr(weight, "full_tensor"):
        return whole(weight)
    return torch.empty(weight.shape, dtype=weight.dtype, device="meta")


class QKLayout(NamedTuple):
    """The query and key projections of an attention module, per head."""

    w_q: Tensor  #: [H, Dh, D]
    w_k: Tensor  #: [Hk, Dh, D], Hk dividing H
    scale: float  #: softmax scale
    qk_norm: bool  #: queries and keys are normalised after the projection
    b_q: Tensor | None  #: [H, Dh] query bias, if any
    b_k: Tensor | None  #: [Hk, Dh] key bias, if any (softmax ignores it: see the module docstring)


def _module(module: nn.Module, name: str) -> nn.Module | None:
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Module) else None


def _bias(module: nn.Module | None, gather: bool) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return _whole(bias.detach(), gather) if isinstance(bias, Tensor) else None


def _tensor(module: nn.Module, name: str, gather: bool) -> Tensor | None:
    value = getattr(module, name, None)
    return _whole(value.detach(), gather) if isinstance(value, Tensor) else None


def looks_like_attention(module: nn.Module) -> bool:
    """The module has the projections :func:`qk_layout` reads (fused ``qkv`` / ``c_attn``, ``q_proj`` and
    ``k_proj``, or ``nn.MultiheadAttention``), whether or not their layout is understood."""
    return (
        isinstance(module, nn.MultiheadAttention)
        or _module(module, "qkv") is not None
        or _module(module, "c_attn") is not None
        or (_module(module, "q_proj") is not None and _module(module, "k_proj") is not None)
    )


def qk_layout(module: nn.Module, *, gather: bool = True) -> QKLayout | str | None:
    """The query/key projections of ``module`` (:class:`QKLayout`); a string saying why not for a module that looks
    like attention (:func:`looks_like_attention`) whose layout is not understood; ``None`` for any other module.

    Layouts: ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight``); separate
    ``q_proj`` / ``k_proj`` (Hugging Face, timm EVA); fused ``qkv`` / ``c_attn`` (nanoGPT, timm, GPT-2), with the
    biases of the fused layer or separate ``q_bias`` / ``k_bias`` (timm EVA). A module with a ``logit_scale`` tensor
    (Swin V2's cosine attention) has no logit map of its weights: said, not read. Sharded weights (FSDP2 ``DTensor``)
    are gathered whole, a collective; ``gather=False`` returns meta tensors of their shapes instead, for a layout
    check without communication."""
    if not looks_like_attention(module):
        return None
    if isinstance(getattr(module, "logit_scale", None), Tensor):
        return ("it computes cosine attention (Swin V2: normalised queries and keys times a learned per-head "
                "logit_scale), whose logits are bounded by that scale, not by σ(W_Qᵀ W_K)")  # fmt: skip
    heads = head_count(module)
    if isinstance(module, nn.MultiheadAttention):
        heads = module.num_heads
        bias = _tensor(module, "in_proj_bias", gather)
        b_q, b_k = (None, None) if bias is None else bias.chunk(3, dim=0)[:2]
        if module.in_proj_weight is not None:
            w_q, w_k, _ = _whole(module.in_proj_weight.detach(), gather).chunk(3, dim=0)
        elif module.q_proj_weight is not None and module.k_proj_weight is not None:
            w_q = _whole(module.q_proj_weight.detach(), gather)
            w_k = _whole(module.k_proj_weight.detach(), gather)
        else:
            return "nn.MultiheadAttention without query/key projection weights"
    elif (q_proj := _module(module, "q_proj")) is not None and (k_proj := _module(module, "k_proj")) is not None:
        unread = _not_linear(q_proj) or _not_linear(k_proj)
        if unread:
            return unread
        w_q, w_k = _whole(weight_out_in(q_proj), gather), _whole(weight_out_in(k_proj), gather)
        b_q, b_k = _bias(q_proj, gather), _bias(k_proj, gather)
    else:
        fused = _module(module, "qkv") or _module(module, "c_attn")
        assert fused is not None
        unread = _not_linear(fused)
        if unread:
            return unread
        weight = _whole(weight_out_in(fused), gather)
        if weight.ndim != 2 or weight.shape[0] % 3:
            return f"its fused projection's weight has shape {tuple(weight.shape)}, not [3·H·Dh, D]"
        w_q, w_k, _ = weight.chunk(3, dim=0)
        bias = _bias(fused, gather)
        b_q, b_k = (None, None) if bias is None else bias.chunk(3, dim=0)[:2]
        if bias is None:  # timm EVA: q_bias, k_bias next to a bias-free fused qkv
            b_q, b_k = _tensor(module, "q_bias", gather), _tensor(module, "k_bias", gather)
    if heads is None:
        return f"its head count is not known (no {' / '.join(HEAD_COUNT_ATTRIBUTES)} attribute or config)"
    if w_q.ndim != 2 or w_k.ndim != 2 or w_q.shape[1] != w_k.shape[1]:
        return f"its query and key weights have shapes {tuple(w_q.shape)} and {tuple(w_k.shape)}"
    head_dim = getattr(module, "head_dim", None)
    head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 else w_q.shape[0] // heads
    if head_dim == 0 or w_q.shape[0] != heads * head_dim or w_k.shape[0] % head_dim or not w_k.shape[0]:
        return f"its query/key weights ({tuple(w_q.shape)}, {tuple(w_k.shape)}) do not split into {heads} heads"
    hk = w_k.shape[0] // head_dim
    if heads % hk:
        return f"its {heads} query heads do not share {hk} key heads evenly"
    for b, w in ((b_q, w_q), (b_k, w_k)):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            return f"a query/key bias has shape {tuple(b.shape)}, not ({w.shape[0]},)"
    scale = _softmax_scale(module, head_dim)
    if isinstance(scale, str):
        return scale
    qk_norm = any(not isinstance(getattr(module, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm"))
    d = w_q.shape[1]
    return QKLayout(
        w_q.reshape(heads, head_dim, d),
        w_k.reshape(hk, head_dim, d),
        scale,
        qk_norm,
        None if b_q is None else b_q.reshape(heads, head_dim),
        None if b_k is None else b_k.reshape(hk, head_dim),
    )


def _not_linear(projection: nn.Module) -> str | None:
    """Why a query/key projection's weight cannot be read as ``[out, in]`` (None when it can)."""
    if isinstance(projection, SigmaReparamLinear) or linear_like(projection):
        return None
    return (f"its query/key projection is a {type(projection).__name__}, not a layer with a 2-D weight that geomon "
            "reads as W")  # fmt: skip


def _softmax_scale(module: nn.Module, head_dim: int) -> float | str:
    """The factor on ``q·k``: a numeric ``scale`` / ``scaling`` attribute, else ``1 / √Dh``; a string saying why
    not for a boolean one whose meaning is not known. A bool is a switch, never a number: Hugging Face OpenAI-GPT's
    ``Attention.scale`` is ``True`` for "divide by ``√Dh``" and ``False`` for no scaling."""
    for name in ("scale", "scaling"):
        value = getattr(module, name, None)
        if isinstance(value, bool):
            if type(module).__module__ == "transformers.models.openai.modeling_openai":
                return 1.0 / math.sqrt(head_dim) if value else 1.0
            return f"its {name!r} attribute is a bool ({value}), a switch whose scale is not known"
        if isinstance(value, (int, float)):
            return float(value)
    return 1.0 / math.sqrt(head_dim)


def qk_weights(module: nn.Module, *, gather: bool = True) -> tuple[Tensor, Tensor, float, bool] | None:
    """``(W_Q [H, Dh, D], W_K [Hk, Dh, D], scale, has_qk_norm)`` of an attention module whose layout is known (see
    :func:`qk_layout`), else ``None``."""
    layout = qk_layout(module, gather=gather)
    return tuple(layout[:4]) if isinstance(layout, QKLayout) else None  # type: ignore[return-value]


def logit_map_sigma(w_q: Tensor, w_k: Tensor, scale: float) -> Tensor:
    """``σ(W_Q,hᵀ W_K,h) · scale`` per query head ``[H]`` (float64); query head ``h`` reads key head
    ``h // (H / Hk)``."""
    w_q, w_k = w_q.double(), w_k.double()
    w_k = w_k.repeat_interleave(w_q.shape[0] // w_k.shape[0], dim=0)
    r_q = torch.linalg.qr(w_q.transpose(1, 2)).R  # [H, Dh, Dh]
    r_k = torch.linalg.qr(w_k.transpose(1, 2)).R
    return torch.linalg.matrix_norm(r_q @ r_k.transpose(1, 2), 2) * scale


def _logit_map_svd(w_q: Tensor, w_k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The exact form of :func:`logit_map_sigma`, with each head's left singular vector ``[H, D]``:
    ``A_h = Q_Q,h (R_Q,h R_K,hᵀ) Q_K,hᵀ``, so ``u_h = Q_Q,h`` times the first left singular vector of the small
    factor."""
    w_q, w_k = w_q.double(), w_k.double()
    w_k = w_k.repeat_interleave(w_q.shape[0] // w_k.shape[0], dim=0)
    q_q, r_q = torch.linalg.qr(w_q.transpose(1, 2))
    r_k = torch.linalg.qr(w_k.transpose(1, 2)).R
    left, sigma, _ = torch.linalg.svd(r_q @ r_k.transpose(1, 2))
    return sigma[:, 0] * scale, (q_q @ left[..., :1]).squeeze(-1)


def _power_steps(w_q: Tensor, w_k: Tensor, u: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``steps`` power steps on every head's ``A_h = W_Q,hᵀ W_K,h`` from the unit rows ``u [H, D]``; returns the new
    ``u`` and the estimate ``|A_hᵀ u_h|`` at it (``[H]``). Every product is a row vector times a weight (``[1, Dh]``
    times ``[Dh, D]``, or against its transposed view), and the ``G`` query heads of a key head are one ``[G, Dh]``
    times ``[Dh, D]`` product with that key head's weight: nothing is copied or expanded."""
    h, dh, d = w_q.shape
    hk = w_k.shape[0]
    rows = u.unsqueeze(1)  # [H, 1, D]

    def transposed(rows: Tensor) -> Tensor:  # A_hᵀ u_h = W_K,hᵀ (W_Q,h u_h), unnormalised, [H, 1, D]
        queries = torch.bmm(rows, w_q.mT).reshape(hk, h // hk, dh)
        return torch.bmm(queries, w_k).reshape(h, 1, d)

    v = torch.zeros_like(rows)
    for _ in range(steps):
        v = _normalize_or_keep(transposed(rows), v)
        keys_ = torch.bmm(v.reshape(hk, h // hk, d), w_k.mT).reshape(h, 1, dh)  # W_K,h v_h
        rows = _normalize_or_keep(torch.bmm(keys_, w_q), rows)  # A_h v_h = W_Q,hᵀ (W_K,h v_h)
    return rows.squeeze(1), transposed(rows).squeeze(1).norm(dim=-1)


def logit_map_sigma_power(
    w_q: Tensor,
    w_k: Tensor,
    scale: float,
    u: Tensor | None = None,
    *,
    steps: int = 4,
    tol: float | None = None,
    max_steps: int = 16,
) -> tuple[Tensor, Tensor]:
    """``σ(W_Q,hᵀ W_K,h) · scale`` per query head ``[H]`` by warm-started power iteration through matrix-vector
    products (module docstring), and the vectors ``[H, D]`` to pass next time. The products run in float32 (float64
    for float64 weights: a float32 estimate is good to about 1e-6 relative); the value is returned as float64.

    ``u=None`` (a cold start) takes the exact form's singular vectors (:func:`logit_map_sigma`'s QR + SVD, once).
    A warm start takes ``steps`` power steps and never syncs; with ``tol``, more blocks of ``steps`` follow while
    some head's estimate still moved by more than ``tol`` (relative) over the last block, up to ``max_steps`` in all
    (each check reads one flag on the host). Query head ``h`` reads key head ``h // (H / Hk)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w_q, w_k = (torch.randn(h, 8, 32, generator=g, dtype=torch.float64) for h in (4, 2))
        >>> sigma, u = logit_map_sigma_power(w_q, w_k, 0.5)  # cold: the exact value and its vectors
        >>> w_q = w_q + 1e-3 * torch.randn(w_q.shape, generator=g, dtype=torch.float64)  # a training step
        >>> sigma, u = logit_map_sigma_power(w_q, w_k, 0.5, u)  # warm: a few matrix-vector products
        >>> exact = logit_map_sigma(w_q, w_k, 0.5)
        >>> bool(((exact - sigma) / exact).abs().max() < 1e-5), bool((sigma <= exact * (1 + 1e-12)).all())
        (True, True)
    """
    if u is None:
        return _logit_map_svd(w_q, w_k, scale)
    dtype = torch.float64 if torch.float64 in (w_q.dtype, w_k.dtype) else torch.float32  # no copy of fp32 weights
    w_q, w_k = w_q.detach().to(dtype), w_k.detach().to(dtype)
    u = u.detach().to(device=w_q.device, dtype=dtype)
    before = None if tol is None else _power_steps(w_q, w_k, u, 0)[1]
    done = 0
    while True:
        u, after = _power_steps(w_q, w_k, u, steps)
        done += steps
        if before is None or done >= max_steps or bool(((after - before).abs() <= tol * after).all()):
            return after.double() * scale, u
        before = after


def bound_sigma(layout: QKLayout) -> Tensor:
    """Per query head, ``σ`` of the logit map that Theorem 3.1 needs, biases folded in (module docstring): with a
    query bias, ``σ([W_Q, b_Q]ᵀ [W_K, 0]) · scale``, to be multiplied by ``|[X, 1]|₂²``; else the logit-map σ."""
    if layout.b_q is None:
        return logit_map_sigma(layout.w_q, layout.w_k, layout.scale)
    w_q = torch.cat([layout.w_q.double(), layout.b_q.double()[..., None]], dim=-1)
    w_k = torch.cat([layout.w_k.double(), torch.zeros_like(layout.w_k[..., :1], dtype=torch.float64)], dim=-1)
    return logit_map_sigma(w_q, w_k, layout.scale)


@dataclass
class _Measured:
    """What one measured step showed of a layer (see the module docstring)."""

    #: per forward: (its input X [B, T, D], detached, not copied; X's version counter then; T)
    inputs: list[tuple[Tensor, int, int]] = field(default_factory=list)
    augmented: bool = False  #: the inputs carry the constant coordinate of a query bias
    why: str | None = None  #: a reason read off the forward's arguments
    calls: int = 0
    causal: bool = False
    masked: Tensor | None = None  #: a bool tensor: some call's mask excludes or shifts a logit
    counts: set[tuple[int, int]] = field(default_factory=set)  #: (queries, keys) of the calls
    scales: set[float] = field(default_factory=set)


def _mask_matters(mask: Tensor) -> Tensor:
    """A 0-dim bool tensor (no host sync): the SDPA-convention mask changes some logit."""
    if mask.dtype == torch.bool:
        return ~mask.all()
    return (mask != 0).any()


def _input_gram(x: Tensor, augmented: bool, chunk: int = 64) -> Tensor:
    """``max_b |X_b|₂²`` over the sequences of ``x [B, T, D]`` in float64, ``X_b`` with a constant 1 column appended
    when ``augmented`` (a query bias folded in); ``chunk`` sequences at a time, so the float64 copy stays small."""
    out = []
    for part in x.split(chunk):
        part = part.double()
        if augmented:
            part = torch.cat([part, torch.ones_like(part[..., :1])], dim=-1)
        out.append(torch.linalg.matrix_norm(part, 2).amax())
    return torch.stack(out).amax().square()


class LogitMapProbe(Probe):
    """``geomon/spectral/logit_sigma/<module>`` (largest over heads, per head in details) of an attention module
    with a known layout and, with ``bound=True``, ``geomon/spectral/entropy_bound/<module>`` where Theorem 3.1 holds
    on the measured step (module docstring); a forward pre-hook keeps a reference to the measured forwards' inputs
    (no copy, no work: their ``max σ_max(X)²`` is an SVD, taken at compute time, where a host sync is allowed) and
    records what the arguments show (rotary embeddings, a separate key source). The inputs are held until the next
    compute (one activation per layer and measured forward); one modified in place after its forward gets no bound."""

    kind = "logit_map"
    weight_based = True
    #: how ``logit_sigma`` is computed: ``"power"``, warm-started power iteration (module docstring), or
    #: ``"exact"``, :func:`logit_map_sigma` (float64 QR + SVD) on every compute
    method: ClassVar[Literal["power", "exact"]] = "power"
    #: power steps per block (see :func:`logit_map_sigma_power`; the first compute takes the exact form's vectors)
    power_steps: ClassVar[int] = 4
    #: ``None``: one block per compute, no host sync; a float: blocks repeat while an estimate moves by more than
    #: this (relative), up to 16 steps (see :func:`logit_map_sigma_power`)
    power_tol: ClassVar[float | None] = None

    def __init__(self, name: str, *, bound: bool = False, query_bias: bool = False) -> None:
        super().__init__(name, ())
        self.bound = bound
        self.query_bias = query_bias  #: record |[X, 1]|₂², the inputs of a query bias folded in
        self.seen = _Measured()
        self.rotary: str | None = None  #: the rotary argument a forward was seen with (sticky)
        self.u: Tensor | None = None  #: per query head, the power iteration's left singular vector [H, D]

    @property
    def module(self) -> str | None:
        return self.name

    def keys(self) -> list[str]:
        families = (keys.LOGIT_SIGMA, keys.ENTROPY_BOUND) if self.bound else (keys.LOGIT_SIGMA,)
        return [keys.key(family, self.name) for family in families]

    def arm(self, module: nn.Module, step: Step) -> list[RemovableHandle]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not in_backward():
                step.ran.add(self.module)
                step.guard.run(f"logit-map input of {self.name!r}", self._record, module, args, kwargs)

        if isinstance(module, nn.MultiheadAttention):
            # A hook of its own would move nn.TransformerEncoderLayer off its fused inference path (it checks its
            # self_attn's hook dictionaries): watch it through a global hook instead. It is called positionally
            # (query, key, value) by torch's layers, and takes no rotary arguments.
            target = module

            def global_hook(called: nn.Module, args: tuple) -> None:
                if called is target:
                    hook(called, args, {})

            return [_module_hooks.register_module_forward_pre_hook(global_hook)] if self.bound else []
        return [module.register_forward_pre_hook(hook, with_kwargs=True)]

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen = self.seen
        rotary = next((n for n in ROTARY_ARGUMENTS if kwargs.get(n) is not None), None)
        if rotary is not None:
            self.rotary = self.rotary or rotary
            seen.why = seen.why or f"rotary position embeddings (argument {rotary!r}) rotate its queries and keys"
        if not self.bound:
            return
        source = next((n for n in KEY_SOURCE_ARGUMENTS if kwargs.get(n) is not None), None)
        if source is not None:
            seen.why = seen.why or f"its keys come from argument {source!r}, not from its input alone"
        x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states", kwargs.get("query"))
        if isinstance(module, nn.MultiheadAttention):
            if module.bias_k is not None or module.add_zero_attn:
                seen.why = seen.why or "bias_k / add_zero_attn append keys that are not its input"
            if (args[1] if len(args) >= 2 else kwargs.get("key")) is not x:
                seen.why = seen.why or "it is called with a key that is not its query input (cross-attention)"
        if not isinstance(x, Tensor) or x.ndim != 3:
            seen.why = seen.why or "its input is not a [batch, sequence, width] tensor"
            return
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            x = x.transpose(0, 1)
        # no work here: |X|₂ is an SVD, a host sync on CUDA; the rows are read at compute time (_input_gram)
        seen.augmented = self.query_bias
        seen.inputs.append((x.detach(), x._version, x.shape[1]))

    def note_call(self, call: AttentionCall) -> None:
        """Record an attention computation that the capture attributed to this module on the measured step."""
        if not self.bound:
            return
        seen = self.seen
        seen.calls += 1
        seen.causal |= call.is_causal
        masks = [] if call.attn_mask is None else [_mask_matters(call.attn_mask)]
        if call.pattern is not None:  # a rule over positions (bottom-right causal, window, the module's own masks)
            masks.append(torch.ones((), dtype=torch.bool, device=call.q.device))
        for matters in masks:
            seen.masked = matters if seen.masked is None else seen.masked | matters
        seen.counts.add((call.q.shape[-2], call.k.shape[-2]))
        seen.scales.add(call.scale if call.scale is not None else 1.0 / math.sqrt(call.q.shape[-1]))

    def note_scores(self) -> None:
        """Record attention read at the module's own softmax: its scores hold terms (masks, biases, a scale) that
        cannot be told apart from ``q·k`` there, so no row of it is shown to be bounded."""
        if self.bound:
            self.seen.calls += 1
            self.seen.why = self.seen.why or (
                "its attention was read at its own softmax, whose scores may hold terms besides q·k (a mask, a bias) "
                "that geomon cannot tell apart"
            )

    def _unbounded(self, seen: _Measured, layout: QKLayout) -> str | None:
        """Why Theorem 3.1 does not bound this layer's rows on the measured step, or ``None`` if it does."""
        if seen.why is not None:
            return seen.why
        if layout.qk_norm:
            return "QK-norm normalises its queries and keys after the projection"
        if not seen.inputs:
            return "its forward was not called with a [batch, sequence, width] input on the measured step"
        if not seen.calls:
            return ("no attention computation of it was captured on the measured step (attention=False, or a "
                    "path geomon does not capture): nothing shows that every row sees all T keys unmasked")  # fmt: skip
        if seen.causal:
            return ("its rows are causal: row i sees i keys, so a bound for T keys is not one for them, and the "
                    "only value below every row is 0 (the first row has one key and entropy 0)")  # fmt: skip
        if any(x._version != version for x, version, _ in seen.inputs):
            return "its input was modified in place after its forward, so the rows it attended over are gone"
        lengths = {t for _, _, t in seen.inputs}
        if any(nq != nk or nk not in lengths for nq, nk in seen.counts):
            return (f"its computations' (query, key) counts {sorted(seen.counts)} are not its input lengths "
                    f"{sorted(lengths)} (a cache, extra keys or cross-attention)")  # fmt: skip
        if any(not math.isclose(s, layout.scale, rel_tol=1e-6) for s in seen.scales):
            return f"its softmax scale {sorted(seen.scales)} is not the module's {layout.scale:g}"
        if seen.masked is not None and bool(seen.masked):
            return "a mask or additive term (causal or padding mask, ALiBi, relative position bias) changes its logits"
        if layout.b_q is not None and not seen.augmented:
            return "it has a query bias that it did not have at attach"
        return None

    def _sigma(self, layout: QKLayout) -> Tensor:
        """The logit-map σ per head, by :attr:`method`."""
        if self.method == "exact":
            return logit_map_sigma(layout.w_q, layout.w_k, layout.scale)
        expected = (layout.w_q.shape[0], layout.w_q.shape[2])
        warm = self.u is not None and tuple(self.u.shape) == expected
        sigma, self.u = logit_map_sigma_power(layout.w_q, layout.w_k, layout.scale, self.u if warm else None,
                                              steps=self.power_steps, tol=self.power_tol)  # fmt: skip
        return sigma

    def state_dict(self) -> dict[str, Any]:
        return {} if self.u is None else {"u": self.u.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        u = state.get("u") if state else None
        self.u = None if u is None else u.clone()

    def compute(self, context: Context, out: Values) -> None:
        seen, self.seen = self.seen, _Measured()
        layout = qk_layout(context.modules[self.name])
        if not isinstance(layout, QKLayout):
            context.guard.warn_once(f"logit_map:{self.name}", f"geomon: the logit map of {self.name!r} is not "
                                    f"logged: {layout or 'its query/key projections are gone'}")  # fmt: skip
            return
        why, bound = None, None
        if self.bound and self.rotary is None:
            try:  # whatever happens here, every rank must reach the agreement below
                why, bound = self._local_bound(seen, layout)
            except Exception as error:
                if context.guard.strict and not multi_process():
                    raise
                why = f"computing it failed ({error!r})"
        if self.bound and multi_process():  # one small all-reduce per layer, only where the bound is asked for
            why, bound = self._agree(seen, why, bound, layout.w_q.device)
        if self.rotary is not None:
            context.guard.warn_once(
                f"logit_map:{self.name}",
                f"geomon: the logit map of {self.name!r} is not logged: rotary position embeddings (argument "
                f"{self.rotary!r}) make it W_Qᵀ R_(j-i) W_K, one map per query-key offset with its own norm, and "
                "σ(W_Qᵀ W_K) is only the map at offset 0; the entropy bound is not logged either",
            )
            return
        sigma = self._sigma(layout)
        key = keys.key(keys.LOGIT_SIGMA, self.name)
        out.scalars[key], out.details[key] = sigma.max(), sigma
        if not self.bound:
            return
        if why is not None:
            context.guard.warn_once(f"entropy_bound:{self.name}", f"geomon: no entropy bound is logged for "
                                    f"{self.name!r} (Theorem 3.1 does not hold there): {why}")  # fmt: skip
            return
        out.scalars[keys.key(keys.ENTROPY_BOUND, self.name)] = bound

    def _local_bound(self, seen: _Measured, layout: QKLayout) -> tuple[str | None, Tensor | None]:
        """This process's verdict: why the bound does not hold on its measured step, or the bound."""
        why = self._unbounded(seen, layout)
        if why is not None:
            return why, None
        if not all(bool(x.isfinite().all()) for x, _, _ in seen.inputs):  # an SVD cannot take them
            return "its input on the measured step holds NaN or Inf", None
        map_sigma = bound_sigma(layout).max()
        if not bool(map_sigma.isfinite()):
            return "its query/key weights hold NaN or Inf", None
        bounds = [entropy_lower_bound(map_sigma * _input_gram(x, seen.augmented), t) for x, _, t in seen.inputs]
        return None, torch.stack(bounds).amin()

    def _agree(self, seen: _Measured, why: str | None, bound: Tensor | None,
               device: torch.device) -> tuple[str | None, Tensor | None]:  # fmt: skip
        """The ranks' verdicts made one (a collective): a bound is logged only where it holds on every rank that ran
        the layer, as the least of theirs, and a rotary layer seen on any rank is one on all. A rank whose forward
        did not run the layer on the measured step neither vetoes nor bounds."""
        idle = why is not None and not seen.inputs and not seen.calls and seen.why is None
        # one MAX reduction: [1 + the rotary argument's index, a rank vetoes, a rank bounds, -bound]
        rotary = 0 if self.rotary is None else 1 + ROTARY_ARGUMENTS.index(self.rotary)
        flags = [rotary, why is not None and not idle, bound is not None]
        local = torch.tensor([*map(float, flags), -math.inf if bound is None else -float(bound)],
                             dtype=torch.float64, device=device)  # fmt: skip
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        rotary, veto, bounded, least = local.tolist()
        if rotary and self.rotary is None:
            self.rotary = ROTARY_ARGUMENTS[int(rotary) - 1]
        if veto:
            return (None if idle else why) or (
                "another rank's measured step shows that it does not hold there (that rank's warning says why)"
            ), None
        if bounded:
            return None, torch.tensor(-least, dtype=torch.float64, device=device)
        return why, None


def logit_map_probe(name: str, module: nn.Module, *, bound: bool, guard: Guard) -> LogitMapProbe | None:
    """The logit-map probe of ``module`` if its query/key layout is understood; a module that looks like attention
    but is not understood (or whose layout cannot be read) gets one warning naming it and why, never an error."""
    try:
        layout = qk_layout(module, gather=False)
    except Exception as error:  # an odd module must never break attach
        layout = f"reading its query/key projections failed ({error!r})"
    if isinstance(layout, str):
        guard.warn_once(f"logit_map:{name}", f"geomon: attention module {name!r} is skipped by the logit-map "
                        f"diagnostics (logit_sigma, entropy_bound): {layout}")  # fmt: skip
    if not isinstance(layout, QKLayout):
        return None
    return LogitMapProbe(name, bound=bound, query_bias=layout.b_q is not None)
