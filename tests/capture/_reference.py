"""Independent references for the capture tests: float64 softmax rows, entropies of given probabilities, cleanliness."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as module_hooks

from geomon.capture import AttentionCall, capture_attention
from geomon.functional import attention_entropy

ORIGINAL_SDPA = F.scaled_dot_product_attention


def softmax_rows(
    q: Tensor, k: Tensor, *, scale: float | None = None, allowed: Tensor | None = None, additive: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Entropy and max logit of every row of softmax(scale q kᵀ + additive) over allowed keys, in float64."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # query head h reads key head h // G
    scores = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if additive is not None:
        scores = scores + additive.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    p = torch.softmax(scores, dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    max_logit = scores.amax(-1)
    empty = max_logit == -math.inf
    return entropy.masked_fill(empty, math.nan), max_logit.masked_fill(empty, math.nan)


def entropy_of(weights: Tensor) -> Tensor:
    """Row entropies of attention probabilities a model returned itself."""
    weights = weights.double()
    return -torch.special.xlogy(weights, weights).sum(-1)


def rows_of(call: AttentionCall, backend: str = "torch") -> tuple[Tensor, Tensor, Tensor]:
    """``(entropy, max_logit, n_keys)`` per row, by geomon's functional from a captured call (torch backend, or the
    kernel: interpreted on the CPU)."""
    return attention_entropy(
        call.q, call.k, scale=call.scale, backend=backend, return_n_keys=True, **call.mask_arguments()
    )


def assert_rows_close(actual: Tensor, expected: Tensor, rows: Tensor | None = None, tol: float = 1e-5) -> None:
    """Equal where ``rows`` (a boolean over the last dim or full shape) selects, NaN-equal elsewhere unless selected."""
    actual, expected = actual.double(), expected.double()
    if rows is not None:
        rows = rows.expand(actual.shape)
        actual, expected = actual[rows], expected[rows]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)


def collect(model: torch.nn.Module, run, **kwargs) -> tuple[list[AttentionCall], object]:
    """The calls reported (strict) while ``run()`` executes, and its result."""
    calls: list[AttentionCall] = []
    with capture_attention(model, calls.append, strict=True, **kwargs):
        result = run()
    return calls, result


def hook_counts() -> tuple[int, int]:
    return len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks)


def assert_clean(model: torch.nn.Module, global_hooks: tuple[int, int] = (0, 0)) -> None:
    """No SDPA wrapper, no global hooks beyond ``global_hooks``, no per-module hooks left behind."""
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert hook_counts() == global_hooks
    assert not module_hooks._global_forward_hooks_always_called
    assert not module_hooks._global_forward_hooks_with_kwargs
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def choose_as_on_cuda(monkeypatch) -> list[str]:
    """Make ``backend="auto"`` choose for ``attention_entropy`` as it does on CUDA: the (interpreted) kernel for every
    call it supports, the torch path for the patterns it leaves to torch. Returns the list the choices go into."""
    import importlib

    from geomon.functional._dispatch import choose_backend

    functional = importlib.import_module("geomon.functional.attention_entropy")  # the module, not the function
    chosen: list[str] = []

    def as_on_cuda(backend, op, *tensors, unsupported=None):
        if backend == "auto" and op == "attention_entropy":
            chosen.append("torch" if unsupported else "triton")
            return chosen[-1]
        return choose_backend(backend, op, *tensors, unsupported=unsupported)

    monkeypatch.setattr(functional, "choose_backend", as_on_cuda)
    return chosen


@contextlib.contextmanager
def recorded_softmax(record):
    """``record(scores, dim)`` on every ``Tensor.softmax`` call (``F.softmax`` and ``nn.Softmax`` go through it) while
    the block runs; ``Tensor.softmax`` is as it was afterwards (TensorBase's inherited method, or whatever was set)."""
    own = "softmax" in vars(torch.Tensor)
    original = torch.Tensor.softmax

    def softmax(self, dim=None, *args, **kwargs):
        record(self, dim)
        return original(self, dim, *args, **kwargs)

    torch.Tensor.softmax = softmax
    try:
        yield
    finally:
        if own:
            torch.Tensor.softmax = original
        else:
            del torch.Tensor.softmax


def tiny_hf_model(config_name: str, model_name: str, implementation: str = "eager", **config) -> torch.nn.Module:
    """A transformers model built from its config (random weights, seed 0, eval mode, the attention implementation
    given); the test is skipped, saying so, on a transformers release that lacks the class (the floor is 4.45:
    later families are not in it)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    model_class = getattr(transformers, model_name, None)
    if model_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    built = getattr(transformers, config_name)(**config)
    built._attn_implementation = implementation
    torch.manual_seed(0)
    return model_class(built).eval()


def measure_once(model: torch.nn.Module, *args, query_rows=None, **kwargs) -> tuple[dict, dict, list[str]]:
    """One measured forward of ``model`` under a fresh attention-only monitor (every row unless ``query_rows``):
    the logged values as floats, the per-head details, and geomon's warnings."""
    from geomon import Monitor

    monitor = Monitor(every_n_steps=1, query_rows=query_rows, head=None, neural_collapse=False, alerts=[])
    monitor.attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), monitor.step(0):
            model(*args, **kwargs)
        values = {name: float(value) for name, value in monitor.compute(0).items()}
    return values, dict(monitor.details), [str(w.message) for w in caught if "geomon" in str(w.message)]


def softmax_inputs(model: torch.nn.Module, *args, **kwargs) -> dict[str, list[Tensor]]:
    """The float64 scores of every last-dim softmax a module of the model takes (3-D or more), by the innermost
    module running (a separate forward, the test's own hooks); an ``nn.Softmax`` module counts as the module that
    holds it, as it is that module's softmax."""
    names = {id(m): n for n, m in model.named_modules()}
    running: list[str] = []
    inputs: dict[str, list[Tensor]] = {}

    def record(scores, dim):
        if running and scores.ndim >= 3 and dim in (-1, scores.ndim - 1):
            inputs.setdefault(running[-1], []).append(scores.detach().double())

    def enter(module, args):
        held = isinstance(module, torch.nn.Softmax) and running
        running.append(running[-1] if held else names.get(id(module), ""))

    def leave(module, args, output):
        running.pop()  # returns None: the output stays the module's

    pre = module_hooks.register_module_forward_pre_hook(enter)
    post = module_hooks.register_module_forward_hook(leave)
    try:
        with recorded_softmax(record), torch.no_grad():
            model(*args, **kwargs)
    finally:
        pre.remove()
        post.remove()
    return inputs


def returned_probabilities(model: torch.nn.Module, class_name: str, *args, **kwargs) -> dict[str, Tensor]:
    """The probabilities each module of class ``class_name`` returns (its output's second element) in one forward
    with ``output_attentions=True``, by module name: where a model returns only some of them (a stage's last
    block), each module's own."""
    own: dict[str, Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, a, out, name=name: own.__setitem__(name, out[1]))
        for name, module in model.named_modules()
        if type(module).__name__ == class_name
    ]
    try:
        with torch.no_grad():
            model(*args, output_attentions=True, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return own


def own_softmax_entropy(model: torch.nn.Module, *args, **kwargs) -> dict[str, float]:
    """Mean float64 entropy of the rows of every last-dim softmax a module of the model takes (see
    :func:`softmax_inputs`)."""
    means = {}
    for name, calls in softmax_inputs(model, *args, **kwargs).items():
        rows = []
        for scores in calls:
            p = torch.softmax(scores, -1)  # torch.softmax is not the recorded tensor method
            rows.append(-torch.special.xlogy(p, p).sum(-1).flatten())
        means[name] = float(torch.cat(rows).mean())
    return means


def assert_layers_equal_their_scores(values: dict, details: dict, reference: dict) -> None:
    """Each layer's logged entropy (per head and mean) and max logit equal those of the one softmax input it took,
    over its real rows: ``reference[layer] = ([scores], rows)``, scores ``[B', H, N, N]`` (``[B'·H, N, N]``
    batch-major, or ``[B, windows, H, N, N]``), rows ``[B', N]`` True at the real query rows."""
    import pytest

    from geomon.keys import ENTROPY, MAX_LOGIT, key

    for layer, (calls, rows) in reference.items():
        assert len(calls) == 1
        heads = details[key(ENTROPY, layer)].shape[0]
        scores = calls[0]
        if scores.ndim == 3:  # [B·H, N, N], batch-major
            scores = scores.unflatten(0, (-1, heads))
        if scores.ndim == 5:  # [B, windows, H, N, N]
            scores = scores.flatten(0, 1)
        rows = rows[:, None, :].expand(scores.shape[:-1])
        entropy = entropy_of(torch.softmax(scores, dim=-1))
        per_head = torch.stack([entropy[:, h][rows[:, h]].mean() for h in range(heads)])
        torch.testing.assert_close(details[key(ENTROPY, layer)].double(), per_head, rtol=1e-5, atol=1e-6)
        assert values[key(ENTROPY, layer)] == pytest.approx(float(entropy[rows].mean()), rel=1e-5)
        assert values[key(MAX_LOGIT, layer)] == pytest.approx(float(scores.amax(-1)[rows].max()), rel=1e-5)
