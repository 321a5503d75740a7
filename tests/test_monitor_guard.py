"""Monitoring never crashes training, never raises a false emergency, and counts what it sees once.

Each test is a case that once crashed a run, fired an ERROR on a healthy one, or counted rows twice."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from geomon import GeomonWarning, Monitor
from geomon._tiny_gpt import TinyGPT
from geomon.functional import neural_collapse, rankme
from geomon.probes.base import metric_bytes


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=19, d_model=32, n_layer=2, n_head=4, context=12).eval()


def _x(rows=4, length=12, seed=1):
    return torch.randint(0, 19, (rows, length), generator=torch.Generator().manual_seed(seed))


def _no_alert(monitor):
    return [event for event in monitor.events if event.kind == "fired"] == []


def test_labels_outside_the_classes_are_ignored_with_a_count():
    model = _model()
    x = _x(8)
    labels = torch.cat([x[:, 1:], torch.full((8, 1), -1)], dim=1)  # -1: a common ignore index that is not -100
    labels[0, :3] = 19  # one past the last class
    features = {}
    model.head.register_forward_hook(lambda m, i, o: features.update(h=i[0].detach()))
    monitor = Monitor(every_n_steps=1, window_rows=8).attach(model)
    with torch.no_grad(), monitor.step(0, labels=labels):
        model(x)
    with pytest.warns(GeomonWarning, match=r"11 rows .* outside \[0, 19\) other than -100"):
        values = monitor.compute(0)
    keep = (labels >= 0) & (labels < 19)
    want = neural_collapse(features["h"][keep].double(), labels[keep], model.head.weight.detach().double())
    assert float(values["geomon/nc/nc1/head.input"]) == pytest.approx(float(want["nc1"]), rel=1e-6)
    assert _no_alert(monitor)


def test_a_module_removed_after_attach_is_skipped_with_a_warning():
    model = _model()
    model.extra = nn.Linear(32, 32)
    monitor = Monitor(every_n_steps=1, embedding_modules=["extra"], spectral_modules=["extra"]).attach(model)
    del model.extra
    with pytest.warns(GeomonWarning, match="'extra' is no longer in the model"):
        with torch.no_grad(), monitor.step(0):
            model(_x())
        values = monitor.compute(0)
    assert "geomon/attention/entropy/blocks.0.attn" in values
    assert not [key for key in values if key.endswith("/extra")]


def test_steps_of_numpy_or_tensor_type_work_and_a_float_fails_before_anything_is_consumed():
    model = _model()
    monitor = Monitor(every_n_steps=2).attach(model)
    with torch.no_grad(), monitor.step(np.int64(4)):
        model(_x())
    with pytest.raises(TypeError, match="the step must be an integer"):
        monitor.compute(4.0)
    values = monitor.compute(torch.tensor(4))  # the window survived the refused call
    assert math.isfinite(float(values["geomon/attention/entropy/blocks.0.attn"]))
    assert not monitor.is_scheduled(np.int32(3))


class Dropping(nn.Module):
    """A TinyGPT whose forward can skip blocks (layer drop)."""

    def __init__(self):
        super().__init__()
        self.gpt = _model()

    def forward(self, idx, keep=(0, 1)):
        gpt = self.gpt
        x = gpt.tok(idx) + gpt.pos(torch.arange(idx.shape[1]))
        for i in keep:
            x = gpt.blocks[i](x)
        return gpt.head(gpt.ln_f(x))


@pytest.mark.parametrize("case", ["layer_dropped", "empty_batch", "one_token", "not_measured"])
def test_what_did_not_run_logs_nothing_and_raises_no_alert(case):
    model = Dropping().eval()
    monitor = Monitor(every_n_steps=2, window_rows=4, strict=True).attach(model)
    step = 1 if case == "not_measured" else 0
    x = {"empty_batch": _x(0), "one_token": _x(4, length=1)}.get(case, _x())
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeomonWarning)  # no NaN warning either
        with torch.no_grad(), monitor.step(step, labels=torch.randint(0, 19, x.shape)):
            model(x, keep=(1,) if case == "layer_dropped" else (0, 1))
        values = monitor.compute(step)
    assert all(math.isfinite(float(value)) for value in values.values()), values
    assert _no_alert(monitor)
    attention = {key for key in values if key.startswith("geomon/attention/")}
    if case == "layer_dropped":
        assert attention == {f"geomon/attention/{s}/gpt.blocks.1.attn" for s in ("entropy", "entropy_normalized",
                                                                                  "max_logit")}  # fmt: skip
    elif case == "one_token":  # one key per row: entropy 0 and a max logit, no normalised entropy (log 1 = 0)
        assert attention == {f"geomon/attention/{s}/gpt.blocks.{i}.attn" for s in ("entropy", "max_logit")
                             for i in (0, 1)}  # fmt: skip
        assert all(float(values[f"geomon/attention/entropy/gpt.blocks.{i}.attn"]) == 0 for i in (0, 1))
    else:
        assert attention == set()
    if case == "not_measured":
        assert [key for key in values if not key.startswith("geomon/alerts/")] == []


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_counts_each_row_once(reentrant):
    def run(checkpointed):
        model = _model()
        model.train()
        monitor = Monitor(every_n_steps=1, embedding_modules=["blocks.0"], window_rows=48, strict=True).attach(model)
        x = _x()
        with monitor.step(0):
            h = model.tok(x) + model.pos(torch.arange(12))
            for block in model.blocks:
                h = checkpoint(block, h, use_reentrant=reentrant) if checkpointed else block(h)
            loss = model.head(model.ln_f(h)).logsumexp(-1).mean()
        loss.backward()
        n = float(monitor.plan.probes["embedding:blocks.0"].rankme.n)
        return n, monitor.compute(0)

    n_plain, plain = run(False)
    n_checkpointed, checkpointed = run(True)
    assert n_plain == n_checkpointed == 48
    for key in ("geomon/rankme/blocks.0", "geomon/attention/entropy/blocks.1.attn"):
        assert float(checkpointed[key]) == pytest.approx(float(plain[key]), rel=1e-9)


def test_rankme_of_an_observed_window_equals_the_function():
    monitor = Monitor(every_n_steps=1, window_rows=64, attention=False, head=None).attach(nn.Linear(2, 2))
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with monitor.step(0):
        monitor.observe("z", z)
    assert float(monitor.compute()["geomon/rankme/z"]) == pytest.approx(float(rankme(z.double())), rel=1e-9)


def test_the_memory_budget_is_checked_at_attach_naming_the_largest_probes():
    model = _model()
    with pytest.raises(ValueError, match=r"over memory_budget_mib=0\.01: collapse:head\.input 0\.0"):
        Monitor(memory_budget_mib=0.01).attach(model)
    monitor = Monitor(embedding_modules=["blocks.*"], spectral_modules=["head"]).attach(model)
    for probe in monitor.plan:  # the planned sizes are what the allocated metrics hold
        metrics = [m for m in vars(probe).values() if hasattr(m, "_defaults")]
        if metrics and probe.kind != "spectral":
            assert probe.state_bytes() >= sum(metric_bytes(m) for m in metrics), probe.pid
            assert probe.state_bytes() <= 1.5 * sum(metric_bytes(m) for m in metrics) + 1024, probe.pid


def test_a_compiled_model_is_refused_with_advice_that_keeps_training_unchanged():
    def train(watch):
        model = _model().train()
        compiled = torch.compile(model, backend="aot_eager")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if watch:
            with pytest.raises(ValueError, match=re.escape("attention=False, head=None, embedding_modules=()")):
                Monitor().attach(compiled).step(0)  # hook-based probes: the step is refused, measure_forward is not
            monitor = Monitor(every_n_steps=1, attention=False, head=None, spectral_modules=["blocks.*.attn.qkv"])
            monitor.attach(compiled)
        for step in range(4):
            x = _x(seed=step)
            with monitor.step(step) if watch else torch.enable_grad():
                logits = compiled(x)
            if watch:
                monitor.observe("logits", logits)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            values = monitor.compute(step) if watch else {}
        return model, values

    plain, _ = train(False)
    watched, values = train(True)
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "geomon/spectral/sigma/blocks.0.attn.qkv" in values  # named as on the model itself


def test_the_default_budget_admits_a_70b_shaped_head():
    from geomon.probes.plan import PlanOptions, build_plan

    with torch.device("meta"):  # nothing is allocated: the plan reads shapes
        model = nn.ModuleDict({"body": nn.Linear(8192, 8192), "lm_head": nn.Linear(8192, 128256, bias=False)})
    with pytest.warns(GeomonWarning, match="neural collapse is off"):
        plan = build_plan(model, PlanOptions())
    assert "embedding:lm_head.input" in plan.probes and "collapse:lm_head.input" not in plan.probes
    assert 8192**2 * 8 <= plan.state_bytes() < PlanOptions().memory_budget_mib * (1 << 20)  # one 512 MiB Gram


def test_a_block_nested_in_another_of_the_same_monitor_counts_each_row_once():
    model = _model()
    monitor = Monitor(every_n_steps=1, neural_collapse=False, alerts=()).attach(model)
    x = torch.randint(0, 19, (4, 12), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor.step(0), monitor.step(0):
            model(x)
    assert [str(w.message) for w in caught if "inside another block" in str(w.message)]
    attention = monitor.plan.probes["attention:blocks.0.attn"].metric
    assert float(attention.count.sum()) == 4 * 4 * 12  # batch x heads x queries, once (twice before)
    assert float(monitor.plan.probes["embedding:head.input"].rankme.n) == 4 * 12
