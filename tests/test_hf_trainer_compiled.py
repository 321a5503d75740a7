"""The Hugging Face Trainer with ``torch_compile=True``: GeomonTrainerCallback measures the compiled model by an extra
eager forward run from ``compute_loss`` (``Monitor.measure_forward``). Before, its hooks and the patched attention
call ran under Dynamo: nothing was measured and every measured step recompiled the graph (8 graphs for 2, until
Dynamo's recompile limit sent a frame back to eager for the rest of the run)."""

import dataclasses
import os
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from geomon.capture.extra_forward import can_force_eager  # noqa: E402
from geomon.integrations.huggingface import GeomonTrainerCallback  # noqa: E402
from tests.test_hf_trainer import ENTROPY, Tokens, _args, _model  # noqa: E402

pytestmark = pytest.mark.skipif(not can_force_eager(), reason="torch.compiler.set_stance needs torch >= 2.6")


def _train(compiled: bool, watched: bool | GeomonTrainerCallback):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE"):  # set by TrainingArguments(torch_compile)
        os.environ.pop(name, None)
    args = _args(tempfile.mkdtemp(), steps=6)
    args = dataclasses.replace(args, torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None)
    if watched is True:
        watched = GeomonTrainerCallback(every_n_steps=2, strict=True)
    callbacks = [watched] if watched else []
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    history = trainer.state.log_history
    losses = [row["loss"] for row in history if "loss" in row]
    entropy = {row["step"]: row[ENTROPY] for row in history if ENTROPY in row}
    graphs = counters["stats"]["unique_graphs"]
    return [p.detach().clone() for p in trainer.model.parameters()], losses, entropy, graphs


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE"):
        monkeypatch.setenv(name, "")  # recorded, so that the end of the test removes what the Trainer sets
        monkeypatch.delenv(name)


def test_a_compiled_trainer_is_measured_without_recompiling_or_changing_training():
    plain, plain_losses, _, plain_graphs = _train(compiled=True, watched=False)
    watched, losses, entropy, graphs = _train(compiled=True, watched=True)
    assert losses == plain_losses and len(losses) == 3
    for a, b in zip(plain, watched, strict=True):
        assert torch.equal(a, b)
    assert graphs == plain_graphs  # no graph of geomon's making
    _, _, hooked, _ = _train(compiled=False, watched=True)  # the hook-based probes on the eager model
    assert sorted(entropy) == sorted(hooked) == [2, 4, 6]
    for step in entropy:  # aot_eager and eager training may round apart after the first update
        assert entropy[step] == pytest.approx(hooked[step], rel=1e-4)


class _SamplingTrainer(transformers.Trainer):
    """As TRL's GRPO: ``_prepare_inputs`` has side effects (it samples completions and advances a buffer index)."""

    calls = 0

    def _prepare_inputs(self, inputs):
        type(self).calls += 1
        inputs = super()._prepare_inputs(inputs)
        sampled = torch.randint(0, 50, inputs["input_ids"].shape)
        return {**inputs, "input_ids": (inputs["input_ids"] + sampled) % 50}


def test_the_extra_forward_prepares_nothing_twice_and_runs_in_training_mode_after_an_evaluation():
    """The extra pass runs from ``compute_loss``: on the inputs as ``training_step`` prepared them (once: a second
    ``_prepare_inputs`` would have sampled again and changed training) and after its ``model.train()`` (an
    evaluation before a measured step leaves the model in eval mode)."""

    def train(watched):
        torch._dynamo.reset()
        for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE"):
            os.environ.pop(name, None)
        args = dataclasses.replace(_args(tempfile.mkdtemp(), steps=3), torch_compile=True,
                                   torch_compile_backend="aot_eager", eval_strategy="steps", eval_steps=1,
                                   per_device_eval_batch_size=8)  # fmt: skip
        model = _model()
        modes = []
        model.transformer.h[0].register_forward_pre_hook(
            lambda module, args: modes.append((module.training, torch.is_grad_enabled()))
        )
        callbacks = [GeomonTrainerCallback(every_n_steps=1, strict=True)] if watched else []
        trainer = _SamplingTrainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(16),
                                   callbacks=callbacks)  # fmt: skip
        _SamplingTrainer.calls = 0
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        measured = [row["step"] for row in trainer.state.log_history if ENTROPY in row]
        return losses, [p.detach().clone() for p in model.parameters()], _SamplingTrainer.calls, modes, measured

    plain_losses, plain, plain_calls, _, _ = train(False)
    losses, weights, calls, modes, measured = train(True)
    assert calls == plain_calls == 9  # 3 training steps, and 3 evaluations of 2 batches
    assert losses == plain_losses
    for a, b in zip(plain, weights, strict=True):
        assert torch.equal(a, b)
    assert measured == [1, 2, 3]
    # per step: the extra pass (no grad), the training forward, then the evaluation's two forwards (no grad, eval)
    assert [modes[i] for i in range(0, len(modes), 4)] == [(True, False)] * 3, modes


def test_weight_probes_alone_need_no_extra_forward():
    """σ(W) reads the weights: a compiled Trainer watched for it alone runs no extra forward pass."""
    callback = GeomonTrainerCallback(every_n_steps=2, attention=False, head=None, strict=True,
                                     spectral_modules=["transformer.h.0.mlp.c_fc"])  # fmt: skip
    calls = []
    measure = callback.monitor.measure_forward
    callback.monitor.measure_forward = lambda *args, **kwargs: calls.append(args[0]) or measure(*args, **kwargs)
    computed, compute = [], callback.monitor.compute
    callback.monitor.compute = lambda *args, **kwargs: computed.append(compute(*args, **kwargs)) or computed[-1]
    _, plain_losses, _, plain_graphs = _train(compiled=True, watched=False)
    _, losses, _, graphs = _train(compiled=True, watched=callback)
    assert calls == [] and losses == plain_losses and graphs == plain_graphs
    assert len(computed) == 3 and all("geomon/spectral/sigma/transformer.h.0.mlp.c_fc" in v for v in computed)
    callback = GeomonTrainerCallback(every_n_steps=2, strict=True)  # the default probes read the forward
    measure_default = callback.monitor.measure_forward
    callback.monitor.measure_forward = lambda *args, **kwargs: calls.append(args[0]) or measure_default(*args, **kwargs)
    _train(compiled=True, watched=callback)
    assert calls == [2, 4, 6]


def test_an_evaluation_call_of_compute_loss_is_not_measured_by_a_wrapper_left_behind():
    """HF calls no callback when a training step raises, so the one-shot ``compute_loss`` wrapper of a measured step
    can outlive it; an evaluation then calls ``compute_loss`` in eval mode without gradients: it passes through."""
    callback = GeomonTrainerCallback(every_n_steps=1, strict=True)
    args = dataclasses.replace(_args(tempfile.mkdtemp(), steps=1), per_device_eval_batch_size=8)
    trainer = transformers.Trainer(model=_model(), args=args, eval_dataset=Tokens(16), callbacks=[callback])
    callback.trainer = trainer
    callback.monitor.attach(trainer.model)
    calls = []
    callback.monitor.measure_forward = lambda *a, **k: calls.append(a[0])
    callback._wrap_compute_loss()  # as on_step_begin of a measured step whose training call never came
    trainer.evaluate()
    assert calls == [] and "compute_loss" in vars(trainer)  # passed through, still waiting for a training call
    callback._release()
    assert "compute_loss" not in vars(trainer)
