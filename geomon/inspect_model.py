"""``geomon inspect MODEL``: what geomon watches on a model with default settings, and what that costs.

MODEL is one of

- ``package.module:factory``: the module is imported (the current directory first on ``sys.path``, as
  ``python -m`` does) and ``factory`` (a dotted attribute path) is called with no arguments, or used as is when it
  already is an ``nn.Module``;
- ``path/to/file.py:factory``: the same, from a file;
- a Hugging Face config name found in the local cache, or a local directory holding a ``config.json``: the config is
  read with ``local_files_only=True`` (nothing is ever downloaded) and the model built from it with random weights
  (the class in ``config.architectures`` when transformers has it, else ``AutoModelForCausalLM``, else
  ``AutoModel``). Without ``--measure`` it is built on the ``meta`` device: no memory, no initialisation.

What is listed is decided by the code the monitor itself runs: :func:`geomon.capture.attention.find_attention_modules`
for the attention modules, :func:`geomon.capture.modules.find_head` / :func:`~geomon.capture.modules.head_dims` and
:data:`geomon.monitor.AUTO_COLLAPSE_MAX_ELEMENTS` for the output head and neural collapse,
:class:`geomon.probes.logit_map.LogitMapProbe` for the logit-map spectral norms.

Cost model (per monitored step; ``B`` batch, ``N`` sequence length, ``R`` rows entering the head per step, assumed
``B·N`` (a token-level head) unless ``--measure`` saw the real number; ``D`` the head's input width, ``C`` its
outputs; per attention module ``H`` query heads of width ``Dh``). FLOPs are ``2 x`` multiply-adds of the matrix
products, as :mod:`torch.utils.flop_counter` counts them; elementwise work (softmax, entropy, norms) is left out on
both sides of the ratio.

- model forward: ``2·B·N·P + Σ_attention 4·B·H·N²·Dh``, where ``P`` counts the entries of the 2-D weights of every
  non-embedding module (each weight applied to every token; a tied head counts) and the second term is ``QKᵀ`` and
  ``AV``;
- capture, during the forward: ``Σ_attention 2·B·H·N²·Dh`` (the logits, recomputed for the entropy) +
  ``2·R·D²`` per ``D x D`` Gram the head-input probe keeps (RankMe's; alpha-ReQ reads the same window) + neural
  collapse ``2·R·D²`` (its Gram) + ``4·R·C·D`` (nc4: the head's decision and the nearest class mean, from the
  second window on);
- every ``compute``: the logit maps, ``Σ 2·H·Dh³`` (``R_Q R_Kᵀ`` per head) plus their thin QRs
  (``2·(2·D·Dh² - ⅔·Dh³)`` per head, two per head);
- once per closed window (every ``⌈4·D / R⌉`` monitored steps): neural collapse ``4·C·D² + 2·D³ + 4·C²·D``
  (matrix products) and the dense solvers, counted with textbook constants: ``⁴⁄₃·D³`` per symmetric
  eigenvalue solve (RankMe, alpha-ReQ) and ``9·D³`` for the eigendecomposition behind NC1's pseudo-inverse.

State (float64, lives for the run; read off the probes' own state layout): ``5·H`` values per attention module,
``1 + D + D²`` per embedding Gram, and ``2·C·D + 2·C + D² + 3`` for neural collapse (sums and the previous
window's class means). ``--measure`` runs the model on a random batch on the CPU with and
without the monitor and reports the time ratio and the FLOPs torch's counter saw, with attention counted as below
(:func:`flop_counter`).

Attention FLOPs, counted the same way whichever SDPA backend runs: a call of ``F.scaled_dot_product_attention`` with
queries ``[..., Nq, Dh]`` (``B·H`` in ``...``, ``H`` the query heads), keys ``[..., Nk, Dh]`` and values
``[..., Nk, Dv]`` counts ``2·B·H·Nq·Nk·Dh`` (``QKᵀ``) ``+ 2·B·H·Nq·Nk·Dv`` (``PV``): every query against every key,
for a causal or masked call too (nothing is taken off for the masked pairs), and grouped-query attention by its
query heads. That is what torch's counter sees on the math backend, whose ``bmm`` calls it counts, and what its
formula for the fused CUDA kernels gives. But which kernel runs depends on the CPU's instruction set, the dtype, the
shapes and the torch release, and the counter has no formula for some of them: torch 2.14 counts nothing for
``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel the CPU path picks on many machines.
:func:`flop_counter` gives every fused SDPA kernel of :data:`SDPA_KERNELS` that one formula, in place of torch's, and
their backward kernels the math backend's four gradient products, ``4·B·H·Nq·Nk·(Dh + Dv)`` (without the ``QKᵀ`` a
fused kernel recomputes); a kernel replaces the whole call, so nothing inside it is counted twice.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from geomon.alerts import default_rules
from geomon.capture.attention import find_attention_modules
from geomon.capture.modules import compiled_parts, find_head, head_dims, linear_like
from geomon.functional.neural_collapse import HEAD_STATISTICS, STATISTICS
from geomon.monitor import AUTO_COLLAPSE_MAX_ELEMENTS, Monitor
from geomon.probes.attention import FIELDS as ATTENTION_FIELDS
from geomon.probes.logit_map import LogitMapProbe, _heads, qk_weights
from geomon.reparam import sigma_reparam_stats

#: What MODEL may be, for error messages.
ALLOWED = (
    "expected module:factory (e.g. mypkg.models:build), path/to/file.py:factory, a Hugging Face config name in the "
    "local cache, or a directory holding a config.json"
)
#: Bytes of one float64 state value.
F64 = 8
#: Default sequence length when the model does not say how long its context is (and the cap when it does).
DEFAULT_SEQ_LEN = 512
#: Most monitored steps --measure runs before it counts one (the first window must close for nc4 to run).
MAX_WARM_STEPS = 32
#: Default batch size of the cost estimate.
DEFAULT_BATCH_SIZE = 8


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


# -- what is watched ----------------------------------------------------------------------------------------------


@dataclass
class AttentionInfo:
    module: str
    kind: str
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    keys: list[str] = field(default_factory=list)


def attention_shape(module: nn.Module) -> tuple[int | None, int | None, int | None]:
    """``(query heads, key heads, head width)`` of an attention module, from its weights or attributes (None where
    unknown; ``--measure`` sees the real head count).

    Example:
        >>> attention_shape(nn.MultiheadAttention(16, 4))
        (4, 4, 4)
    """
    found = qk_weights(module)
    if found is not None:
        w_q, w_k, _, _ = found
        return int(w_q.shape[0]), int(w_k.shape[0]), int(w_q.shape[1])
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads, module.num_heads, module.head_dim
    heads = _heads(module)
    config = getattr(module, "config", None)
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if head_dim is None and heads and isinstance(getattr(config, "hidden_size", None), int):
        head_dim = config.hidden_size // heads
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or heads
    as_int = [value if isinstance(value, int) and value > 0 else None for value in (heads, kv, head_dim)]
    return as_int[0], as_int[1], as_int[2]


def matmul_parameters(model: nn.Module) -> int:
    """Entries of the 2-D (and higher) weights that non-embedding modules multiply their inputs with: each module's
    own parameters, so a weight shared by two modules (a tied head) counts for each use.

    Example:
        >>> matmul_parameters(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
        12
    """
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.ndim >= 2:
                total += parameter.numel()
    return total


def max_positions(model: nn.Module, config: Any = None) -> int | None:
    """The longest sequence the model takes, when it says (a Hugging Face config, or a ``context`` /
    ``block_size`` / ``max_seq_len`` attribute)."""
    config = config if config is not None else getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    for name in ("context", "block_size", "max_seq_len"):
        value = getattr(model, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _alerts_keys() -> list[str]:
    return [f"geomon/alerts/{rule.name}" for rule in default_rules()]


def describe(model: nn.Module, *, every_n_steps: int = 50) -> dict[str, Any]:
    """What a default :class:`geomon.Monitor` attached to ``model`` watches and logs (no forward, no state).

    Example:
        >>> from geomon._tiny_gpt import TinyGPT
        >>> found = describe(TinyGPT(vocab_size=20, d_model=32, n_layer=1, n_head=2, context=8))
        >>> [a["module"] for a in found["attention"]], found["head"]["module"], found["neural_collapse"]["enabled"]
        (['blocks.0.attn'], 'head', True)
    """
    modules = {name: module for name, module in model.named_modules() if name}
    logit_names = LogitMapProbe(modules).names
    attention = []
    for name, kind in find_attention_modules(model).items():
        heads, kv_heads, head_dim = attention_shape(modules[name]) if name else attention_shape(model)
        keys = [f"{prefix}/{name}" for prefix, _, _ in ATTENTION_FIELDS]
        attention.append(AttentionInfo(name, kind, heads, kv_heads, head_dim, keys))
    probes: list[dict[str, Any]] = [
        {"probe": "attention", "target": info.module, "keys": info.keys} for info in attention
    ]
    logit_maps = []
    for name in logit_names:
        heads, _, head_dim = attention_shape(modules[name])
        width = int(qk_weights(modules[name])[0].shape[2])  # type: ignore[index]
        logit_maps.append({"module": name, "heads": heads, "head_dim": head_dim, "width": width})
        probes.append({"probe": "logit_sigma", "target": name, "keys": [f"geomon/spectral/logit_sigma/{name}"]})

    head = find_head(model, "auto")
    head_info: dict[str, Any] = {"module": head, "num_classes": None, "num_features": None}
    collapse: dict[str, Any] = {"enabled": False, "state_elements": None, "limit": AUTO_COLLAPSE_MAX_ELEMENTS}
    if head is None:
        head_info["reason"] = (
            "no output head found: the model has no get_output_embeddings() and no linear layer named like a head "
            "(lm_head, head, classifier, fc, ...); pass head=<module name> to watch one"
        )
        collapse["reason"] = "no output head"
    else:
        c, d = head_dims(modules[head])
        head_info.update(num_classes=c, num_features=d)
        head_info["reason"] = _head_reason(model, modules, head)
        collapse["state_elements"] = c * d
        state = _mib(_scaled_bytes(probe_layout(d, c)["collapse"], {_CLASSES: c, _stand_in(d): d}))
        if c * d <= AUTO_COLLAPSE_MAX_ELEMENTS:
            collapse.update(enabled=True, reason=f"C x D = {c} x {d} = {c * d:,} <= {AUTO_COLLAPSE_MAX_ELEMENTS:,} "
                            f"(float64 state {state}); fed on steps whose batch has labels")  # fmt: skip
        else:
            collapse["reason"] = (
                f"C x D = {c} x {d} = {c * d:,} > {AUTO_COLLAPSE_MAX_ELEMENTS:,}: its float64 state would take "
                f"{state}; pass neural_collapse=True to watch it anyway"
            )
        embedding = embedding_keys(f"{head}.input", d)
        kinds = "+".join(key.split("/")[1] for key in embedding)
        probes.append({"probe": kinds, "target": f"{head}.input", "keys": embedding})
        if collapse["enabled"]:
            stats = STATISTICS + HEAD_STATISTICS
            probes.append({"probe": "neural_collapse", "target": f"{head}.input",
                           "keys": [f"geomon/nc/{stat}/{head}.input" for stat in stats]})  # fmt: skip
    reparam = sorted(_reparam_names(model))
    for name in reparam:
        keys = [f"geomon/spectral/reparam_{stat}/{name}" for stat in ("gamma", "sigma", "ratio")]
        probes.append({"probe": "sigma_reparam", "target": name, "keys": keys})
    probes.append({"probe": "alerts", "target": "default rules", "keys": _alerts_keys()})
    notes = []
    compiled = compiled_parts(model)
    if compiled:
        notes.append(
            "the model is compiled with torch.compile: Monitor.attach refuses the hook-based probes (attention, head "
            "input); attach before compiling, or hand tensors to Monitor.observe"
        )
    if not attention:
        notes.append(
            "no module recognisably attention; modules that call F.scaled_dot_product_attention are still seen at "
            "run time (--measure lists what a forward reports)"
        )
    return {
        "attention": [vars(info) for info in attention],
        "logit_maps": logit_maps,
        "head": head_info,
        "neural_collapse": collapse,
        "probes": probes,
        "keys": sorted({key for probe in probes for key in probe["keys"]}),
        "every_n_steps": every_n_steps,
        "notes": notes,
    }


def _reparam_names(model: nn.Module) -> list[str]:
    try:
        return list(sigma_reparam_stats(model))
    except Exception:  # a model sigma_reparam refuses (e.g. compiled) has no σReparam layers to report
        return []


def _head_reason(model: nn.Module, modules: dict[str, nn.Module], head: str) -> str:
    for module in model.modules():  # as find_head asks: any submodule's get_output_embeddings()
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter) and _safe(getter) is modules[head]:
            return "the model's get_output_embeddings()"
    return "the last linear layer named like a head"


def _mib(n_bytes: float) -> str:
    if n_bytes < 1 << 20:
        return f"{n_bytes / 1024:.1f} KiB"
    if n_bytes < 1 << 30:
        return f"{n_bytes / (1 << 20):.1f} MiB"
    return f"{n_bytes / (1 << 30):.2f} GiB"


# -- cost ---------------------------------------------------------------------------------------------------------


#: Stand-in sizes at which the probes are built to read their state's layout: every state dimension equal to one of
#: these is that size (distinct primes; the feature stand-in is above 100 when the real width is, since probes
#: switch alpha-ReQ on there).
_HEADS, _CLASSES, _NARROW, _WIDE = 3, 7, 5, 101


def _state_shapes(state: Any) -> list[tuple[tuple[int, ...], int]]:
    """``(shape, bytes per element)`` of every tensor in a (nested) state dict."""
    if isinstance(state, Tensor):
        return [(tuple(state.shape), state.element_size())]
    if isinstance(state, dict):
        return [item for value in state.values() for item in _state_shapes(value)]
    if isinstance(state, (list, tuple)):
        return [item for value in state for item in _state_shapes(value)]
    return []


def _scaled_bytes(shapes: list[tuple[tuple[int, ...], int]], sizes: dict[int, int]) -> int:
    return sum(math.prod(sizes.get(dim, dim) for dim in shape) * size for shape, size in shapes)


def _stand_in(num_features: int) -> int:
    return _WIDE if num_features > 100 else _NARROW


def embedding_keys(name: str, num_features: int) -> list[str]:
    """The keys an embedding probe of width ``num_features`` reports when its window closes, read off a probe of
    the monitor's own class run once at a stand-in width (RankMe always; alpha-ReQ where the width allows its fit).

    Example:
        >>> embedding_keys("head.input", 64), embedding_keys("head.input", 768)
        (['geomon/rankme/head.input'], ['geomon/rankme/head.input', 'geomon/alpha_req/head.input'])
    """
    from geomon.probes import EmbeddingProbe

    d0 = _stand_in(num_features)
    probe = EmbeddingProbe("stand-in", d0, min_rows=1)
    probe.update(torch.randn(2 * d0, d0, generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scalars, _ = probe.compute()
    return [key.rsplit("/", 1)[0] + "/" + name for key in scalars]


def probe_layout(num_features: int, num_classes: int | None) -> dict[str, Any]:
    """The state layout of the monitor's own probes (:class:`~geomon.probes.EmbeddingProbe`,
    :class:`~geomon.probes.CollapseProbe`, :class:`~geomon.metrics.AttentionEntropy`), read by building them at
    small stand-in sizes: the state shapes, and how many ``D x D`` Grams each feeds per update."""
    from geomon.metrics import AttentionEntropy
    from geomon.probes import CollapseProbe, EmbeddingProbe

    d0 = _stand_in(num_features)
    embedding = _state_shapes(EmbeddingProbe("probe", d0).state_dict())
    layout = {
        "d0": d0,
        "attention": _state_shapes(AttentionEntropy(_HEADS, backend="torch").state_dict()),
        "embedding": embedding,
        "embedding_grams": sum(shape == (d0, d0) for shape, _ in embedding),
        "collapse": [],
        "collapse_grams": 0,
    }
    if num_classes is not None:
        collapse = _state_shapes(CollapseProbe("probe", _CLASSES, d0, backend="torch").state_dict())
        layout["collapse"] = collapse
        layout["collapse_grams"] = sum(shape == (d0, d0) for shape, _ in collapse)
    return layout


def state_bytes(found: dict[str, Any]) -> dict[str, int]:
    """Bytes of the state a default monitor keeps for the run, by part: per-head buffers of every attention module,
    the embedding probe of the head's input (its ``D x D`` Gram), neural collapse (``C x D`` sums and reference
    means, a ``D x D`` Gram). Read off the probes' own state layout (:func:`probe_layout`).

    Example:
        >>> found = {"attention": [{"heads": 4}], "head": {"num_classes": 10, "num_features": 8},
        ...          "neural_collapse": {"enabled": True}}
        >>> sizes = state_bytes(found)
        >>> sizes["attention"], sizes["embedding"], sizes["neural_collapse"]   # 5 x 4, 1 + 8 + 64, 2·80 + 20 + 64 + 3
        (160, 584, 1976)
    """
    heads = [info["heads"] for info in found["attention"] if info["heads"]]
    c, d = found["head"]["num_classes"], found["head"]["num_features"]
    layout = probe_layout(d or 1, c)
    attention = sum(_scaled_bytes(layout["attention"], {_HEADS: h}) for h in heads)
    embedding = collapse = 0
    if d is not None:
        sizes = {layout["d0"]: d, _CLASSES: c}
        embedding = _scaled_bytes(layout["embedding"], sizes)
        if found["neural_collapse"]["enabled"]:
            collapse = _scaled_bytes(layout["collapse"], sizes)
    total = attention + embedding + collapse
    return {"attention": attention, "embedding": embedding, "neural_collapse": collapse, "total": total}


def estimate_flops(found: dict[str, Any], model: nn.Module, *, batch_size: int, seq_len: int,
                   rows: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The cost model of the module docstring, term by term (``rows``: head input rows per step, default ``B·N``).

    Example:
        >>> from geomon._tiny_gpt import TinyGPT
        >>> model = TinyGPT(vocab_size=50, d_model=128, n_layer=2, n_head=4, context=64)
        >>> cost = estimate_flops(describe(model), model, batch_size=8, seq_len=64)
        >>> cost["model_forward"] == 2 * 512 * 399616 + 2 * 4 * 8 * 4 * 64**2 * 32   # P = 399,616 weights
        True
    """
    b, n = batch_size, seq_len
    r = b * n if rows is None else rows
    terms: dict[str, int | float] = {}
    forward = 2 * b * n * matmul_parameters(model)
    attention_logits = 0
    unknown = []
    for info in found["attention"]:
        if info["heads"] is None or info["head_dim"] is None:
            unknown.append(info["module"])
            continue
        per_call = b * info["heads"] * n * n * info["head_dim"]
        forward += 4 * per_call
        attention_logits += 2 * per_call
    terms["attention_logits"] = attention_logits
    d, c = found["head"]["num_features"], found["head"]["num_classes"]
    nc_on = found["neural_collapse"]["enabled"]
    layout = probe_layout(d or 1, c)
    terms["embedding_gram"] = 0 if d is None else 2 * r * d * d * layout["embedding_grams"]
    terms["nc_gram"] = 2 * r * d * d * layout["collapse_grams"] if nc_on else 0
    terms["nc4_decisions"] = 4 * r * c * d if nc_on else 0
    capture = sum(terms.values())
    logit_matmul = logit_qr = 0
    for info in found["logit_maps"]:
        h, dh, width = info["heads"], info["head_dim"], info["width"]
        logit_matmul += 2 * h * dh**3
        logit_qr += 2 * h * 2 * (2 * width * dh * dh - (2 * dh**3) / 3)
    window_matmul = (4 * c * d * d + 2 * d**3 + 4 * c * c * d) if nc_on else 0
    solvers = 0.0
    if d is not None:
        solvers += (4 / 3) * d**3 * (2 if d > 100 else 1) + (9 * d**3 if nc_on else 0)
    per_step = capture + logit_matmul + logit_qr
    rows_per_window = None if d is None else 4 * d
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
        "window_rows": rows_per_window,
        "steps_per_window": None if rows_per_window is None else math.ceil(rows_per_window / r),
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


def measure(model: nn.Module, found: dict[str, Any], *, batch_size: int, seq_len: int, repeats: int = 3,
            seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """One random batch through ``model`` (train mode, autograd on, no backward) with and without a default
    :class:`geomon.Monitor` measuring every step: median times, FLOPs counted by :func:`flop_counter`, the
    attention modules the monitor saw (with their head counts), and the keys it logged. FLOPs are counted on the
    first step after the first window closed (``4·D`` rows, at most :data:`MAX_WARM_STEPS` steps in), where the
    steady-state cost model applies."""
    generator = torch.Generator().manual_seed(seed)
    inputs = example_input(model, batch_size, seq_len, generator)
    modules = dict(model.named_modules())
    head = found["head"]["module"]
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
            handle = modules[head].register_forward_hook(record) if head is not None else None
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
            if head is not None and seen_rows and found["neural_collapse"]["enabled"]:
                c = found["head"]["num_classes"]
                labels = torch.randint(0, c, seen_rows[0], generator=generator)
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

            d = found["head"]["num_features"]
            warm = 1 if rows is None or d is None else min(MAX_WARM_STEPS, math.ceil(4 * d / rows))
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
    seen = {name: metric.num_heads for name, metric in monitor.attention_probe.metrics.items()}
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
    found = describe(model, every_n_steps=every_n_steps)
    notes = list(found.pop("notes"))
    limit = max_positions(model, loaded.config)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    elif limit is not None and seq_len > limit:
        notes.append(f"--seq-len {seq_len} is longer than the model's {limit} positions; using {limit}")
        seq_len = limit
    measured = None
    if measure_cost:
        measured = measure(model, found, batch_size=batch_size, seq_len=seq_len, repeats=repeats)
        static = {info["module"] for info in found["attention"]}
        extra = sorted(set(measured["seen_attention"]) - static)
        if extra:
            notes.append(f"attention seen at run time in modules not listed statically: {', '.join(extra)}")
        missing = sorted(static - set(measured["seen_attention"]))
        if missing:
            notes.append(f"listed attention modules that reported nothing in the forward: {', '.join(missing)}")
        for warning in measured["warnings"]:
            if "neural collapse is off" not in warning:  # already said, with the reason
                notes.append(f"warning during the measured forward: {warning}")
    rows = measured["rows_per_step"] if measured else None
    cost = estimate_flops(found, model, batch_size=batch_size, seq_len=seq_len, rows=rows)
    if cost["attention_not_estimated"]:
        notes.append(
            f"attention FLOPs of {', '.join(cost['attention_not_estimated'])} not estimated: head count unknown"
        )
    if rows is None and found["head"]["module"] is not None:
        notes.append("rows per step assumed B·N (a token-level head); --measure reads the real number")
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": spec,
        "source": loaded.source,
        "description": loaded.description,
        "class": type(model).__name__,
        "parameters": n_params,
        **found,
        "state_bytes": state_bytes(found),
        "cost": cost,
        "measured": measured,
        "notes": notes,
    }


def _flops(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}FLOP"
    return f"{value:.0f} FLOP"


def _compress_keys(keys: list[str]) -> str:
    """``geomon/a/x/m, geomon/b/x/m`` -> ``geomon/{a,b}/x/m`` style grouping by everything but the stat."""
    if len(keys) <= 3:
        return "\n".join(keys)
    parts = [key.split("/") for key in keys]
    if all(len(p) == len(parts[0]) for p in parts):
        varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(varying) == 1:
            i = varying[0]
            middle = "{" + ",".join(dict.fromkeys(p[i] for p in parts)) + "}"
            return "/".join([*parts[0][:i], middle, *parts[0][i + 1 :]])
    return "\n".join(keys)


def sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as titled tables of strings (shared by the rich and the plain rendering)."""
    out = []
    measured = report["measured"]
    seen = measured["seen_attention"] if measured else None
    header = ["module", "kind", "heads", "kv heads", "head dim", "logit σ logged"]
    logit = {item["module"] for item in report["logit_maps"]}
    rows = []
    for info in report["attention"]:
        heads = "?" if info["heads"] is None else str(info["heads"])
        if seen is not None:
            heads += f" (seen {seen[info['module']]})" if info["module"] in seen else " (not seen)"
        rows.append([info["module"] or "(the model)", info["kind"], heads, str(info["kv_heads"] or "?"),
                     str(info["head_dim"] or "?"), "yes" if info["module"] in logit else "no"])  # fmt: skip
    out.append((f"attention modules ({len(rows)})", header, rows or [["(none found)", "", "", "", "", ""]]))

    head, nc = report["head"], report["neural_collapse"]
    if head["module"] is None:
        head_rows = [["output head", "none"], ["why", head["reason"]]]
    else:
        d = head["num_features"]
        head_rows = [
            ["output head", f"{head['module']} ({head['num_classes']} x {d}), found as {head['reason']}"],
            ["RankMe", f"{head['module']}.input" + (", and alpha-ReQ (D > 100)" if d > 100 else "")],
        ]
    head_rows.append(["neural collapse", ("on: " if nc["enabled"] else "off: ") + nc["reason"]])
    out.append(("output head", ["", ""], head_rows))

    probe_rows = [[p["probe"], p["target"], _compress_keys(p["keys"])] for p in report["probes"]]
    out.append((f"probes and logged keys ({len(report['keys'])} keys)", ["probe", "on", "keys"], probe_rows))

    cost, state = report["cost"], report["state_bytes"]
    b, n = cost["batch_size"], cost["seq_len"]
    cost_rows = [
        ["state: attention per-head buffers", _mib(state["attention"])],
        ["state: RankMe / alpha-ReQ Gram (D x D)", _mib(state["embedding"])],
        ["state: neural collapse (C x D, 2 copies, + D x D)", _mib(state["neural_collapse"])],
        ["state: total (float64, kept for the run)", _mib(state["total"])],
        [f"model forward (B={b}, N={n})", _flops(cost["model_forward"])],
        ["capture during the forward", _flops(cost["capture"])],
        ["logit maps, every compute", _flops(cost["compute_matmul"] + cost["compute_qr"])],
        ["extra per monitored step / forward", f"{cost['ratio']:.1%}"],
        [f"amortised over every_n_steps={report['every_n_steps']}", f"{cost['ratio'] / report['every_n_steps']:.2%}"],
    ]
    if cost["window_rows"] is not None:
        window = f"{cost['window_rows']} rows = {cost['steps_per_window']} step(s) of {cost['rows_per_step']}"
        cost_rows += [
            ["window (rows per step)", window],
            ["per closed window (solvers + NC)", _flops(cost["window_matmul"] + cost["window_solvers"])],
        ]
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
