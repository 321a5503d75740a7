"""σReparam (Zhai et al., ICML 2023): convert a model's linear layers to ``Ŵ = γ · W / σ(W)`` and back.

The conversion is an explicit opt-in that changes the model (the monitor never does it). It keeps the function the
model computes at conversion time: ``W`` is kept and ``γ`` starts at ``σ(W₀)`` (the paper's PyTorch reference code
re-initialises the weights and also starts its scale at their ``σ``). Converted layers are
:class:`SigmaReparamLinear`; they save ``γ``, ``σ`` and ``u`` in ``state_dict()`` (and so in Lightning checkpoints).

Which layers: modules whose type is exactly ``nn.Linear`` or Hugging Face's ``transformers.pytorch_utils.Conv1D``
(GPT-2). Subclasses are left alone (``nn.MultiheadAttention``'s ``out_proj`` is read by its parent as a raw weight,
quantised layers have their own storage). ``linear1`` and ``linear2`` of an ``nn.TransformerEncoderLayer`` are
**skipped with a warning**: the layer's inference fast path (eval mode without grad) reads their weights directly, so
a converted layer would be ignored there (``nn.TransformerDecoderLayer`` has no such path: its layers are converted).
A layer whose weight is **tied** to another module (an LM head sharing the token embedding) is **skipped with a
warning**: reparametrising one side would untie or change the other. Exclude a skipped layer explicitly to silence
its warning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from geomon._reparam_layer import SigmaReparamLinear, _copy_parameter, _is_conv1d
from geomon.functional._common import warn

__all__ = ["SigmaReparamLinear", "remove_sigma_reparam", "sigma_reparam", "sigma_reparam_stats"]

Patterns = str | Sequence[str] | None


def sigma_reparam(
    model: nn.Module, include: Patterns = None, exclude: Patterns = None, *, n_power_iter: int = 1
) -> nn.Module:
    """Replace, in place, the linear layers of ``model`` by :class:`SigmaReparamLinear` computing the same function.

    Each new layer takes the mode (``training``) of the layer it replaces: converting a model in eval mode leaves it
    in eval mode, where ``u`` is frozen and the outputs are those of the model before conversion.

    Args:
        model: the module to convert (its children are replaced; the module itself must not be a bare layer: use
            :meth:`SigmaReparamLinear.from_linear` for that).
        include: ``fnmatch`` patterns over qualified module names (``"*.attn.*"``); None converts every layer.
        exclude: patterns of layers to leave alone; None excludes nothing.
        n_power_iter: power steps per training-mode forward of each converted layer.

    Returns:
        ``model``, converted. Build the optimizer afterwards: each layer gains a parameter ``gamma``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is itself a linear layer.
        ValueError: a pattern matches no convertible layer (the message lists the candidates), or ``include`` is an
            empty list.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
        >>> x = torch.randn(5, 4)
        >>> before = model(x)
        >>> model = sigma_reparam(model, exclude=["2"])
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('SigmaReparamLinear', 'Linear')
        >>> torch.allclose(model(x), before, atol=1e-6)
        True
    """
    _check_model(model)
    places = _places(model, lambda module: type(module) is nn.Linear or _is_conv1d(module))
    names = [name for name_list in places.values() for name in name_list]
    include_list, exclude_list = _patterns(include, "include"), _patterns(exclude, "exclude")
    for pattern in (include_list or []) + exclude_list:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
            raise ValueError(f"pattern {pattern!r} matches no nn.Linear or Conv1D layer; the candidates are: {shown}")
    owners = _parameter_owners(model)
    converted, zero, raw_read = 0, [], []
    for module_names in places.values():
        if include_list is not None and not _matches_any(module_names, include_list):
            continue
        if _matches_any(module_names, exclude_list):
            continue
        if any(_weight_read_raw(model, name) for name in module_names):
            raw_read.append(module_names[0])
            continue
        module = model.get_submodule(module_names[0])
        sharing = sorted(
            {owner for p in (module.weight, module.bias) if p is not None for owner in owners[id(p)]}
            - set(module_names)
        )
        if sharing:
            warn(
                f"sigma_reparam skips {module_names[0]!r}: its parameters are shared with {', '.join(sharing)} "
                "(weight tying); pass exclude=[...] with its name to silence this warning"
            )
            continue
        replacement = SigmaReparamLinear.from_linear(module, n_power_iter=n_power_iter)
        for name in module_names:
            _set_module(model, name, replacement)
        converted += 1
        if float(replacement.gamma.detach()) == 0:
            zero.append(module_names[0])
    if raw_read:
        warn(
            f"sigma_reparam skips {', '.join(map(repr, raw_read))}: nn.TransformerEncoderLayer's inference fast path "
            "(eval mode without grad) reads linear1.weight and linear2.weight directly, which would ignore γ / σ "
            "there; pass exclude=[...] with their names to silence this warning"
        )
    if zero:
        warn(f"sigma_reparam converted all-zero weights, which get no gradient and stay zero: {', '.join(zero)}")
    if converted == 0 and include_list is None and not raw_read:
        if any(isinstance(module, SigmaReparamLinear) for module in model.modules()):
            warn("sigma_reparam converted no layer: the model's layers are already σReparam (SigmaReparamLinear)")
        else:
            warn("sigma_reparam converted no layer: the model has no untied nn.Linear or Conv1D layer")
    return model


def remove_sigma_reparam(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`SigmaReparamLinear` by a plain layer holding ``Ŵ = γ · W / σ(W)``.

    ``nn.Linear`` for ordinary layers, ``transformers``' ``Conv1D`` for transposed ones, each in the mode
    (``training``) of the layer it replaces; ``Ŵ`` uses the current ``u`` (no power step), so the eval-mode function
    is unchanged. The global RNG is not consumed.

    Args:
        model: a module containing converted layers (a model without any is returned unchanged).

    Returns:
        ``model``, with plain layers.

    Example:
        >>> import torch
        >>> model = sigma_reparam(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> type(remove_sigma_reparam(model)[0]).__name__
        'Linear'
    """
    _check_model(model, removing=True)
    for module_names in _places(model, lambda module: isinstance(module, SigmaReparamLinear)).values():
        layer = model.get_submodule(module_names[0])
        plain = _plain_layer(layer)
        for name in module_names:
            _set_module(model, name, plain)
    return model


def sigma_reparam_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """``γ``, ``σ`` and ``γ / σ`` of every :class:`SigmaReparamLinear` in ``model``, by module name (detached).

    ``σ`` is the estimate from each layer's last training-mode forward (at conversion: ``σ(W₀)``). The values are
    0-d tensors on the layer's device (no host sync); the monitor logs them as ``geomon/spectral/reparam_gamma/<name>``,
    ``.../reparam_sigma/<name>`` and ``.../reparam_ratio/<name>``.

    Example:
        >>> import torch
        >>> model = sigma_reparam(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> stats = sigma_reparam_stats(model)
        >>> sorted(stats["0"]), float(stats["0"]["ratio"])
        (['gamma', 'ratio', 'sigma'], 1.0)
    """
    _check_model(model, allow_layer=True)
    stats: dict[str, dict[str, Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, SigmaReparamLinear):
            gamma, sigma = module.gamma.detach().to(module.sigma.dtype), module.sigma.detach().clone()
            stats[name] = {"gamma": gamma, "sigma": sigma, "ratio": gamma / sigma}
    return stats


def _plain_layer(layer: SigmaReparamLinear) -> nn.Module:
    with torch.no_grad():
        weight = layer.effective_weight().detach().clone()
    bias = None if layer.bias is None else _copy_parameter(layer.bias)
    if layer.transposed:
        if bias is None:
            raise ValueError("a transposed SigmaReparamLinear without bias has no Conv1D counterpart")
        from transformers.pytorch_utils import Conv1D

        with torch.random.fork_rng(devices=[]):  # Conv1D draws its initial weight from the global RNG
            plain = Conv1D(layer.out_features, layer.in_features)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    plain.bias = bias
    return plain.train(layer.training)


def _check_model(model: object, allow_layer: bool = False, removing: bool = False) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if allow_layer:
        return
    if isinstance(model, SigmaReparamLinear):
        advice = (
            "remove_sigma_reparam(nn.Sequential(layer))[0] gives the plain layer (layer.effective_weight() its weight)"
            if removing
            else "it is already σReparam"
        )
        raise TypeError(f"model is itself a SigmaReparamLinear, which cannot be replaced in place; {advice}")
    if isinstance(model, nn.Linear) or _is_conv1d(model):
        raise TypeError(
            f"model is itself a {type(model).__name__}, which cannot be replaced in place; "
            "use SigmaReparamLinear.from_linear(layer) for a single layer"
        )


def _patterns(patterns: Patterns, what: str) -> list[str] | None:
    if patterns is None:
        return None if what == "include" else []
    if isinstance(patterns, str):
        return [patterns]
    result = list(patterns)
    if not all(isinstance(p, str) for p in result):
        raise TypeError(f"{what} must be a string or a sequence of strings, got {patterns!r}")
    if what == "include" and not result:
        raise ValueError("include=[] selects no layer; pass include=None to convert every layer, or the patterns of "
                         "the layers to convert")  # fmt: skip
    return result


def _matches_any(names: list[str], patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


def _places(model: nn.Module, select) -> dict[int, list[str]]:
    """Every qualified name of each selected submodule (a module registered twice has two), keyed by identity."""
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and select(module):
            places.setdefault(id(module), []).append(name)
    return places


def _parameter_owners(model: nn.Module) -> dict[int, set[str]]:
    """For each parameter (by identity), the names of all modules that hold it directly."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), set()).add(name)
    return owners


def _weight_read_raw(model: nn.Module, name: str) -> bool:
    """Whether the layer at ``name`` is ``linear1`` / ``linear2`` of an ``nn.TransformerEncoderLayer``, whose fast
    path passes those layers' weights to a fused kernel instead of calling them."""
    parent_name, _, child = name.rpartition(".")
    return child in ("linear1", "linear2") and isinstance(model.get_submodule(parent_name), nn.TransformerEncoderLayer)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
