"""A model called inside a ``torch.compile``'d function: geomon's hooks stand aside while Dynamo traces (whatever
they did would be compiled into the graph), so the training is bit-identical to the same loop without geomon, and
the monitor says once that nothing read during the forward was measured. Before, the hooks were traced (graph
breaks, recompilations) and the trained weights differed from the unmonitored run's."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from geomon import Monitor
from geomon._tiny_gpt import TinyGPT
from geomon.capture.extra_forward import can_force_eager
from geomon.functional import GeomonWarning

VOCAB = 17


def _train(monitored: bool, **options):
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, context=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch._dynamo.reset()

    @torch.compile
    def loss_of(x, y):
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    monitor = Monitor(**{"every_n_steps": 1, "strict": True, **options}).attach(model) if monitored else None
    g = torch.Generator().manual_seed(1)
    logged = []
    for step in range(1, 4):
        x, y = torch.randint(0, VOCAB, (4, 12), generator=g), torch.randint(0, VOCAB, (4, 12), generator=g)
        if monitor is None:
            loss = loss_of(x, y)
        else:
            with monitor.step(step, labels=y):
                loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            logged.append(monitor.compute(step))
    return [p.detach().clone() for p in model.parameters()], logged


def test_a_compiled_training_function_trains_as_without_geomon_and_is_named():
    pytest.importorskip("torch._inductor")
    plain, _ = _train(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitored, logged = _train(True)
    for a, b in zip(plain, monitored, strict=True):
        assert torch.equal(a, b)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]
    said = [message for message in said if "torch.compile" in message]
    assert len(said) == 1 and "nothing read during the forward was measured" in said[0], said
    for values in logged:  # nothing from the forward, not zeros or NaN
        assert not [key for key in values if key.startswith(("geomon/attention/", "geomon/rankme", "geomon/nc/"))]


def test_a_compiled_function_traced_before_the_first_measured_step_is_named_too():
    """Traced on an unmeasured step with nothing that forces a new trace (no attention capture), the compiled code
    runs without geomon's hooks on the measured step: none fires, and the monitor says so."""
    pytest.importorskip("torch._inductor")
    plain, _ = _train(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitored, logged = _train(True, every_n_steps=2, attention=False)
    for a, b in zip(plain, monitored, strict=True):
        assert torch.equal(a, b)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]
    said = [message for message in said if "torch.compile" in message]
    assert len(said) == 1, said
    assert not [key for values in logged for key in values if key.startswith(("geomon/rankme", "geomon/nc/"))]


def test_a_head_read_without_its_forward_is_named_and_attention_still_measured():
    """A fused loss that reads the head's weight directly (a fused linear cross-entropy) never calls its forward:
    the head's input is not measured, which is said once, while the attention measured on that step is logged and
    not called unmeasured."""
    model = TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, context=12)

    def fused_loss(x, y):
        h = model.tok(x) + model.pos(torch.arange(x.shape[1]))
        for block in model.blocks:
            h = block(h)
        features = model.ln_f(h)
        return torch.nn.functional.cross_entropy((features @ model.head.weight.T).flatten(0, 1), y.flatten())

    monitor = Monitor(every_n_steps=1, strict=True).attach(model)
    x, y = torch.randint(0, VOCAB, (4, 12)), torch.randint(0, VOCAB, (4, 12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor.step(0, labels=y):
            fused_loss(x, y)
        values = monitor.compute()
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]
    assert [m for m in said if "was not called through its forward" in m and "'head'" in m], said
    assert not [m for m in said if "none of the watched modules" in m], said
    assert "geomon/attention/entropy/blocks.0.attn" in values


@pytest.mark.skipif(not can_force_eager(), reason="torch.compiler.set_stance needs torch >= 2.6")
def test_later_measured_steps_do_not_recompile_and_measure_forward_still_measures():
    """The attention interception is a new function at every measured step, and Dynamo guards on the function it
    traced: before, every measured step recompiled the compiled function (8 graphs for 1 in 24 steps, then Dynamo's
    recompile limit ran the frame eagerly for the rest of the run). Once a measured forward ran under compile,
    later steps arm nothing: one more graph (the first measured step's) and no more; an extra eager forward
    (``measure_forward``) is still measured."""
    from torch._dynamo.utils import counters

    def graphs(monitored: bool) -> tuple[int, list[dict]]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, context=12)
        loss_of = torch.compile(lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten()), backend="aot_eager")
        monitor = Monitor(every_n_steps=2).attach(model) if monitored else None
        g = torch.Generator().manual_seed(1)
        logged = []
        for step in range(24):
            x, y = torch.randint(0, VOCAB, (4, 12), generator=g), torch.randint(0, VOCAB, (4, 12), generator=g)
            if monitor is None:
                loss_of(x, y).backward()
                continue
            if step >= 20:
                monitor.measure_forward(step, model, x, labels=y)
            with monitor.step(step, labels=y):
                loss_of(x, y).backward()
            logged.append(monitor.compute(step))
        return counters["stats"]["unique_graphs"], logged

    plain, _ = graphs(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitored, logged = graphs(True)
    assert plain == 1 and monitored <= plain + 1, (plain, monitored)
    measured = [step for step, values in enumerate(logged) if "geomon/attention/entropy/blocks.0.attn" in values]
    assert measured == [20, 22], measured


def test_a_compiled_teacher_inside_a_measured_block_is_not_compiled_again_at_every_step():
    """A compiled model that is not watched (a distillation teacher) runs inside the watched student's measured
    block: it traces geomon's global module hooks and the SDPA dispatcher. They were new objects at every measured
    step, so the teacher recompiled at each one (8 graphs in 12 steps, then Dynamo's recompile limit ran it eagerly
    for the rest of the run). They are the same objects at every step now: one graph without them, one with, and
    the student is measured at every step, to the values it logs without the teacher (none of the teacher's
    attention is counted as the student's)."""
    from torch._dynamo.utils import counters

    def run(with_teacher):
        torch._dynamo.reset()
        torch.manual_seed(0)
        student = TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, context=12)
        teacher = torch.compile(TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, context=12),
                                backend="eager")  # fmt: skip
        monitor = Monitor(every_n_steps=1, strict=True, neural_collapse=False).attach(student)
        counters.clear()
        g = torch.Generator().manual_seed(1)
        logged = []
        for step in range(12):
            x = torch.randint(0, VOCAB, (4, 12), generator=g)
            with torch.no_grad():
                if with_teacher:
                    teacher(x)  # outside the block: the graph without geomon's hooks
                with monitor.step(step):
                    if with_teacher:
                        teacher(x)
                    student(x)
            logged.append({key: float(value) for key, value in monitor.compute(step).items()})
        return logged, counters["stats"]["unique_graphs"]

    alone, _ = run(with_teacher=False)
    logged, graphs = run(with_teacher=True)
    assert graphs <= 2, graphs
    assert sum("geomon/attention/entropy/blocks.0.attn" in values for values in logged) == 12
    for step, (got, want) in enumerate(zip(logged, alone, strict=True)):
        assert got.keys() == want.keys(), step
        for key, value in want.items():
            assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), (step, key)
