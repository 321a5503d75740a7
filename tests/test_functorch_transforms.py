"""A model run inside a ``torch.func`` transform on a measured step (per-sample gradients for DP-SGD or clipping,
an ensemble under ``vmap``): the transform's tensors are wrappers that must not leave it. geomon's hooks stand aside
there and say so once; the step's plain forward is still measured. Before, the wrappers went into the probes'
state: every later compute of those probes failed, ``torch.save(monitor.state_dict())`` raised, and a Lightning fit
crashed while saving its checkpoint."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from geomon import GeomonWarning, Monitor
from geomon._tiny_gpt import TinyGPT
from tests.reference import ref_rankme

VOCAB, SEQ = 23, 12
RANKME = "geomon/rankme/head.input"


def per_sample_grads(model, x, y):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)).flatten(0, 1), yi)

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def run(transform: bool, monitored: bool = True):
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, context=SEQ)
    monitor = (
        Monitor(every_n_steps=1, neural_collapse=False, alerts=(), window_rows=4 * SEQ).attach(model)
        if monitored
        else None
    )
    g = torch.Generator().manual_seed(1)
    rows, logged, grads = [], [], []
    model.head.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach().flatten(0, -2).clone()))
    for step in range(3):
        x, y = torch.randint(0, VOCAB, (4, SEQ), generator=g), torch.randint(0, VOCAB, (4, SEQ), generator=g)
        with monitor.step(step) if monitored else torch.enable_grad():
            if transform:
                grads.append(per_sample_grads(model, x, y))
            model(x)
        if monitored:
            logged.append(monitor.compute(step))
    return monitor, rows, logged, grads


def test_a_forward_inside_vmap_and_grad_is_left_out_and_named_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, rows, logged, _ = run(transform=True)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning) and "torch.func" in str(w.message)]
    assert len(said) == 1, said
    plain_rows = [r for r in rows if not torch._C._functorch.is_functorch_wrapped_tensor(r)]
    assert len(plain_rows) == 3  # the plain forward of each step (the hook above sees the transform's too)
    for values, head_input in zip(logged, plain_rows, strict=True):
        assert float(values[RANKME]) == pytest.approx(ref_rankme(head_input.double().numpy()), rel=1e-4)
    attention = [k for k in logged[-1] if k.startswith("geomon/attention/entropy/")]
    assert attention and all(torch.isfinite(logged[-1][k]) for k in attention)
    torch.save(monitor.state_dict(), io.BytesIO())  # raised on a wrapper that had escaped the transform


def test_per_sample_gradients_are_the_same_with_and_without_geomon():
    _, _, _, monitored = run(transform=True)
    _, _, _, plain = run(transform=True, monitored=False)
    for a, b in zip(monitored, plain, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_the_values_are_those_of_the_step_without_the_transform():
    _, _, with_transform, _ = run(transform=True)
    _, _, without, _ = run(transform=False)
    for a, b in zip(with_transform, without, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
