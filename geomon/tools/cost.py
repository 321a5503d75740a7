"""What monitoring a model costs per monitored step: the cost model over the monitor's plan, and ``--measure``.

Cost model (per monitored step, see docs/guides/inspect.md): ``B`` batch, ``N`` sequence length, ``R`` rows
entering the head (``B·N`` unless ``--measure`` saw the real number), ``D`` the head's input width, ``C`` its outputs,
``H`` query heads of width ``Dh`` per attention module; FLOPs are ``2 x`` the multiply-adds of matrix products, as
:mod:`torch.utils.flop_counter` counts them (elementwise work is left out on both sides of the ratio).

- forward: ``2·B·N·P + Σ_attention 4·B·H·N²·Dh`` (``P``: entries of the 2-D weights of non-embedding modules);
- capture: ``Σ_attention 2·B·H·r·N·Dh`` (the logits again, of the ``r`` query rows per head the probe measures:
  ``query_rows``, by default :func:`~geomon.probes.attention.auto_query_rows`) + ``2·R·D²`` per embedding probe (its
  Gram) + per collapse probe ``2·R·D² + 4·R·C·D`` (its Gram; nc4's decisions from the second window on);
- every compute: per logit map ``2·H·Dh·D·(4·s + 2)``, ``s`` = ``LogitMapProbe.power_steps`` warm power steps of four
  matrix-vector products per head and the estimate's two (the first compute, and every one under
  ``LogitMapProbe.method = "exact"``, takes ``Σ 2·H·Dh³`` (``R_Q R_Kᵀ``) and two thin QRs ``2·(2·D·Dh² - ⅔·Dh³)`` per
  head instead);
- fill steps: when ``R`` is less than the window, the head input's Gram (and neural collapse's sums and decisions)
  on the ``min(ceil(window / R), every_n_steps) - 1`` steps before each measured step (see
  :meth:`geomon.Monitor.fills`), counted in the amortised ratio;
- per closed window: neural collapse ``4·C·D² + 2·D³ + 4·C²·D`` and the solvers, ``⁴⁄₃·D³`` per symmetric
  eigenvalue solve (two per embedding probe: the Gram's for RankMe, the covariance's for the centred RankMe and
  alpha-ReQ) and ``9·D³`` for NC1's pseudo-inverse.

Attention FLOPs are counted alike whichever SDPA backend runs (:func:`flop_counter`). A call of
``F.scaled_dot_product_attention`` with queries ``[..., Nq, Dh]`` (``B·H`` in ``...``, ``H`` the query heads), keys
``[..., Nk, Dh]`` and values ``[..., Nk, Dv]`` counts ``2·B·H·Nq·Nk·Dh`` (``QKᵀ``) ``+ 2·B·H·Nq·Nk·Dv`` (``PV``):
every query against every key, for a causal or masked call too (nothing is taken off for the masked pairs), and
grouped-query attention by its query heads. That is what torch's counter sees on the math backend, whose ``bmm``
calls it counts, and what its formula for the fused CUDA kernels gives. But which kernel runs depends on the CPU's
instruction set, the dtype, the shapes and the torch release, and the counter has no formula for some of them: torch
2.14 counts nothing for ``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel the CPU path picks on many
machines. :func:`flop_counter` gives every fused SDPA kernel of :data:`SDPA_KERNELS` that one formula, in place of
torch's, and their backward kernels the math backend's four gradient products, ``4·B·H·Nq·Nk·(Dh + Dv)`` (without the
``QKᵀ`` a fused kernel recomputes); a kernel replaces the whole call, so nothing inside it is counted twice.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from geomon import keys
from geomon.capture.modules import linear_like
from geomon.monitor import Monitor
from geomon.probes import AttentionProbe, CollapseProbe, EmbeddingProbe, LogitMapProbe
from geomon.probes.plan import Plan, plain_modules
from geomon.tools.inputs import image_shape, require_image
from geomon.tools.load import InspectError, one_line, safe_call

#: Most monitored steps --measure runs before it counts one (the first window must close for nc4 to run).
MAX_WARM_STEPS = 32


def matmul_parameters(model: nn.Module) -> int:
    """Entries of the 2-D (and higher) weights that non-embedding modules multiply their inputs with: each module's
    own parameters, so a weight shared by two modules (a tied head) counts for each use.

    Example:
        >>> matmul_parameters(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
        12
    """
    modules = [m for m in model.modules() if not isinstance(m, nn.Embedding)]
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False) if p.ndim >= 2)


def plan_head_width(plan: Plan) -> int:
    """``D`` of the head-input embedding probe (0 without one)."""
    found = [p.spec[0] for p in plan.of_kind(EmbeddingProbe.kind)
             if p.module == plan.head and p.source == "input" and p.spec]  # type: ignore[attr-defined]  # fmt: skip
    return found[0] if found else 0


def first_value_step(window: int, rows: int, every_n_steps: int, world_size: int = 1) -> int:
    """The first logging step whose compute closes a window of ``window`` rows fed ``rows`` per step and process,
    under the monitor's rule (:meth:`geomon.Monitor.fills`): step 0 is measured, then each period adds its measured
    step and the ``k - 1`` fill steps before it (``k`` steps a window needs, at most the whole period).

    Example:
        >>> first_value_step(3072, 8, 50), first_value_step(256, 8, 50), first_value_step(3072, 4096, 50)
        (400, 50, 0)
    """
    per_step = rows * world_size
    k = math.ceil(window / per_step)
    return every_n_steps * max(0, math.ceil((k - 1) / min(k, every_n_steps)))


def estimate_flops(plan: Plan, found: dict[str, Any], model: nn.Module, *, batch_size: int, seq_len: int,
                   rows: int | None = None, every_n_steps: int = 50) -> dict[str, Any]:  # fmt: skip
    """The cost model of the module docstring, probe by probe of the plan (``rows``: head input rows per step,
    default ``B·N``), and when the head input's first window closes (:func:`first_value_step`).

    Example:
        >>> from geomon._tiny_gpt import TinyGPT
        >>> from geomon.tools.inspect_model import describe
        >>> model = TinyGPT(vocab_size=50, d_model=128, n_layer=2, n_head=4, context=64)
        >>> plan, found = describe(model)
        >>> cost = estimate_flops(plan, found, model, batch_size=8, seq_len=64)
        >>> cost["model_forward"] == 2 * 512 * 399616 + 2 * 4 * 8 * 4 * 64**2 * 32   # P = 399,616 weights
        True
    """
    b, n = batch_size, seq_len
    r = b * n if rows is None else rows
    forward = 2 * b * n * matmul_parameters(model)
    terms = dict.fromkeys(("attention_logits", "embedding_gram", "nc_gram", "nc4_decisions"), 0)
    logit_matmul = logit_qr = window_matmul = solvers = 0.0
    window_rows, unknown = None, []
    attention = {info["module"]: info for info in found["attention"]}
    logit_maps = {info["module"]: info for info in found["logit_maps"]}
    for probe in plan:
        if isinstance(probe, AttentionProbe):
            h, dh = attention[probe.name]["heads"], attention[probe.name]["head_dim"]
            if h is None or dh is None:
                unknown.append(probe.name)
                continue
            forward += 4 * b * h * n * n * dh
            terms["attention_logits"] += 2 * b * h * probe.rows(n, n, h * dh) * n * dh  # the measured query rows
        elif isinstance(probe, EmbeddingProbe) and probe.spec is not None:
            d = probe.spec[0]
            on_head = probe.module == plan.head and probe.source == "input"
            terms["embedding_gram"] += 2 * (r if on_head else b * n) * d * d
            solvers += 2 * (4 / 3) * d**3  # the Gram's eigenvalues and the covariance's (RankMe_cov, alpha-ReQ)
            window_rows = probe.min_rows if on_head else window_rows
        elif isinstance(probe, CollapseProbe):
            c, d = probe.spec  # type: ignore[misc]
            terms["nc_gram"] += 2 * r * d * d
            terms["nc4_decisions"] += 4 * r * c * d
            window_matmul += 4 * c * d * d + 2 * d**3 + 4 * c * c * d
            solvers += 9 * d**3
        elif isinstance(probe, LogitMapProbe):
            h, dh, width = (logit_maps[probe.name][k] for k in ("heads", "head_dim", "width"))
            if probe.method == "power":  # the steady state: warm power steps (the first compute is exact)
                logit_matmul += 2 * h * dh * width * (4 * probe.power_steps + 2)
            else:
                logit_matmul += 2 * h * dh**3
                logit_qr += 2 * h * 2 * (2 * width * dh * dh - (2 * dh**3) / 3)
    capture = sum(terms.values())
    per_step = capture + logit_matmul + logit_qr
    # fill steps (Monitor.fills): the head input's windows are fed on the steps before each measured one as well
    fill_steps = 0 if window_rows is None else min(math.ceil(window_rows / r), every_n_steps) - 1
    fill_capture = sum(terms[name] for name in ("nc_gram", "nc4_decisions")) + 2 * r * (plan_head_width(plan) ** 2)
    return {
        "batch_size": b,
        "seq_len": n,
        "rows_per_step": r,
        "model_forward": int(forward),
        "capture": int(capture),
        "capture_terms": terms,
        "compute_matmul": int(logit_matmul),
        "compute_qr": round(logit_qr),
        "per_monitored_step": round(per_step),
        "ratio": per_step / forward if forward else math.nan,
        "window_rows": window_rows,
        "steps_per_window": None if window_rows is None else math.ceil(window_rows / r),
        "first_value_step": None if window_rows is None else first_value_step(window_rows, r, every_n_steps),
        "fill_steps": fill_steps,
        "fill_step_capture": int(fill_capture),
        "amortised_ratio": (per_step + fill_steps * fill_capture) / (every_n_steps * forward) if forward else math.nan,
        "window_matmul": int(window_matmul),
        "window_solvers": round(solvers),
        "attention_not_estimated": unknown,
        "formula": (
            "forward = 2·B·N·P + Σ_attn 4·B·H·N²·Dh; capture = Σ_attn 2·B·H·r·N·Dh (r query rows per head) "
            "+ 2·R·D² per embedding Gram + NC 2·R·D² + 4·R·C·D; every compute: logit maps Σ 2·H·Dh·D·(4·steps + 2) "
            "(warm power steps); per window: NC 4·C·D² + 2·D³ + 4·C²·D "
            "+ solvers (4/3·D³ per eigvalsh, 9·D³ NC pinv); FLOPs = 2 x multiply-adds of matrix products"
        ),
    }


# -- measuring ---------------------------------------------------------------------------------------------------------


def example_input(model: nn.Module, batch_size: int, seq_len: int, generator: torch.Generator,
                  input_shape: tuple[int, ...] | None = None) -> Any:  # fmt: skip
    """A random input for one forward: floats ``[B, *input_shape]`` when given; images ``[B, C, H, W]`` for an image
    model (:func:`geomon.tools.inputs.image_shape`; ``{"pixel_values": ...}`` for a transformers model); else, from
    the first of the model's modules that is an embedding, an attention or a linear layer: token ids ``[B, N]`` below
    the embedding's size (``{"input_ids": ...}`` for a transformers model), else floats ``[B, N, D]`` (``[N, B, D]``
    for a non-batch-first ``nn.MultiheadAttention``) of its width.

    Example:
        >>> x = example_input(nn.TransformerEncoderLayer(16, 2), 3, 5, torch.Generator().manual_seed(0))
        >>> list(x.shape)
        [5, 3, 16]
        >>> list(example_input(nn.Conv2d(3, 4, 8), 2, 5, torch.Generator(), (3, 32, 32)).shape)
        [2, 3, 32, 32]
    """
    main_input = getattr(model, "main_input_name", None)  # transformers models name the input they take
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    require_image(model, input_shape)
    image = image_shape(model)
    if input_shape is not None or image is not None:
        shape = input_shape or image[0]  # type: ignore[index]
        x = torch.randn(batch_size, *shape, generator=generator).to(device)
        return {main_input: x} if main_input not in (None, "input_ids") else x
    if main_input not in (None, "input_ids"):
        raise InspectError(f"--measure builds token ids, images or [B, N, D] floats; this model takes {main_input}: "
                           "pass --input-shape")  # fmt: skip
    getter = getattr(model, "get_input_embeddings", None)
    first = safe_call(getter) if callable(getter) else None
    if not isinstance(first, nn.Embedding):
        kinds = (nn.Embedding, nn.MultiheadAttention)
        first = next((m for m in model.modules() if isinstance(m, kinds) or linear_like(m)), None)
    if isinstance(first, nn.Embedding):
        ids = torch.randint(0, first.num_embeddings, (batch_size, seq_len), generator=generator).to(device)
        return {"input_ids": ids} if main_input else ids
    if isinstance(first, nn.MultiheadAttention):
        shape = (batch_size, seq_len) if first.batch_first else (seq_len, batch_size)
        return torch.randn(*shape, first.embed_dim, generator=generator).to(device)
    if first is not None:
        return torch.randn(batch_size, seq_len, first.weight.shape[-1], generator=generator).to(device)
    raise InspectError("--measure cannot tell what input the model takes (no embedding, attention or linear layer)")


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _shape(inputs: Any) -> str:
    if isinstance(inputs, dict):
        return ", ".join(f"{k}={list(v.shape)}" for k, v in inputs.items())
    return str(list(inputs.shape))


def measure(model: nn.Module, plan: Plan, *, batch_size: int, seq_len: int, repeats: int = 3, seed: int = 0,
            input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """One random batch through ``model`` (train mode, autograd on, no backward) with and without a default
    :class:`geomon.Monitor` measuring every step: median times, FLOPs counted by :func:`flop_counter`, the
    attention modules that reported values (with the head counts in the monitor's plan), and the keys it logged.
    FLOPs are counted on the first step after the first window of the head's input closed (at most
    :data:`MAX_WARM_STEPS` steps in), where the steady-state cost model applies."""
    generator = torch.Generator().manual_seed(seed)
    inputs = example_input(model, batch_size, seq_len, generator, input_shape)
    collapse = plan.of_kind(CollapseProbe.kind)
    window = next((p.min_rows for p in plan.of_kind(EmbeddingProbe.kind)
                   if p.module == plan.head and p.source == "input"), None)  # type: ignore[attr-defined]  # fmt: skip
    seen_rows: list[tuple[int, ...]] = []

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        if args and isinstance(args[0], Tensor):
            seen_rows.append(tuple(args[0].shape[:-1]))

    was_training = model.training
    model.train()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = None if plan.head is None else plain_modules(model)[plan.head].register_forward_hook(record)
            try:
                torch.manual_seed(seed)
                _call(model, inputs)  # warm-up, and the shape of the head's input
            except Exception as error:
                raise InspectError(
                    f"--measure: the model's forward failed on a random input {_shape(inputs)}: {one_line(error)}"
                ) from error
            finally:
                if handle is not None:
                    handle.remove()
            labels = None
            if collapse and seen_rows:
                labels = torch.randint(0, collapse[0].spec[0], seen_rows[0], generator=generator)  # type: ignore[index]
            rows = math.prod(seen_rows[0]) if seen_rows else None
            with flop_counter() as counter:
                _call(model, inputs)
            plain_flops = int(counter.get_total_flops())
            monitor = Monitor(every_n_steps=1).attach(model)
            values: dict[str, Tensor] = {}

            def monitored_step(step: int) -> tuple[float, float]:  # (seconds of the forward, of the compute)
                started = time.perf_counter()
                with monitor.step(step, labels=labels):
                    _call(model, inputs)
                middle = time.perf_counter()
                values.update(monitor.compute(step))
                return middle - started, time.perf_counter() - middle

            warm = 1 if rows is None or window is None else min(MAX_WARM_STEPS, math.ceil(window / rows))
            for step in range(warm):  # the first window: neural collapse has reference means from the second on
                monitored_step(step)
            with flop_counter() as counter:
                with monitor.step(warm, labels=labels):
                    _call(model, inputs)
                capture_flops = int(counter.get_total_flops()) - plain_flops
                values.update(monitor.compute(warm))
                compute_flops = int(counter.get_total_flops()) - plain_flops - capture_flops
            times: dict[str, list[float]] = {"plain": [], "monitored": [], "compute": []}
            for step in range(warm + 1, warm + 1 + repeats):  # interleaved, so that a machine's drift hits both alike
                times["plain"].append(_timed(lambda: _call(model, inputs)))
                forward_s, compute_s = monitored_step(step)
                times["monitored"].append(forward_s)
                times["compute"].append(compute_s)
            monitor.detach()
    finally:
        model.train(was_training)
    plain_s, monitored_s, compute_s = (statistics.median(times[k]) for k in ("plain", "monitored", "compute"))
    assert monitor.plan is not None
    seen = {p.name: p.spec[0] for p in monitor.plan.of_kind(AttentionProbe.kind)  # type: ignore[index]
            if keys.key(keys.ENTROPY, p.name) in values}  # fmt: skip
    return {
        "input": _shape(inputs),
        "rows_per_step": rows,
        "repeats": repeats,
        "counted_step": warm,
        "forward_s": plain_s,
        "monitored_forward_s": monitored_s,
        "compute_s": compute_s,
        "time_overhead": (monitored_s + compute_s - plain_s) / plain_s if plain_s > 0 else math.nan,
        "forward_flops": plain_flops,
        "capture_flops": capture_flops,
        "compute_flops": compute_flops,
        "flop_overhead": (capture_flops + compute_flops) / plain_flops if plain_flops else math.nan,
        "seen_attention": seen,
        "keys": sorted(values),
        "values": {key: float(value) for key, value in sorted(values.items())},
        "warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
    }


# -- counting attention FLOPs ------------------------------------------------------------------------------------------


#: The aten kernels ``F.scaled_dot_product_attention`` dispatches to besides the math path (which the FLOP counter
#: sees as ``bmm`` calls): CUDA's flash, memory-efficient and cuDNN kernels, the CPU's flash kernel, the one
#: out-of-tree backends override, and MPS's. Those a torch release lacks are skipped.
SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_attention_math_for_mps",
)


def _attention_terms(query: Any, key: Any, value: Any) -> tuple[int, int, int]:
    """``(B·H·Nq·Nk, Dh, Dv)`` from the shapes ``[..., Nq, Dh]``, ``[..., Nk, Dh]``, ``[..., Nk, Dv]``, where
    ``...`` of the queries is ``B·H`` (the query heads; keys may have fewer)."""
    return math.prod(query[:-2]) * query[-2] * key[-2], query[-1], value[-1]


def sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of one attention forward from the shapes of its queries, keys and values: ``2·B·H·Nq·Nk·Dh`` for
    ``QKᵀ`` plus ``2·B·H·Nq·Nk·Dv`` for ``PV``, every query against every key (a causal call counts the same as the
    math backend's ``bmm`` calls do) and ``H`` the query heads (grouped-query attention included).

    Example:
        >>> sdpa_flops((2, 8, 16, 32), (2, 2, 16, 32), (2, 2, 16, 32)) == 2 * 2 * 8 * 16 * 16 * (32 + 32)
        True
    """
    pairs, dh, dv = _attention_terms(query, key, value)
    return 2 * pairs * (dh + dv)


def sdpa_backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:  # fmt: skip
    """FLOPs of one attention backward, as the math backend computes it: the gradients of the two products of the
    forward, ``dP = dO Vᵀ``, ``dV = Pᵀ dO``, ``dQ = dS K`` and ``dK = dSᵀ Q``, that is ``4·B·H·Nq·Nk·(Dh + Dv)``.
    (torch's own formula for its fused CUDA kernels adds the ``QKᵀ`` they recompute, ``2·B·H·Nq·Nk·Dh``; left out
    here, so that a backward counts the same on every backend.)

    Example:
        >>> shape = (2, 8, 16, 32)
        >>> sdpa_backward_flops(shape, shape, shape, shape) == 4 * 2 * 8 * 16 * 16 * (32 + 32)
        True
    """
    pairs, dh, dv = _attention_terms(query, key, value)
    return 4 * pairs * (dh + dv)


def attention_flop_formulas() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for :class:`torch.utils.flop_counter.FlopCounterMode`: :func:`sdpa_flops` (and
    :func:`sdpa_backward_flops` for the ``_backward`` kernels) for every kernel of :data:`SDPA_KERNELS` this torch
    has, so that attention counts the same on every backend.

    Example:
        >>> torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in attention_flop_formulas()
        True
    """
    formulas: dict[Any, Callable[..., int]] = {}
    for name in SDPA_KERNELS:
        for op, formula in ((name, sdpa_flops), (f"{name}_backward", sdpa_backward_flops)):
            if hasattr(torch.ops.aten, op):
                formulas[getattr(torch.ops.aten, op)] = formula
    return formulas


def flop_counter() -> FlopCounterMode:
    """A silent :class:`~torch.utils.flop_counter.FlopCounterMode` whose attention FLOPs do not depend on the SDPA
    backend (:func:`attention_flop_formulas`): what ``--measure`` counts with.

    Example:
        >>> q = torch.randn(1, 2, 8, 4)
        >>> with flop_counter() as counter:
        ...     _ = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> counter.get_total_flops() == sdpa_flops(q.shape, q.shape, q.shape)
        True
    """
    return FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
