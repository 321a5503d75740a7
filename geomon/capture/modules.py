"""Which modules to watch: name patterns, the output head, and what ``torch.compile`` hides from hooks.

Everything here runs once, at setup, so that a misconfiguration fails before training starts, with a message that
lists what was available.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from geomon._reparam_layer import SigmaReparamLinear

#: Last name components that mark a model's output head when the model does not say which it is.
HEAD_NAMES = ("lm_head", "head", "classifier", "fc", "score", "output", "out", "logits")

#: What ``head="auto"`` looks for, in order (said in the warning when nothing is found).
HEAD_RULES = (
    "the model's get_output_embeddings()",
    f"the last linear layer named {', '.join(HEAD_NAMES)}",
    "the model's last linear layer when it ends an nn.Sequential so named (torchvision's classifier.6)",
    "the last linear layer when it has as many outputs as an nn.Embedding has rows and is not square (a vocabulary "
    "projection)",
)


#: Attributes that hold an attention module's query-head count (``heads``: timm's Hiera, x-transformers).
HEAD_COUNT_ATTRIBUTES = ("n_head", "num_heads", "num_attention_heads", "n_heads", "heads", "num_attn_heads")


def head_count(module: nn.Module, default: int | None = None) -> int | None:
    """Query heads of an attention module as its attributes or config say, else ``default``.

    Example:
        >>> from torch import nn
        >>> head_count(nn.MultiheadAttention(8, 2)), head_count(nn.Linear(2, 2))
        (2, None)
    """
    for name in HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    config = getattr(module, "config", None)
    value = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return value if isinstance(value, int) else default


def resolve_patterns(patterns: Sequence[str], names: Sequence[str], what: str) -> list[str]:
    """The names matching each ``fnmatch`` pattern, in order; a pattern that matches nothing fails, listing names.

    Example:
        >>> resolve_patterns(["blocks.*.attn"], ["blocks.0.attn", "blocks.1.attn", "head"], "attention")
        ['blocks.0.attn', 'blocks.1.attn']
    """
    resolved: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{what} patterns must be strings, got {pattern!r}")
        matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ValueError(f"{what} pattern {pattern!r} matches no module; the candidates are: {_shown(names)}")
        resolved += [name for name in matches if name not in resolved]
    return resolved


def _shown(names: Sequence[str], limit: int = 40) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "(none)"


def linear_like(module: nn.Module) -> bool:
    """A module with a 2-D ``weight`` (``nn.Linear``, Hugging Face ``Conv1D``, ...), ``nn.Embedding`` excluded."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.ndim == 2 and not isinstance(module, nn.Embedding)


def weight_out_in(module: nn.Module) -> Tensor:
    """The weight the module applies, detached, as ``[out, in]``: ``nn.Linear``'s layout; Hugging Face's ``Conv1D``
    stores ``[in, out]`` and is transposed (a view, no copy); a σReparam layer applies ``γ W / σ(W)``, not ``W``."""
    if isinstance(module, SigmaReparamLinear):
        with torch.no_grad():
            weight = module._effective_weight(update=False)  # u is left as it is
        return weight.T if module.transposed else weight
    weight = module.weight.detach()
    return weight.T if type(module).__name__ == "Conv1D" else weight


def head_dims(module: nn.Module) -> tuple[int, int]:
    """``(num_classes, num_features)`` of a classifier head."""
    out_features, in_features = weight_out_in(module).shape
    return int(out_features), int(in_features)


def find_head(model: nn.Module, head: str | None) -> str | None:
    """The qualified name of the output head: ``head`` itself (checked), else (``"auto"``) the first of
    :data:`HEAD_RULES`: the model's own answer (``get_output_embeddings()``, Hugging Face), else the last linear layer
    whose name ends in a usual head name (:data:`HEAD_NAMES`), else the model's last linear layer when it ends an
    ``nn.Sequential`` with such a name, else the model's last linear layer when it projects onto
    a vocabulary (as many outputs as an embedding has rows, and not square); ``None`` when none applies.

    Example:
        >>> model = nn.Sequential()
        >>> model.add_module("body", nn.Linear(4, 8)); model.add_module("classifier", nn.Linear(8, 3))
        >>> find_head(model, "auto")
        'classifier'
        >>> model = nn.Sequential()
        >>> model.add_module("classifier", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        >>> find_head(model, "auto")
        'classifier.2'
        >>> model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 50))  # no head names
        >>> find_head(model, "auto")
        '2'
    """
    named = {name: module for name, module in model.named_modules() if name}
    linears = [name for name, module in named.items() if linear_like(module)]
    if head is None:
        return None
    if head != "auto":
        if head not in linears:
            raise ValueError(
                f"head {head!r} is not a module with a 2-D weight (nn.Embedding excluded); the candidates are: "
                f"{_shown(linears)}"
            )
        return head
    names_by_id = {id(module): name for name, module in named.items()}
    for _, module in model.named_modules():  # a Hugging Face model (possibly inside a LightningModule) names its head
        getter = getattr(module, "get_output_embeddings", None)
        found = names_by_id.get(id(_safe_call(getter))) if callable(getter) else None
        if found in linears:
            return found
    candidates = [name for name in linears if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    if candidates:
        return candidates[-1]
    if linears and _ends_a_head_sequential(linears[-1], named):
        return linears[-1]
    if linears:  # a vocabulary projection: Lightning's demo Transformer's `decoder`, x-transformers' `to_logits`
        out_features, in_features = head_dims(named[linears[-1]])
        rows = {module.num_embeddings for module in named.values() if isinstance(module, nn.Embedding)}
        if out_features in rows and out_features != in_features:
            return linears[-1]
    return None


def _ends_a_head_sequential(name: str, named: dict[str, nn.Module]) -> bool:
    """Whether ``name`` is the last child of an ``nn.Sequential`` named like a head (``classifier.6``: VGG, AlexNet,
    EfficientNet, ConvNeXt, MobileNet, MaxViT in torchvision), so that its input is the classifier's features."""
    parent, _, child = name.rpartition(".")
    container = named.get(parent)
    return (isinstance(container, nn.Sequential) and parent.rsplit(".", 1)[-1] in HEAD_NAMES
            and list(container._modules)[-1] == child)  # fmt: skip


def _safe_call(getter: object) -> object:
    try:
        return getter()  # type: ignore[operator]
    except Exception:  # a model whose getter is unimplemented has no head to offer
        return None


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the parts of ``model`` that ``torch.compile`` runs as a graph (``""`` for the model itself).

    Forward hooks and the interception of the attention call are not seen inside a compiled graph (or would force a
    recompilation), so the monitor refuses hook-based probes on these parts.
    """
    parts = []
    if getattr(model, "_compiler_ctx", None):  # Lightning's unwrapped `torch.compile(LightningModule)`
        parts.append("")
    for name, module in model.named_modules():
        if name in parts:
            continue
        if (type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None
                or _compiled_function(module.__dict__.get("forward"))):  # fmt: skip
            parts.append(name)
    return parts


def _compiled_function(function: object) -> bool:
    """Whether ``function`` is ``torch.compile(f)`` (a module's ``forward`` replaced by its compiled self:
    ``block.forward = torch.compile(block.forward)``, a per-block compile that leaves the module a plain one)."""
    return callable(function) and getattr(function, "_torchdynamo_orig_callable", None) is not None
