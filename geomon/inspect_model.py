"""``geomon inspect MODEL``: what a default monitor watches on a model, and what that costs.

MODEL is one of

- ``package.module:factory``: the module is imported (the current directory first on ``sys.path``, as
  ``python -m`` does) and ``factory`` (a dotted attribute path) is called with no arguments, or used as is when it
  already is an ``nn.Module``;
- ``path/to/file.py:factory``: the same, from a file;
- a Hugging Face config name found in the local cache, or a local directory holding a ``config.json``: the config is
  read with ``local_files_only=True`` (nothing is ever downloaded) and the model built from it with random weights
  (the class in ``config.architectures`` when transformers has it, else ``AutoModelForCausalLM``, else
  ``AutoModel``). Without ``--measure`` it is built on the ``meta`` device: no memory, no initialisation.

Nothing is decided here: what is listed is the plan :meth:`geomon.Monitor.attach` builds
(:func:`geomon.probes.plan.build_plan`, from a default monitor's options; it allocates nothing, so a ``meta`` model
will do): its probes, their keys and state sizes, the output head and whether a
:class:`~geomon.probes.CollapseProbe` is in it. This module adds shapes read off the model for the cost model, the
FLOP counting of ``--measure`` and the rendering.

Cost model (per monitored step, see docs/guides/inspect.md): ``B`` batch, ``N`` sequence length, ``R`` rows
entering the head (``B·N`` unless ``--measure`` saw the real number), ``D`` the head's input width, ``C`` its outputs,
``H`` query heads of width ``Dh`` per attention module; FLOPs are ``2 x`` the multiply-adds of matrix products, as
:mod:`torch.utils.flop_counter` counts them (elementwise work is left out on both sides of the ratio).

- forward: ``2·B·N·P + Σ_attention 4·B·H·N²·Dh`` (``P``: entries of the 2-D weights of non-embedding modules);
- capture: ``Σ_attention 2·B·H·N²·Dh`` (the logits again) + ``2·R·D²`` per embedding probe (its Gram) + per
  collapse probe ``2·R·D² + 4·R·C·D`` (its Gram; nc4's decisions from the second window on);
- every compute: per logit map ``Σ 2·H·Dh³`` (``R_Q R_Kᵀ``) and two thin QRs ``2·(2·D·Dh² - ⅔·Dh³)`` per head;
- per closed window: neural collapse ``4·C·D² + 2·D³ + 4·C²·D`` and the solvers, ``⁴⁄₃·D³`` per symmetric
  eigenvalue solve (one per RankMe / alpha-ReQ value) and ``9·D³`` for NC1's pseudo-inverse.

Attention FLOPs are counted alike whichever SDPA backend runs: a call with queries ``[..., Nq, Dh]`` (``B·H`` in
``...``, ``H`` the query heads), keys ``[..., Nk, Dh]`` and values ``[..., Nk, Dv]`` counts ``2·B·H·Nq·Nk·(Dh + Dv)``
(``QKᵀ`` and ``PV``, every query against every key, masked or causal alike), as torch's counter sees the math
backend's ``bmm`` calls. Which kernel runs depends on the machine, dtype, shapes and torch release, and torch's counter
has no formula for some (torch 2.14 counts nothing for ``aten._scaled_dot_product_flash_attention_for_cpu``), so
:func:`flop_counter` gives every fused kernel of :data:`SDPA_KERNELS` that formula, and their backward kernels the
math backend's four gradient products, ``4·B·H·Nq·Nk·(Dh + Dv)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from geomon import keys
from geomon.capture.attention import find_attention_modules
from geomon.capture.modules import compiled_parts, head_dims, linear_like
from geomon.monitor import Monitor
from geomon.probes import AttentionProbe, CollapseProbe, EmbeddingProbe, LogitMapProbe
from geomon.probes.logit_map import qk_weights
from geomon.probes.plan import AUTO_COLLAPSE_MAX_ELEMENTS, MIB, Plan, build_plan, plain_modules, plain_name

#: What MODEL may be, for error messages.
ALLOWED = (
    "expected module:factory (e.g. mypkg.models:build), path/to/file.py:factory, a Hugging Face config name in the "
    "local cache, or a directory holding a config.json"
)
#: Default sequence length when the model does not say how long its context is (and the cap when it does).
DEFAULT_SEQ_LEN = 512
#: Most monitored steps --measure runs before it counts one (the first window must close for nc4 to run).
MAX_WARM_STEPS = 32
#: Default batch size of the cost estimate.
DEFAULT_BATCH_SIZE = 8


NO_HEAD = (
    "no output head found: the model has no get_output_embeddings() and no linear layer named like a head (lm_head, "
    "head, classifier, fc, ...); pass head=<module name> to watch one"
)
COMPILED = (
    "the model is compiled with torch.compile: Monitor.attach refuses the hook-based probes (attention, head input); "
    "attach before compiling, or hand tensors to Monitor.observe"
)
NO_ATTENTION = (
    "no module recognisably attention; modules that call F.scaled_dot_product_attention are still seen at run time "
    "(--measure lists what a forward reports)"
)


class InspectError(Exception):
    """A problem the user can fix (a bad MODEL, a module that does not import, ...): one line, exit status 2."""


# -- loading ------------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    model: nn.Module
    source: str  #: "factory" or "huggingface"
    description: str  #: what was loaded, for the title
    config: Any = None  #: the Hugging Face config, if any


def load_model(spec: str, *, materialise: bool = True) -> Loaded:
    """Build the model MODEL names (see the module docstring); :class:`InspectError` on anything a user can fix.

    ``materialise=False`` builds a Hugging Face model on the ``meta`` device (shapes only); factories always run.

    Example:
        >>> loaded = load_model("torch.nn:Identity")
        >>> type(loaded.model).__name__, loaded.source
        ('Identity', 'factory')
    """
    spec = spec.strip()
    if not spec:
        raise InspectError(f"empty MODEL: {ALLOWED}")
    if ":" in spec and not Path(spec).is_dir():
        location, _, attribute = spec.rpartition(":")
        return _load_factory(spec, location, attribute)
    if spec.endswith(".py"):
        raise InspectError(f"bad MODEL {spec!r}: a file needs the factory to call, as {spec}:build; {ALLOWED}")
    return _load_huggingface(spec, materialise)


def _check_attribute(spec: str, attribute: str) -> list[str]:
    parts = attribute.split(".")
    if not attribute or not all(part.isidentifier() for part in parts):
        raise InspectError(f"bad MODEL {spec!r}: {attribute!r} is not a Python name after the colon; {ALLOWED}")
    return parts


def _load_factory(spec: str, location: str, attribute: str) -> Loaded:
    parts = _check_attribute(spec, attribute)
    if not location:
        raise InspectError(f"bad MODEL {spec!r}: nothing before the colon; {ALLOWED}")
    if location.endswith(".py") or "/" in location or os.sep in location:
        module = _import_file(location)
    else:
        if not all(part.isidentifier() for part in location.split(".")):
            raise InspectError(f"bad MODEL {spec!r}: {location!r} is neither a module name nor a .py file; {ALLOWED}")
        module = _import_module(location)
    target: Any = module
    for depth, part in enumerate(parts):
        if not hasattr(target, part):
            where = location if depth == 0 else f"{location}:{'.'.join(parts[:depth])}"
            names = sorted(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None)))
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") or "(none)"
            raise InspectError(f"{where} has no attribute {part!r} (callables there: {shown})")
        target = getattr(target, part)
    if isinstance(target, nn.Module):
        return Loaded(target, "factory", spec)
    if not callable(target):
        raise InspectError(f"{spec} is {_what(target)}, neither an nn.Module nor a factory to call")
    try:
        model = target()
    except (Exception, SystemExit) as error:
        raise InspectError(f"calling {spec}() with no arguments failed: {_one_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise InspectError(f"{spec}() returned {_what(model)}, not a torch.nn.Module: a factory returns the model")
    return Loaded(model, "factory", spec)


def _what(value: Any) -> str:
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def _on_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_module(name: str) -> Any:
    with _on_path(os.getcwd()):
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit) as error:
            raise InspectError(f"could not import module {name!r}: {_one_line(error)}") from error


def _import_file(location: str) -> Any:
    path = Path(location).expanduser()
    if not path.is_file():
        raise InspectError(f"no such file: {location} (MODEL {location}:factory names a Python file)")
    if path.suffix != ".py":
        raise InspectError(f"{location} is not a .py file; {ALLOWED}")
    name = f"_geomon_inspect_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InspectError(f"could not import {location}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
    with _on_path(str(path.resolve().parent)):
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:
            sys.modules.pop(name, None)
            raise InspectError(f"could not import {location}: {_one_line(error)}") from error
    return module


def _load_huggingface(name: str, materialise: bool) -> Loaded:
    try:
        import transformers
    except ImportError as error:
        raise InspectError(
            f"MODEL {name!r} has no colon, so it would be a Hugging Face config name, but transformers is not "
            f"installed (pip install transformers); or {ALLOWED}"
        ) from error
    local = Path(name).exists()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        except Exception as error:
            if local:
                raise InspectError(f"{name} holds no readable Hugging Face config: {_one_line(error)}") from error
            raise InspectError(
                f"Hugging Face config {name!r} could not be loaded from the local cache ({_one_line(error)}); geomon "
                f"inspect never downloads (fetch it first, e.g. `hf download {name} config.json`, or pass a "
                "directory with a config.json); a factory is given as module:factory or path/to/file.py:factory"
            ) from error
        with nullcontext() if materialise else torch.device("meta"):
            model = _model_from_config(transformers, config)
    finally:
        transformers.logging.set_verbosity(verbosity)
    where = "a local path" if local else "the local cache"
    return Loaded(model, "huggingface", f"{name} ({type(config).__name__} from {where})", config)


def _model_from_config(transformers: Any, config: Any) -> nn.Module:
    errors = []
    for architecture in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            try:
                return cls(config)
            except Exception as error:  # fall through to the auto classes
                errors.append(_one_line(error))
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto.from_config(config)
        except Exception as error:
            errors.append(_one_line(error))
    raise InspectError(f"transformers could not build a model from config {type(config).__name__}: {errors[-1]}")


# -- what is watched: the plan ------------------------------------------------------------------------------------


def attention_shape(module: nn.Module, heads: int | None) -> tuple[int | None, int | None]:
    """``(key heads, head width)`` of an attention module with ``heads`` query heads, from its Q/K weights or its
    attributes (None where unknown), for the cost model.

    Example:
        >>> attention_shape(nn.MultiheadAttention(16, 4), 4)
        (4, 4)
    """
    found = qk_weights(module, gather=False)
    if found is not None:
        return int(found[1].shape[0]), int(found[0].shape[1])
    config = getattr(module, "config", None)
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if head_dim is None and heads and isinstance(getattr(config, "hidden_size", None), int):
        head_dim = config.hidden_size // heads
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or heads
    return tuple(v if isinstance(v, int) and v > 0 else None for v in (kv, head_dim))  # type: ignore[return-value]


def matmul_parameters(model: nn.Module) -> int:
    """Entries of the 2-D (and higher) weights that non-embedding modules multiply their inputs with: each module's
    own parameters, so a weight shared by two modules (a tied head) counts for each use.

    Example:
        >>> matmul_parameters(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
        12
    """
    modules = [m for m in model.modules() if not isinstance(m, nn.Embedding)]
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False) if p.ndim >= 2)


def max_positions(model: nn.Module, config: Any = None) -> int | None:
    """The longest sequence the model takes, when it says (a Hugging Face config, or a ``context`` /
    ``block_size`` / ``max_seq_len`` attribute)."""
    config = config if config is not None else getattr(model, "config", None)
    found = [getattr(config, name, None) for name in ("n_positions", "max_position_embeddings")]
    found += [getattr(model, name, None) for name in ("context", "block_size", "max_seq_len")]
    return next((value for value in found if isinstance(value, int) and value > 0), None)


def describe(model: nn.Module, *, every_n_steps: int = 50) -> tuple[Plan, dict[str, Any]]:
    """The plan a default :class:`geomon.Monitor` builds at attach for ``model``, and what it lists (no forward, no
    state allocated).

    Example:
        >>> from geomon._tiny_gpt import TinyGPT
        >>> plan, found = describe(TinyGPT(vocab_size=20, d_model=32, n_layer=1, n_head=2, context=8))
        >>> [a["module"] for a in found["attention"]], found["head"]["module"], found["neural_collapse"]["enabled"]
        (['blocks.0.attn'], 'head', True)
    """
    monitor = Monitor(every_n_steps=every_n_steps)
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # the budget is checked below, so that a plan over it is still listed
            plan = build_plan(model, replace(monitor.options, memory_budget_mib=math.inf))
        except ValueError as error:
            raise InspectError(f"a default Monitor.attach fails on this model: {_one_line(error)}") from error
    notes += [f"warning: {w.message}" for w in caught if "neural collapse is off" not in str(w.message)]
    plan.options, budget = monitor.options, monitor.options.memory_budget_mib
    try:
        plan.check_budget()
    except ValueError as error:
        notes.append(f"Monitor.attach would refuse this plan: {error}")
    modules = plain_modules(model)
    kinds = {plain_name(name): kind for name, kind in find_attention_modules(model).items()}
    attention = []
    for probe in plan.of_kind(AttentionProbe.kind):
        heads = None if probe.spec is None else probe.spec[0]
        kv_heads, head_dim = attention_shape(modules[probe.name], heads)
        attention.append({"module": probe.name, "kind": kinds.get(probe.name, "?"), "heads": heads,
                          "kv_heads": kv_heads, "head_dim": head_dim, "keys": probe.keys()})  # fmt: skip
    logit_maps = []
    for probe in plan.of_kind(LogitMapProbe.kind):
        w_q = qk_weights(modules[probe.name], gather=False)[0]  # type: ignore[index]
        logit_maps.append(dict(zip(("module", "heads", "head_dim", "width"), (probe.name, *w_q.shape), strict=True)))

    head: dict[str, Any] = {"module": plan.head, "num_classes": None, "num_features": None, "reason": NO_HEAD}
    collapse = plan.of_kind(CollapseProbe.kind)
    nc = {"enabled": bool(collapse), "reason": "no output head", "state_elements": None,
          "limit": AUTO_COLLAPSE_MAX_ELEMENTS}  # fmt: skip
    if plan.head is not None:
        c, d = head_dims(modules[plan.head])
        head.update(num_classes=c, num_features=d, reason=_head_reason(model, modules[plan.head]))
        size = _mib((collapse[0] if collapse else CollapseProbe(plan.head, c, d)).state_bytes())  # not allocated
        cap = AUTO_COLLAPSE_MAX_ELEMENTS
        limit = f"C x D = {c} x {d} = {c * d:,} {'<=' if c * d <= cap else '>'} {cap:,} (AUTO_COLLAPSE_MAX_ELEMENTS)"
        nc.update(state_elements=c * d, reason=f"{limit}; float64 state {size}, fed on steps whose batch has labels"
                  if collapse else f"{limit}; its float64 state would take {size}: pass neural_collapse=True to "
                  "watch it anyway")  # fmt: skip
    probes = [{"probe": p.pid, "kind": p.kind, "target": p.name, "keys": p.keys(), "state_bytes": p.state_bytes()}
              for p in plan]  # fmt: skip
    alerts = [keys.key(keys.ALERTS, rule.name) for rule in monitor.alert_engine.rules]
    probes.append({"probe": "alerts", "kind": "alerts", "target": "default rules", "keys": alerts, "state_bytes": 0})
    by_kind: dict[str, int] = {}
    for p in plan:
        by_kind[p.kind] = by_kind.get(p.kind, 0) + p.state_bytes()
    notes += [COMPILED] if compiled_parts(model) else []
    notes += [] if attention else [NO_ATTENTION]
    return plan, {
        "attention": attention,
        "logit_maps": logit_maps,
        "head": head,
        "neural_collapse": nc,
        "probes": probes,
        "keys": sorted(plan.keys() + alerts),
        "state_bytes": {"by_kind": by_kind, "total": plan.state_bytes(), "budget": round(budget * MIB)},
        "every_n_steps": every_n_steps,
        "notes": notes,
    }


def _head_reason(model: nn.Module, head: nn.Module) -> str:
    for module in model.modules():  # as find_head asks: any submodule's get_output_embeddings()
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter) and _safe(getter) is head:
            return "the model's get_output_embeddings()"
    return "the last linear layer named like a head"


def _mib(n_bytes: float) -> str:
    if not n_bytes:
        return "none"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n_bytes / 1024:.1f} KiB"


# -- cost ---------------------------------------------------------------------------------------------------------


def estimate_flops(plan: Plan, found: dict[str, Any], model: nn.Module, *, batch_size: int, seq_len: int,
                   rows: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The cost model of the module docstring, probe by probe of the plan (``rows``: head input rows per step,
    default ``B·N``).

    Example:
        >>> from geomon._tiny_gpt import TinyGPT
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
            terms["attention_logits"] += 2 * b * h * n * n * dh
        elif isinstance(probe, EmbeddingProbe) and probe.spec is not None:
            d = probe.spec[0]
            on_head = probe.module == plan.head and probe.source == "input"
            terms["embedding_gram"] += 2 * (r if on_head else b * n) * d * d
            solvers += (4 / 3) * d**3 * len(probe.keys())  # one eigenvalue solve per value (RankMe, alpha-ReQ)
            window_rows = probe.min_rows if on_head else window_rows
        elif isinstance(probe, CollapseProbe):
            c, d = probe.spec  # type: ignore[misc]
            terms["nc_gram"] += 2 * r * d * d
            terms["nc4_decisions"] += 4 * r * c * d
            window_matmul += 4 * c * d * d + 2 * d**3 + 4 * c * c * d
            solvers += 9 * d**3
        elif isinstance(probe, LogitMapProbe):
            h, dh, width = (logit_maps[probe.name][k] for k in ("heads", "head_dim", "width"))
            logit_matmul += 2 * h * dh**3
            logit_qr += 2 * h * 2 * (2 * width * dh * dh - (2 * dh**3) / 3)
    capture = sum(terms.values())
    per_step = capture + logit_matmul + logit_qr
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
        "window_matmul": int(window_matmul),
        "window_solvers": round(solvers),
        "attention_not_estimated": unknown,
        "formula": (
            "forward = 2·B·N·P + Σ_attn 4·B·H·N²·Dh; capture = Σ_attn 2·B·H·N²·Dh + 2·R·D² per embedding Gram "
            "+ NC 2·R·D² + 4·R·C·D; every compute: logit maps Σ 2·H·Dh³ + QR; per window: NC 4·C·D² + 2·D³ + 4·C²·D "
            "+ solvers (4/3·D³ per eigvalsh, 9·D³ NC pinv); FLOPs = 2 x multiply-adds of matrix products"
        ),
    }


# -- measuring ----------------------------------------------------------------------------------------------------


def example_input(model: nn.Module, batch_size: int, seq_len: int, generator: torch.Generator) -> Any:
    """A random input for one forward, from the first of the model's modules that is an embedding, an attention or
    a linear layer: token ids ``[B, N]`` below the embedding's size (``{"input_ids": ...}`` for a transformers
    model), else floats ``[B, N, D]`` (``[N, B, D]`` for a non-batch-first ``nn.MultiheadAttention``) of its width.

    Example:
        >>> x = example_input(nn.TransformerEncoderLayer(16, 2), 3, 5, torch.Generator().manual_seed(0))
        >>> list(x.shape)
        [5, 3, 16]
    """
    main_input = getattr(model, "main_input_name", None)  # transformers models name the input they take
    if main_input not in (None, "input_ids"):
        raise InspectError(f"--measure builds token ids or [B, N, D] floats; this model takes {main_input}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    getter = getattr(model, "get_input_embeddings", None)
    first = _safe(getter) if callable(getter) else None
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


def _safe(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except Exception:  # an unimplemented getter
        return None


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


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


def measure(model: nn.Module, plan: Plan, *, batch_size: int, seq_len: int, repeats: int = 3,
            seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """One random batch through ``model`` (train mode, autograd on, no backward) with and without a default
    :class:`geomon.Monitor` measuring every step: median times, FLOPs counted by :func:`flop_counter`, the
    attention modules that reported values (with the head counts in the monitor's plan), and the keys it logged.
    FLOPs are counted on the first step after the first window of the head's input closed (at most
    :data:`MAX_WARM_STEPS` steps in), where the steady-state cost model applies."""
    generator = torch.Generator().manual_seed(seed)
    inputs = example_input(model, batch_size, seq_len, generator)
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
                    f"--measure: the model's forward failed on a random input {_shape(inputs)}: {_one_line(error)}"
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


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float as ``None``, so that the JSON is strict (no ``NaN`` tokens).

    Example:
        >>> jsonable({"a": [1.0, float("nan")], "b": float("inf")})
        {'a': [1.0, None], 'b': None}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def _shape(inputs: Any) -> str:
    if isinstance(inputs, dict):
        return ", ".join(f"{k}={list(v.shape)}" for k, v in inputs.items())
    return str(list(inputs.shape))


# -- the report ---------------------------------------------------------------------------------------------------


def inspect(spec: str, *, seq_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE, every_n_steps: int = 50,
            measure_cost: bool = False, repeats: int = 3) -> dict[str, Any]:  # fmt: skip
    """Everything ``geomon inspect`` prints, as one JSON-able dict (see the module docstring)."""
    loaded = load_model(spec, materialise=measure_cost)
    model = loaded.model
    plan, found = describe(model, every_n_steps=every_n_steps)
    notes = found.pop("notes")
    limit = max_positions(model, loaded.config)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    elif limit is not None and seq_len > limit:
        notes.append(f"--seq-len {seq_len} is longer than the model's {limit} positions; using {limit}")
        seq_len = limit
    measured = None
    if measure_cost:
        measured = measure(model, plan, batch_size=batch_size, seq_len=seq_len, repeats=repeats)
        planned, seen = {info["module"] for info in found["attention"]}, set(measured["seen_attention"])
        if seen - planned:
            notes.append(f"attention seen at run time in modules not in the plan: {', '.join(sorted(seen - planned))}")
        if planned - seen:
            notes.append(f"planned attention modules that reported nothing: {', '.join(sorted(planned - seen))}")
        notes += [f"warning during the measured forward: {warning}" for warning in measured["warnings"]
                  if "neural collapse is off" not in warning]  # already said, with the reason  # fmt: skip
    rows = measured["rows_per_step"] if measured else None
    cost = estimate_flops(plan, found, model, batch_size=batch_size, seq_len=seq_len, rows=rows)
    if cost["attention_not_estimated"]:
        notes.append(
            f"attention FLOPs of {', '.join(cost['attention_not_estimated'])} not estimated: head count unknown"
        )
    if rows is None and plan.head is not None:
        notes.append("rows per step assumed B·N (a token-level head); --measure reads the real number")
    return {
        "model": spec,
        "source": loaded.source,
        "description": loaded.description,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        **found,
        "cost": cost,
        "measured": measured,
        "notes": notes,
    }


def _flops(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}FLOP"
    return f"{value:.0f} FLOP"


def _compress_keys(names: list[str]) -> str:
    """``geomon/a/x/m, geomon/b/x/m`` -> ``geomon/{a,b}/x/m`` style grouping by everything but the stat."""
    parts = [name.split("/") for name in names]
    if len(names) > 3 and all(len(p) == len(parts[0]) for p in parts):
        varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(varying) == 1:
            i = varying[0]
            middle = "{" + ",".join(dict.fromkeys(p[i] for p in parts)) + "}"
            return "/".join([*parts[0][:i], middle, *parts[0][i + 1 :]])
    return "\n".join(names)


def sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as titled tables of strings (shared by the rich and the plain rendering)."""
    measured = report["measured"]
    seen = measured["seen_attention"] if measured else None
    logit = {item["module"] for item in report["logit_maps"]}
    rows = []
    for info in report["attention"]:
        heads = "?" if info["heads"] is None else str(info["heads"])
        if seen is not None:
            heads += f" (seen {seen[info['module']]})" if info["module"] in seen else " (not seen)"
        rows.append([info["module"] or "(the model)", info["kind"], heads, str(info["kv_heads"] or "?"),
                     str(info["head_dim"] or "?"), "yes" if info["module"] in logit else "no"])  # fmt: skip
    header = ["module", "kind", "heads", "kv heads", "head dim", "logit σ logged"]
    out = [(f"attention modules ({len(rows)})", header, rows or [["(none found)", "", "", "", "", ""]])]

    head, nc = report["head"], report["neural_collapse"]
    found = f"{head['module']} ({head['num_classes']} x {head['num_features']}), found as {head['reason']}"
    head_rows = (
        [["output head", "none"], ["why", head["reason"]]] if head["module"] is None else [["output head", found]]
    )
    head_rows.append(["neural collapse", ("on: " if nc["enabled"] else "off: ") + nc["reason"]])
    out.append(("output head", ["", ""], head_rows))

    probe_rows = [[p["kind"], p["target"], _compress_keys(p["keys"]), _mib(p["state_bytes"])] for p in report["probes"]]
    out.append((f"probes and logged keys ({len(report['keys'])} keys)", ["probe", "on", "keys", "state"], probe_rows))

    cost, state = report["cost"], report["state_bytes"]
    cost_rows = [[f"state: {kind} probes", _mib(size)] for kind, size in state["by_kind"].items() if size]
    cost_rows += [
        ["state: total (float64, kept for the run)", f"{_mib(state['total'])} of {_mib(state['budget'])} budget"],
        [f"model forward (B={cost['batch_size']}, N={cost['seq_len']})", _flops(cost["model_forward"])],
        ["capture during the forward", _flops(cost["capture"])],
        ["logit maps, every compute", _flops(cost["compute_matmul"] + cost["compute_qr"])],
        ["extra per monitored step / forward", f"{cost['ratio']:.1%}"],
        [f"amortised over every_n_steps={report['every_n_steps']}", f"{cost['ratio'] / report['every_n_steps']:.2%}"],
    ]
    if cost["window_rows"] is not None:
        window = f"{cost['window_rows']} rows = {cost['steps_per_window']} step(s) of {cost['rows_per_step']}"
        solvers = _flops(cost["window_matmul"] + cost["window_solvers"])
        cost_rows += [["window (rows per step)", window], ["per closed window (solvers + NC)", solvers]]
    if measured:
        capture = f"{measured['monitored_forward_s'] * 1e3:.1f} ms, capture {_flops(measured['capture_flops'])}"
        ratio = f"time {measured['time_overhead']:+.1%}, matmul FLOPs {measured['flop_overhead']:+.1%}"
        cost_rows += [
            [f"measured: input {measured['input']}, median of {measured['repeats']}", ""],
            ["measured: forward", f"{measured['forward_s'] * 1e3:.1f} ms, {_flops(measured['forward_flops'])}"],
            ["measured: monitored forward", capture],
            ["measured: compute", f"{measured['compute_s'] * 1e3:.1f} ms, {_flops(measured['compute_flops'])}"],
            ["measured: extra per monitored step / forward", ratio],
        ]
    out.append(("cost per monitored step", ["", ""], cost_rows))
    return out


def title(report: dict[str, Any]) -> str:
    return (f"geomon inspect: {report['class']} ({report['parameters'] / 1e6:.3g} M parameters) from "
            f"{report['description']}")  # fmt: skip


def render(report: dict[str, Any], file: Any = None) -> None:
    """Print the report: rich tables when rich is installed, plain text otherwise."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title(report), file=file)
        for name, header, rows in sections(report):
            print(f"\n{name}", file=file)
            for row in ([header] if any(header) else []) + rows:
                print("  " + " | ".join(cell.replace("\n", ", ") for cell in row), file=file)
        for note in report["notes"]:
            print(f"note: {note}", file=file)
        return
    console = Console(file=file, width=max(100, Console(file=file).width))
    console.print(title(report), style="bold", markup=False, highlight=False)
    for name, header, rows in sections(report):
        table = Table(title=name, title_justify="left", show_header=any(header))
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"cost model: {report['cost']['formula']}", markup=False, highlight=False, style="dim")
