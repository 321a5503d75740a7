"""GeomonCallback in real Lightning fits: both namespaces, real CSV logger, no perturbation, hooks gone."""

import csv

import pytest
import torch
import torch.nn.functional as F

lightning = pytest.importorskip("lightning.pytorch")
import pytorch_lightning  # noqa: E402

from geomon._tiny_gpt import TinyGPT  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from tests.firing_rule import FiresFrom  # noqa: E402

SDPA = F.scaled_dot_product_attention


def _module_class(namespace):
    class LitGPT(namespace.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyGPT(vocab_size=19, d_model=32, n_layer=2, n_head=4, context=12)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            logits = self.model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return LitGPT


def _loader(batch_size=8):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 19, (48, 12), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _fit(namespace, tmp_path, callbacks, accumulate=1):
    torch.manual_seed(0)
    module = _module_class(namespace)()
    trainer = namespace.Trainer(
        max_steps=6 // accumulate,
        accumulate_grad_batches=accumulate,
        logger=namespace.loggers.CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(module, _loader())
    return module, trainer


@pytest.mark.parametrize("namespace", [lightning, pytorch_lightning], ids=["lightning", "pytorch_lightning"])
def test_values_reach_the_csv_logger_on_schedule(namespace, tmp_path):
    callback = GeomonCallback(
        every_n_steps=2, embedding_modules=["model.ln_f"], spectral_modules=["model.head"], strict=True
    )
    _, trainer = _fit(namespace, tmp_path, [callback])
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    key = "geomon/attention/entropy/model.blocks.0.attn"
    logged = {int(row["step"]): float(row[key]) for row in rows if row.get(key)}
    assert sorted(logged) == [0, 2, 4]
    assert all(0 < value < torch.log(torch.tensor(12.0)) for value in logged.values())
    assert any(row.get("geomon/rankme/model.ln_f") for row in rows)
    sigma = [float(row[k]) for row in rows for k in ["geomon/spectral/sigma/model.head"] if row.get(k)]
    assert len(sigma) == 3 and all(value > 0 for value in sigma)
    assert F.scaled_dot_product_attention is SDPA
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in trainer.lightning_module.modules())


def test_training_is_bit_identical_with_the_callback_on_every_step(tmp_path):
    plain, _ = _fit(lightning, tmp_path / "a", [])
    watched, _ = _fit(lightning, tmp_path / "b", [GeomonCallback(every_n_steps=1, embedding_modules=["model.*"])])
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)


def test_one_measurement_per_optimizer_step_under_gradient_accumulation(tmp_path):
    calls = []
    callback = GeomonCallback(every_n_steps=1)
    original = callback.monitor.compute
    callback.monitor.compute = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    _fit(lightning, tmp_path, [callback], accumulate=2)
    assert len(calls) == 3  # 3 optimizer steps over 6 micro-batches


def test_early_stopping_can_monitor_a_geomon_key(tmp_path):
    key = "geomon/attention/entropy_normalized/model.blocks.0.attn"
    stopper = lightning.callbacks.EarlyStopping(monitor=key, mode="max", patience=100, check_on_train_epoch_end=True)
    _, trainer = _fit(lightning, tmp_path, [GeomonCallback(every_n_steps=2), stopper])
    assert key in trainer.callback_metrics
    assert 0 < float(stopper.best_score) <= 1


@pytest.mark.parametrize("strict", [True, False])
def test_early_stopping_on_a_windowed_key_needs_strict_false_before_the_first_window(tmp_path, strict):
    key = "geomon/rankme/model.ln_f"  # a window of 10,000 rows: never closes in this fit
    stopper = lightning.callbacks.EarlyStopping(monitor=key, patience=100, check_on_train_epoch_end=True,
                                                strict=strict)  # fmt: skip
    callback = GeomonCallback(every_n_steps=2, embedding_modules=["model.ln_f"], window_rows=10_000)
    if strict:
        with pytest.raises(RuntimeError, match="conditioned on metric"):
            _fit(lightning, tmp_path, [callback, stopper])
    else:
        _, trainer = _fit(lightning, tmp_path, [callback, stopper])
        assert trainer.global_step == 6 and key not in trainer.callback_metrics


def test_callback_state_restores_the_monitor_windows(tmp_path):
    first = GeomonCallback(every_n_steps=2, embedding_modules=["model.blocks.0.mlp.1"])
    _fit(lightning, tmp_path, [first])
    restored = GeomonCallback(every_n_steps=2, embedding_modules=["model.blocks.0.mlp.1"])
    restored.load_state_dict(first.state_dict())
    module = _module_class(lightning)()
    restored.on_fit_start(lightning.Trainer(logger=False, accelerator="cpu"), module)
    original = first.monitor.plan.probes["embedding:model.blocks.0.mlp.1"].rankme
    copy = restored.monitor.plan.probes["embedding:model.blocks.0.mlp.1"].rankme
    # an open window: 4 x 128 = 512 rows needed, 96 a step, so every step feeds it (6 steps > the period of 2);
    # the last compute (step 4) saw 5 x 96 = 480, then step 5 added its rows
    assert float(original.n) == 576
    assert torch.equal(copy.n, original.n) and torch.equal(copy.gram, original.gram)


def test_hooks_are_gone_after_an_exception_inside_training(tmp_path):
    class Exploding(_module_class(lightning)):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                self.model(batch[0])  # a monitored forward, then the failure mid-step
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Exploding()
    trainer = lightning.Trainer(
        max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[GeomonCallback(every_n_steps=1, embedding_modules=["model.ln_f"])],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, _loader())
    assert F.scaled_dot_product_attention is SDPA
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_a_stop_under_gradient_accumulation_lands_between_optimizer_steps(tmp_path):
    """The alert of measured step 1 stops the fit after that step's optimizer step: every micro-batch that ran was
    stepped (stopping inside the accumulation left a micro-batch whose gradients were never applied)."""
    batches = []
    callback = GeomonCallback(every_n_steps=1, alerts=[FiresFrom(1)], on_alert="stop", head=None)
    callback.monitor.compute = _counting(callback.monitor.compute, batches, "compute")
    torch.manual_seed(0)
    module = _module_class(lightning)()
    module.training_step = _counting(module.training_step, batches, "batch")
    trainer = lightning.Trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[callback], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu")  # fmt: skip
    trainer.fit(module, _loader())
    assert trainer.global_step == 2  # steps 0 and 1 ran; the alert of step 1 stopped the fit before step 2
    assert batches == ["batch", "batch", "compute"] * 2  # each step's compute after its last micro-batch


def _counting(fn, calls, name):
    def counted(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return counted


def test_two_callbacks_watching_different_things_share_one_trainer_and_its_checkpoints(tmp_path):
    def callbacks():
        return [GeomonCallback(every_n_steps=1, head=None, strict=True),
                GeomonCallback(every_n_steps=2, attention=False, embedding_modules=["model.ln_f"], window_rows=400,
                               neural_collapse=False, strict=True)]  # fmt: skip

    first = callbacks()
    _, trainer = _fit(lightning, tmp_path / "a", first)
    assert "geomon/attention/entropy/model.blocks.0.attn" in trainer.callback_metrics
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    mine = {key: state for key, state in states.items() if key.startswith("GeomonCallback")}
    assert len(mine) == 2, sorted(states)
    # the embedding window (400 rows) is still open after 6 steps of 96 rows, 3 of them measured: it must come back
    rows = float(first[1].monitor.plan.probes["embedding:model.ln_f"].rankme.n)
    assert 0 < rows < 400
    second = callbacks()
    module = _module_class(lightning)()
    resumed = lightning.Trainer(max_steps=7, callbacks=second, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    restored = []
    original = second[1].monitor.load_state_dict
    second[1].monitor.load_state_dict = lambda state: restored.append(state) or original(state)
    resumed.fit(module, _loader(), ckpt_path=str(ckpt))
    assert restored and restored[0]["plan"]["embedding:model.ln_f"]["state"]["rankme"]["n"] == rows


@pytest.mark.parametrize("saved_as", ["legacy", "other-watch"])
def test_a_checkpoint_under_another_state_key_still_restores_its_state(tmp_path, saved_as):
    """Older geomon saved its state under the class name; a callback that watches other things has another key.
    Either way the one GeomonCallback state in the checkpoint is restored (Lightning alone would drop it)."""
    first = GeomonCallback(every_n_steps=2, embedding_modules=["model.ln_f"], window_rows=400, strict=True)
    _, trainer = _fit(lightning, tmp_path / "a", [first])
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("GeomonCallback")]
    if saved_as == "legacy":
        checkpoint["callbacks"]["GeomonCallback"] = checkpoint["callbacks"].pop(key)
        torch.save(checkpoint, ckpt)
    rows = float(first.monitor.plan.probes["embedding:model.ln_f"].rankme.n)
    assert 0 < rows < 400  # an open window, which a restore must bring back
    spectral = ["model.head"] if saved_as == "other-watch" else []
    second = GeomonCallback(every_n_steps=2, embedding_modules=["model.ln_f"], window_rows=400,
                            spectral_modules=spectral)  # fmt: skip
    restored = []
    original = second.monitor.load_state_dict
    second.monitor.load_state_dict = lambda state: restored.append(state) or original(state)
    resumed = lightning.Trainer(max_steps=7, callbacks=[second], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    resumed.fit(_module_class(lightning)(), _loader(), ckpt_path=str(ckpt))
    assert len(restored) == 1 and restored[0]["plan"]["embedding:model.ln_f"]["state"]["rankme"]["n"] == rows


def test_an_epoch_cut_short_by_the_module_leaves_no_hook_and_still_computes(tmp_path):
    """``on_train_batch_start`` returning -1 skips the rest of the epoch: the measured batch never ends, so the
    epoch's end takes the capture down and computes the step it measured."""
    from torch.nn.modules import module as module_hooks

    callback = GeomonCallback(every_n_steps=1, head=None, strict=True)
    armed_at_compute = []
    compute = callback.monitor.compute

    def spy(*args, **kwargs):
        armed_at_compute.append(bool(module_hooks._global_forward_pre_hooks))
        return compute(*args, **kwargs)

    callback.monitor.compute = spy
    module = _module_class(lightning)()
    module.on_train_batch_start = lambda batch, batch_idx: -1 if batch_idx == 2 else None
    trainer = lightning.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, _loader())
    assert trainer.global_step == 2
    assert armed_at_compute == [False, False, False]  # steps 0, 1 and the cut step 2, each computed unhooked
    assert not module_hooks._global_forward_pre_hooks and not module_hooks._global_forward_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert "geomon/attention/entropy/model.blocks.0.attn" in trainer.callback_metrics


def test_a_state_another_callback_restores_by_its_key_is_not_taken_by_a_new_one(tmp_path):
    """The checkpoint holds callback A's state; the resumed Trainer has A and a new callback C: A restores its own,
    C (no state of its own in the checkpoint) starts fresh instead of taking A's."""

    def watch_attention():
        return GeomonCallback(every_n_steps=2, head=None, strict=True)

    _, trainer = _fit(lightning, tmp_path / "a", [watch_attention()])
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    a = watch_attention()
    c = GeomonCallback(every_n_steps=2, attention=False, embedding_modules=["model.ln_f"], strict=True)
    restored = {"a": [], "c": []}
    for name, callback in (("a", a), ("c", c)):
        original = callback.monitor.load_state_dict
        callback.monitor.load_state_dict = lambda state, _o=original, _n=name: restored[_n].append(state) or _o(state)
    resumed = lightning.Trainer(max_steps=7, callbacks=[a, c], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    resumed.fit(_module_class(lightning)(), _loader(), ckpt_path=str(ckpt))
    assert len(restored["a"]) == 1 and restored["c"] == []
    assert not [pid for pid in c.monitor.plan.probes if pid.startswith("attention:")]  # nothing of A's came along


def test_validation_inside_fit_and_evaluation_stages_are_not_measured(tmp_path):
    """Only training forwards are measured (docs: the callback watches ``fit``): validation batches run in the fit
    (sanity check, ``val_check_interval``, ``limit_val_batches``) add no row to a measured step, and
    ``validate`` / ``test`` / ``predict`` with the callback attached measure and log nothing and leave no hook.
    Validation batches are 3 rows, training batches 8, so a validation forward pooled into a step would change its
    per-head row count; the logged entropy equals an explicit float64 softmax of the training forward's Q/K."""
    layer = "model.blocks.0.attn"

    class Evaluated(_module_class(lightning)):
        def __init__(self):
            super().__init__()
            self.qk: dict[int, torch.Tensor] = {}  # the training forward's qkv output, by step
            self.model.blocks[0].attn.qkv.register_forward_hook(self._record)

        def _record(self, module, args, output):
            if self.training and self.trainer.training:
                self.qk.setdefault(self.global_step, output.detach().double())

        def validation_step(self, batch, batch_idx):
            (x,) = batch
            self.log("val_loss", F.cross_entropy(self.model(x).flatten(0, 1), x.flatten()))

        test_step = validation_step

        def predict_step(self, batch, batch_idx):
            return self.model(batch[0])

    logged: dict[int, tuple[list[float], float]] = {}
    callback = GeomonCallback(every_n_steps=1, head=None, alerts=(), query_rows=None, media=False, strict=True)
    compute = callback.monitor.compute

    def spy(step=None, **kwargs):
        count = callback.monitor.plan.probes[f"attention:{layer}"].metric.count.tolist()
        values = compute(step, **kwargs)
        logged[step] = (count, float(values[f"geomon/attention/entropy/{layer}"]))
        return values

    callback.monitor.compute = spy
    torch.manual_seed(0)
    module = Evaluated()
    trainer = lightning.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=1,
                                callbacks=[callback], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    validation = _loader(batch_size=3)
    for run in (trainer.validate, trainer.test, trainer.predict):
        run(module, validation)
    assert logged == {}
    trainer.fit(module, _loader(), validation)
    assert sorted(logged) == [0, 1, 2, 3]
    for step, (count, entropy) in logged.items():
        assert count == [8 * 12] * 4  # one training batch of 8 x 12 query rows per head, nothing else
        q, k = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in module.qk[step].split(32, -1)[:2])
        scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~torch.ones(12, 12).tril().bool(), float("-inf"))
        p = scores.softmax(-1)
        assert entropy == pytest.approx(float(-torch.special.xlogy(p, p).sum(-1).mean()), rel=1e-6)
    for run in (trainer.validate, trainer.test, trainer.predict):
        run(module, validation)
    assert sorted(logged) == [0, 1, 2, 3]
    assert F.scaled_dot_product_attention is SDPA
    recorder = module.model.blocks[0].attn.qkv  # the test's own hook
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules() if m is not recorder)
