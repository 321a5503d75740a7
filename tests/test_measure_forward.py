"""A ``torch.compile``'d model measured by an extra forward pass (``Monitor.measure_forward``,
``GeomonCallback(measure_forward=...)``): its values equal an explicit float64 softmax of the model's own queries and
keys and what the hook-based probes log on the same model uncompiled; training (weights, buffers, losses, the
random-number state) is bit-identical to the same compiled loop without geomon, dropout and BatchNorm included."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geomon import Monitor
from geomon._tiny_gpt import TinyGPT
from geomon.capture.extra_forward import can_force_eager
from geomon.functional import GeomonWarning

pytestmark = pytest.mark.skipif(not can_force_eager(), reason="torch.compiler.set_stance needs torch >= 2.6")

VOCAB, CONTEXT = 17, 12


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (4, CONTEXT), generator=g), torch.randint(0, VOCAB, (4, CONTEXT), generator=g)


def _tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, context=CONTEXT)


def _float64_entropy_of_first_layer(model: TinyGPT, x: torch.Tensor) -> tuple[float, float]:
    """Mean entropy over batch, heads and query rows, and the largest logit, of ``blocks.0.attn``, from the
    model's weights in float64 with an explicit causal softmax."""
    m = copy.deepcopy(model).double().requires_grad_(False)
    h = m.tok(x) + m.pos(torch.arange(x.shape[1]))
    attn = m.blocks[0].attn
    b, t, d = h.shape
    q, k, _ = attn.qkv(m.blocks[0].ln1(h)).split(d, dim=2)
    q, k = (y.view(b, t, attn.n_head, d // attn.n_head).transpose(1, 2) for y in (q, k))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // attn.n_head)
    logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    p = logits.softmax(-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return entropy.mean().item(), logits.amax().item()


def _train_compiled(measure: bool, steps=3, backend="aot_eager"):
    model = _tiny_gpt()
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = Monitor(every_n_steps=1, query_rows=None, strict=True).attach(compiled) if measure else None
    logged, before = [], []
    for step in range(steps):
        x, y = _batch(step)
        if monitor is not None:
            before.append(copy.deepcopy(model))  # the weights this step's forward uses
            monitor.measure_forward(step, compiled, x, labels=y)
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            logged.append(monitor.compute(step))
    return model, logged, before


def test_measured_values_equal_an_explicit_float64_softmax_and_the_uncompiled_hooks():
    torch._dynamo.reset()
    _, logged, before = _train_compiled(True)
    shadow = _tiny_gpt()  # the uncompiled model under the hook-based probes, given each step's weights
    eager = Monitor(every_n_steps=1, query_rows=None, strict=True).attach(shadow)
    compared = set()
    for step, (values, weights) in enumerate(zip(logged, before, strict=True)):
        x, y = _batch(step)
        entropy, max_logit = _float64_entropy_of_first_layer(weights, x)
        assert float(values["geomon/attention/entropy/blocks.0.attn"]) == pytest.approx(entropy, rel=1e-5)
        assert float(values["geomon/attention/max_logit/blocks.0.attn"]) == pytest.approx(max_logit, rel=1e-5)
        shadow.load_state_dict(weights.state_dict())
        with torch.no_grad(), eager.step(step, labels=y):
            shadow(x)
        expected = eager.compute(step)
        assert sorted(values) == sorted(expected), sorted(set(values) ^ set(expected))
        for key, value in expected.items():
            if key.startswith("geomon/spectral/"):
                continue  # read off the weights at compute, after this step's update: not what `before` holds
            assert float(values[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6, nan_ok=True), key
            compared.add(key.split("/")[1])
    assert {"attention", "rankme", "nc"} <= compared, compared  # the windows closed too


def _compiled_loop(model, optimizer, steps, measure, backend):
    """Train the compiled ``model`` for ``steps`` steps, measured by ``measure_forward`` at every one if ``measure``:
    the losses and what each ``compute`` returned."""
    compiled = torch.compile(model, backend=backend)
    monitor = Monitor(every_n_steps=1, strict=True).attach(compiled) if measure else None
    losses, measured = [], []
    for step in range(steps):
        x, y = _batch(step)
        if monitor is not None:
            monitor.measure_forward(step, compiled, x, labels=y)
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if monitor is not None:
            measured.append(monitor.compute(step))
    return losses, measured


class _Noisy(nn.Module):
    """Dropout, a BatchNorm's running statistics and an attention call: what an extra forward could disturb."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.norm = nn.BatchNorm1d(16)
        self.qkv = nn.Linear(16, 48)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, x):
        h = self.norm(self.embed(x).flatten(0, 1)).view(*x.shape, 16)
        q, k, v = self.qkv(h).reshape(*x.shape, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)
        return self.head(self.drop(out.transpose(1, 2).reshape(*x.shape, 16)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_training_is_bit_identical_with_dropout_batchnorm_and_the_rng(backend):
    if backend == "inductor":
        pytest.importorskip("torch._inductor")

    def train(measure):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _Noisy().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, measured = _compiled_loop(model, optimizer, 4, measure, backend)
        return model, losses, torch.get_rng_state(), measured

    plain, plain_losses, plain_rng, _ = train(False)
    watched, watched_losses, watched_rng, measured = train(True)
    assert plain_losses == watched_losses
    assert torch.equal(plain_rng, watched_rng)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and the BatchNorm's running statistics and counter
    assert int(watched.norm.num_batches_tracked) == 4  # the training's forwards only
    assert all("geomon/attention/entropy/" in " ".join(values) for values in measured)


def test_step_on_a_compiled_model_is_refused_and_says_how_to_measure_it():
    model = _tiny_gpt()
    monitor = Monitor(every_n_steps=1).attach(torch.compile(model, backend="eager"))
    with pytest.raises(ValueError, match=r"torch.compile.*Monitor.measure_forward\(step, model, \*inputs\)"):
        monitor.step(0)
    with pytest.raises(TypeError, match="needs a callable forward"):
        monitor.measure_forward(0, "model")


def test_off_schedule_steps_run_nothing_and_a_failing_forward_is_a_warning():
    model = _tiny_gpt()
    compiled = torch.compile(model, backend="eager")
    calls = []
    monitor = Monitor(every_n_steps=5).attach(compiled)
    for step in range(1, 5):
        monitor.measure_forward(step, lambda x: calls.append(x), _batch(step)[0])
    assert calls == []  # only the head's window fills on steps before a measured one, and the LM fills it at once

    def broken(x):
        raise RuntimeError("out of memory (simulated)")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.measure_forward(5, broken, _batch(5)[0])
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]
    assert any("extra measuring forward" in m and "out of memory (simulated)" in m for m in said), said
    values = monitor.compute(5)  # weight-based values only: the forward measured nothing
    assert values and not [key for key in values if key.startswith(("geomon/attention/", "geomon/rankme"))]
    strict = Monitor(every_n_steps=1, strict=True).attach(compiled)
    with pytest.raises(RuntimeError, match="simulated"):
        strict.measure_forward(0, broken, _batch(0)[0])
    x, _ = _batch(0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # no hook left behind, the model still runs


def test_the_lightning_callback_measures_a_compiled_module_and_training_is_unchanged(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from geomon.callback import GeomonCallback

    class LitGPT(lightning.LightningModule):
        def __init__(self, compiled):
            super().__init__()
            self.model = _tiny_gpt()
            self.net = torch.compile(self.model, backend="aot_eager") if compiled else self.model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def fit(compiled, callbacks, name):
        torch._dynamo.reset()
        data = [_batch(step) for step in range(6)]
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        module = LitGPT(compiled)
        logger = lightning.loggers.CSVLogger(tmp_path, name=name)
        trainer = lightning.Trainer(max_steps=6, logger=logger, callbacks=callbacks, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                                    accelerator="cpu", deterministic=True)  # fmt: skip
        trainer.fit(module, loader)
        with open(trainer.logger.log_dir + "/metrics.csv") as handle:
            rows = list(__import__("csv").DictReader(handle))
        return module, rows

    def logged(rows, key):
        return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}

    with pytest.raises(ValueError, match=r"torch.compile.*measure_forward"):
        fit(True, [GeomonCallback(every_n_steps=2)], "refused")
    plain, plain_rows = fit(True, [], "plain")
    callback = GeomonCallback(every_n_steps=2, strict=True, measure_forward=lambda module, batch: module.net(batch[0]))
    watched, watched_rows = fit(True, [callback], "watched")
    assert logged(plain_rows, "train_loss") == logged(watched_rows, "train_loss")
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
    _, hooked_rows = fit(False, [GeomonCallback(every_n_steps=2, strict=True)], "uncompiled")
    key = "geomon/attention/entropy/model.blocks.1.attn"
    measured, hooked = logged(watched_rows, key), logged(hooked_rows, key)
    assert sorted(measured) == [0, 2, 4] and sorted(hooked) == [0, 2, 4]
    assert measured[0] == pytest.approx(hooked[0], rel=1e-6)  # the same weights and batch
    for step in (2, 4):  # aot_eager and eager training may round apart after the first update
        assert measured[step] == pytest.approx(hooked[step], rel=1e-3)


def _lit_compiled_gpt(lightning):
    """A LightningModule training a compiled (``eager`` backend) tiny GPT, as ``net``, with SGD."""

    class Lit(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.compile(_tiny_gpt(), backend="eager")

        def training_step(self, batch, batch_idx):  # float logits: the loss in fp32 under bf16 autocast too
            return F.cross_entropy(self.net(batch[0]).flatten(0, 1).float(), batch[1].flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Lit


def test_the_callbacks_extra_forward_runs_in_the_trainers_precision_context(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from geomon.callback import GeomonCallback

    Lit = _lit_compiled_gpt(lightning)

    seen = []

    def forward(module, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled()))
        module.net(batch[0])

    callback = GeomonCallback(every_n_steps=2, strict=True, measure_forward=forward)
    trainer = lightning.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", precision="bf16-mixed",
                                callbacks=[callback])  # fmt: skip
    trainer.fit(Lit(), torch.utils.data.DataLoader([_batch(step) for step in range(3)], batch_size=None))
    # steps 0 and 2, and step 1, which fills the head input's window (48 rows a step for 128)
    assert seen == [(True, torch.bfloat16, False)] * 3


class _HostRandom(nn.Module):
    """A forward that draws from Python's and NumPy's global generators, as wav2vec2's SpecAugment masks
    (``np.random``) and BigBird's random blocks do in training."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, x):
        import random

        import numpy as np

        keep = torch.from_numpy(np.random.rand(x.shape[1]) > 0.3).float() * (random.random() + 0.5)
        h = self.embed(x) * keep[None, :, None]
        q, k, v = self.qkv(h).reshape(*x.shape, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.transpose(1, 2).reshape(*x.shape, 16))


def test_a_forward_drawing_from_python_and_numpy_random_leaves_training_unchanged():
    import random

    np = pytest.importorskip("numpy")

    def train(measure):
        torch._dynamo.reset()
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        model = _HostRandom()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, measured = _compiled_loop(model, optimizer, 3, measure, "eager")
        assert all("geomon/attention/entropy/" in " ".join(values) for values in measured)
        return losses, random.getstate(), np.random.get_state()[1]

    plain_losses, plain_python, plain_numpy = train(False)
    losses, python, numpy_state = train(True)
    assert losses == plain_losses
    assert python == plain_python
    assert (numpy_state == plain_numpy).all()


def test_a_module_whose_forward_was_replaced_by_its_compiled_self_is_a_compiled_part():
    """``block.forward = torch.compile(block.forward)`` (a per-block compile) leaves plain modules: before, the monitor
    took such a model for an eager one, its first measured step ran the attention capture under Dynamo, and from then
    on nothing was armed (the head's input, outside the compiled blocks, was no longer measured either)."""
    model = _tiny_gpt()
    for block in model.blocks:
        block.forward = torch.compile(block.forward, backend="eager")
    monitor = Monitor(every_n_steps=1, strict=True).attach(model)
    assert monitor.compiled == "'blocks.0', 'blocks.1'"
    with pytest.raises(ValueError, match=r"Monitor\.measure_forward"):
        monitor.step(0)
    keys = []
    for step in range(3):
        x, y = _batch(step)
        monitor.measure_forward(step, model, x, labels=y)
        keys.append(set(monitor.compute(step)))
    assert all("geomon/attention/entropy/blocks.0.attn" in step_keys for step_keys in keys)
    assert "geomon/rankme/head.input" in keys[2]  # the head's window (128 rows, 48 a step) closed at the third step


def test_the_callback_runs_no_extra_forward_for_weight_probes_alone(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from geomon.callback import GeomonCallback

    Lit = _lit_compiled_gpt(lightning)

    calls = []
    callback = GeomonCallback(every_n_steps=1, attention=False, head=None, spectral_modules=["net.head"],
                              strict=True, measure_forward=lambda module, batch: calls.append(1))  # fmt: skip
    trainer = lightning.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", callbacks=[callback])  # fmt: skip
    trainer.fit(Lit(), torch.utils.data.DataLoader([_batch(step) for step in range(2)], batch_size=None))
    assert calls == [] and "geomon/spectral/sigma/net.head" in trainer.callback_metrics
