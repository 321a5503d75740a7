"""The model matrix (issue 11): what the Monitor logs per attention layer equals the model's own attention.

One cell per model family x attention implementation x padding side (``tests/capture/_matrix.py``, data shared with
the docs table). For each cell the model is monitored for one measured step over a batch with padding, and every
attention layer's logged ``entropy`` (mean over batch, heads and real query rows) and ``max_logit`` (over real rows
and allowed keys) must equal, to 1e-5 relative, the float64 values computed from the scores the model itself hands to
its softmax (a copy with identical weights on its explicit-softmax path). A cell geomon cannot capture must say so
with a warning and log nothing for that layer."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from collections import Counter

import pytest
import torch

from geomon import Monitor, keys
from tests.capture._matrix import CASES, DOCS, TOLERANCE, Case, docs_table, render, softmax_reference
from tests.capture._reference import choose_as_on_cuda

#: torch's fused attention kernels, taken only when no hook or grad is in the way
NATIVE = ("_native_multi_head_attention", "_transformer_encoder_layer_fwd")


@contextlib.contextmanager
def _native_calls() -> Counter:
    """Count the calls of torch's native attention kernels while the block runs."""
    counts: Counter = Counter()
    originals = {name: getattr(torch, name) for name in NATIVE}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in NATIVE:
        setattr(torch, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


def _forward(setup, model) -> None:
    model.train(setup.train)
    with torch.set_grad_enabled(setup.train):
        setup.forward(model)


def _monitored(case: Case, setup) -> tuple[dict[str, tuple[float, float]], list[str], Counter]:
    """``{module: (entropy, max_logit)}`` as logged after one measured step, geomon's warnings, and the native
    attention kernels the monitored forward ran."""
    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False, alerts=(), strict=case.warns is None)
    model = setup.model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.attach(model)
        with monitor.step(0), _native_calls() as native:
            _forward(setup, model)
        values = monitor.compute()
    entropy_prefix, max_prefix = keys.prefix(keys.ENTROPY), keys.prefix(keys.MAX_LOGIT)
    logged = {}
    for key, value in values.items():
        if key.startswith(entropy_prefix):
            name = key[len(entropy_prefix) :]
            logged[name] = (float(value), float(values[max_prefix + name]))
    # the weight probes' notes (a logit map not logged for rotary layers) are not about capture
    messages = [str(w.message) for w in caught if "geomon" in str(w.message) and "logit map" not in str(w.message)]
    return logged, messages, native


def _relative(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-12)


def _record(case: Case, result: dict) -> None:
    path = os.environ.get("GEOMON_MATRIX_OUT")  # the measured errors, for the closing note
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"cell": case.id, **result}) + "\n")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_logged_entropy_and_max_logit_equal_the_models_own_softmax(case: Case):
    setup = case.build(case.implementation, case.padding)
    expected = softmax_reference(setup)
    assert expected, "the reference model ran no softmax over attention scores"
    with _native_calls() as unmonitored:
        _forward(setup, copy.deepcopy(setup.model))
    logged, messages, monitored = _monitored(case, setup)
    errors = {"entropy": 0.0, "max_logit": 0.0}
    missing = sorted(set(expected) - set(logged))
    for name in set(expected) & set(logged):
        errors["entropy"] = max(errors["entropy"], _relative(logged[name][0], expected[name][0]))
        errors["max_logit"] = max(errors["max_logit"], _relative(logged[name][1], expected[name][1]))
    paths = {"unmonitored": dict(unmonitored), "monitored": dict(monitored)}
    _record(case, {**errors, "missing": missing, "extra": sorted(set(logged) - set(expected)), "warnings": messages,
                   **paths})  # fmt: skip
    if case.warns is not None:
        assert missing, "a cell expected not to be captured logged every layer"
        for name in missing:
            assert any(name in m and re.search(case.warns, m) for m in messages), (name, messages)
        return
    assert not messages, messages
    assert monitored == unmonitored, f"monitoring changed the attention path: {paths}"
    assert sorted(logged) == sorted(expected), f"logged {sorted(logged)}, the model ran {sorted(expected)}"
    assert errors["entropy"] <= TOLERANCE and errors["max_logit"] <= TOLERANCE, errors


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.warns is None])
def test_the_kernel_as_cuda_would_run_it_logs_the_models_own_softmax(case: Case, monkeypatch):
    """Each cell again, with ``backend="auto"`` choosing as on CUDA: the (interpreted) kernel for every captured call it
    supports, the torch path for the patterns it leaves to torch (flex, x-transformers' zero keys)."""
    chosen = choose_as_on_cuda(monkeypatch)
    setup = case.build(case.implementation, case.padding)
    expected = softmax_reference(setup)
    logged, messages, _ = _monitored(case, setup)
    assert not messages, messages
    assert sorted(logged) == sorted(expected) and chosen, (sorted(logged), chosen)
    for name in expected:
        assert _relative(logged[name][0], expected[name][0]) <= TOLERANCE, (name, "entropy", chosen)
        assert _relative(logged[name][1], expected[name][1]) <= TOLERANCE, (name, "max_logit", chosen)
    _record(case, {"kernel_calls": chosen.count("triton"), "torch_calls": chosen.count("torch")})
    # every call goes to the kernel, ALiBi biases (Bloom, MPT) and module masks included
    assert set(chosen) == {"triton"}, chosen


def test_the_docs_table_is_the_rendered_matrix():
    assert docs_table(DOCS.read_text()) == render(), "regenerate it: python -m tests.capture._matrix"
