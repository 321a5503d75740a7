"""A step is reported once, whatever loop runs it: gradient accumulation done by hand (a plain loop that opens
``monitor.step`` around every micro-batch, Lightning's manual optimization stepping every few batches) must not log
one step several times, and what is logged is the measured micro-batches' rows (float64 reference)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from geomon import GeomonWarning, Monitor
from geomon._tiny_gpt import TinyGPT
from tests.reference import ref_rankme

VOCAB, SEQ, BATCH, ACCUMULATE, STEPS = 30, 16, 8, 3, 4
KEY = "geomon/rankme/head.input"
NET_KEY = "geomon/rankme/net.head.input"  # the LightningModule holds the model as `net`


def micro_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
         torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator))
        for _ in range(ACCUMULATE * STEPS)
    ]  # fmt: skip


def head_rows(model: TinyGPT, rows: list[torch.Tensor]):
    """Records the head's input of every forward (the rows RankMe of ``head.input`` reads)."""
    return model.head.register_forward_pre_hook(lambda module, args: rows.append(args[0].detach().flatten(0, -2)))


def plain_loop(compute_every_micro_batch: bool) -> tuple[dict[int, list[float]], list[list[torch.Tensor]], list]:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, d_model=32, context=SEQ)
    monitor = Monitor(every_n_steps=2, neural_collapse=False, alerts=()).attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logged: dict[int, list[float]] = {}
    rows_per_step: list[list[torch.Tensor]] = [[] for _ in range(STEPS)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(micro_batches()):
            step = i // ACCUMULATE
            rows: list[torch.Tensor] = []
            handle = head_rows(model, rows)
            with monitor.step(step):
                logits = model(x)
            handle.remove()
            rows_per_step[step] += rows
            F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
            last = (i + 1) % ACCUMULATE == 0
            if last:
                opt.step()
                opt.zero_grad()
            if monitor.is_scheduled(step) and (compute_every_micro_batch or last):
                values = monitor.compute(step)
                if KEY in values:
                    logged.setdefault(step, []).append(float(values[KEY]))
    return logged, rows_per_step, [w for w in caught if issubclass(w.category, GeomonWarning)]


def test_a_step_computed_after_every_micro_batch_is_reported_once_from_its_first_micro_batch():
    logged, rows, caught = plain_loop(compute_every_micro_batch=True)
    assert sorted(logged) == [0, 2] and all(len(v) == 1 for v in logged.values()), logged
    for step, (value,) in logged.items():
        assert value == pytest.approx(ref_rankme(rows[step][0].double().numpy()), rel=1e-4)
    said = [str(w.message) for w in caught if "already measured" in str(w.message)]
    assert len(said) == 1 and "gradient accumulation" in said[0]


def test_a_step_computed_once_after_its_optimizer_step_covers_all_its_micro_batches():
    logged, rows, caught = plain_loop(compute_every_micro_batch=False)
    assert sorted(logged) == [0, 2] and all(len(v) == 1 for v in logged.values()), logged
    for step, (value,) in logged.items():
        assert len(rows[step]) == ACCUMULATE
        assert value == pytest.approx(ref_rankme(torch.cat(rows[step]).double().numpy()), rel=1e-4)
    assert not [w for w in caught if "already measured" in str(w.message)]


def test_compute_twice_for_one_step_returns_nothing_the_second_time():
    model = TinyGPT(vocab_size=VOCAB, d_model=32, context=SEQ)
    monitor = Monitor(every_n_steps=1, neural_collapse=False).attach(model)
    with monitor.step(5):
        model(micro_batches()[0][0])
    assert KEY in monitor.compute(5)
    assert monitor.compute(5) == {}
    with monitor.step(6):
        model(micro_batches()[1][0])
    assert KEY in monitor.compute(6)


def test_a_monitor_rolled_back_to_a_saved_state_measures_the_replayed_steps_again():
    """A plain loop that rolls back to a checkpoint (model, optimizer and ``monitor.state_dict()``) after a loss
    spike replays steps the monitor already computed: after ``load_state_dict`` those steps are measured and
    reported again, from the replayed forward's rows. Before the fix the monitor remembered the last step it had
    computed across the restore and skipped it ("already measured"): a silently missing value."""
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, d_model=32, context=SEQ)
    monitor = Monitor(every_n_steps=1, neural_collapse=False, alerts=()).attach(model)
    batches = micro_batches()
    with monitor.step(0):
        model(batches[0][0])
    monitor.compute(0)
    saved = monitor.state_dict()  # checkpoint after step 0
    with monitor.step(1):
        model(batches[1][0])
    assert KEY in monitor.compute(1)
    monitor.load_state_dict(saved)  # roll back to step 0's checkpoint and replay step 1 on another batch
    rows: list[torch.Tensor] = []
    handle = head_rows(model, rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor.step(1):
            model(batches[2][0])
        values = monitor.compute(1)
    handle.remove()
    assert not [w for w in caught if "already measured" in str(w.message)]
    assert float(values[KEY]) == pytest.approx(ref_rankme(rows[0].double().numpy()), rel=1e-4)


lightning = pytest.importorskip("lightning.pytorch")


class ManualOptimization(lightning.LightningModule):
    """Manual optimization with ``optimizers`` optimizers (a GAN's two: ``global_step`` advances twice per batch),
    each stepped every ``step_every`` batches (accumulation by hand: ``global_step`` stays put in between). Lightning
    logs its own metrics once per batch; ``seen`` is the batch's index, logged at Lightning's step."""

    def __init__(self, optimizers: int, step_every: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.n_optimizers, self.step_every = optimizers, step_every
        self.net = TinyGPT(vocab_size=VOCAB, d_model=32, context=SEQ)
        self.rows: list[torch.Tensor] = []  # the head's input, one entry per batch
        self.net.head.register_forward_pre_hook(lambda module, args: self.rows.append(args[0].detach().flatten(0, -2)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        opts = self.optimizers() if self.n_optimizers > 1 else [self.optimizers()]
        self.manual_backward(F.cross_entropy(self.net(x).flatten(0, 1), y.flatten()))
        self.log("seen", float(batch_idx))
        if (batch_idx + 1) % self.step_every == 0:
            for opt in opts:
                opt.step()
                opt.zero_grad()

    def configure_optimizers(self):
        layers = list(self.net.parameters())
        if self.n_optimizers == 1:
            return torch.optim.SGD(layers, lr=0.1)
        return torch.optim.SGD(layers[: len(layers) // 2], lr=0.1), torch.optim.SGD(layers[len(layers) // 2 :], lr=0.1)


@pytest.mark.parametrize(("optimizers", "step_every", "every"), [(1, ACCUMULATE, 2), (2, 1, 3)],
                         ids=["accumulating-by-hand", "two-optimizers"])  # fmt: skip
def test_manual_optimization_logs_on_lightnings_own_step_axis(optimizers, step_every, every, tmp_path):
    """geomon schedules and logs by the step Lightning logs its own metrics (and LearningRateMonitor its rates) at:
    one per batch. ``trainer.global_step`` was used before: a GAN's two optimizers doubled it (with an odd
    ``every_n_steps`` the period doubled too), and accumulating by hand logged one step several times."""
    from geomon.callback import GeomonCallback

    geomon_rows: dict[int, list[float]] = {}
    seen_at: dict[int, int] = {}  # Lightning's step -> the batch it logged

    class Spy(lightning.loggers.CSVLogger):
        def log_metrics(self, metrics, step=None):
            if NET_KEY in metrics:
                geomon_rows.setdefault(step, []).append(metrics[NET_KEY])
            if "seen" in metrics:
                seen_at[step] = int(metrics["seen"])
            super().log_metrics(metrics, step)

    torch.manual_seed(0)
    module = ManualOptimization(optimizers, step_every)
    loader = torch.utils.data.DataLoader(micro_batches(), batch_size=None)
    trainer = lightning.Trainer(
        max_epochs=1, accelerator="cpu", logger=Spy(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=1,
        callbacks=[GeomonCallback(every_n_steps=every, neural_collapse=False, alerts=())],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    batches = ACCUMULATE * STEPS
    assert seen_at == {b: b for b in range(batches)}  # Lightning's own axis: one step per batch
    assert sorted(geomon_rows) == list(range(0, batches, every))
    for step, (value,) in geomon_rows.items():  # once each, from the batch Lightning logged at that step
        assert value == pytest.approx(ref_rankme(module.rows[seen_at[step]].double().numpy()), rel=1e-4)
    assert not [w for w in caught if "already measured" in str(w.message)]


class AutomaticOptimization(lightning.LightningModule):
    """TinyGPT trained with automatic optimization; ``rows`` keeps the head's input of every training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyGPT(vocab_size=VOCAB, d_model=32, context=SEQ)
        self.rows: list[torch.Tensor] = []
        self.net.head.register_forward_pre_hook(lambda module, args: self.rows.append(args[0].detach().flatten(0, -2)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_fit_resumed_with_the_same_callback_logs_its_first_measured_step(tmp_path):
    """The same ``GeomonCallback`` object in a second fit that resumes from an earlier checkpoint (a notebook that
    re-runs ``fit(ckpt_path=...)``, a restart after a divergence): the resumed fit's steps are measured and logged
    like those of a fresh callback. Before the fix the first of them was skipped, with a warning that it had
    already been measured: the monitor kept the previous fit's last computed step across ``attach``."""
    from geomon.callback import GeomonCallback

    callback = GeomonCallback(every_n_steps=2, neural_collapse=False, alerts=(), media=False)
    saver = lightning.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1,
                                                filename="{step}")  # fmt: skip
    loader = torch.utils.data.DataLoader(micro_batches(), batch_size=None)

    def trainer(callbacks, logger=False):
        return lightning.Trainer(max_steps=4, accelerator="cpu", logger=logger, callbacks=callbacks,
                                 enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                                 enable_checkpointing=saver in callbacks)  # fmt: skip

    torch.manual_seed(0)
    trainer([callback, saver]).fit(AutomaticOptimization(), loader)  # computes steps 0 and 2, saves after step 2
    logged: dict[int, float] = {}

    class Spy(lightning.loggers.CSVLogger):
        def log_metrics(self, metrics, step=None):
            if NET_KEY in metrics:
                logged[step] = metrics[NET_KEY]
            super().log_metrics(metrics, step)

    module = AutomaticOptimization()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([callback], Spy(tmp_path)).fit(module, loader, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert not [w for w in caught if "already measured" in str(w.message)]
    assert sorted(logged) == [2]  # steps 2 and 3 run again; step 2 is measured
    assert logged[2] == pytest.approx(ref_rankme(module.rows[0].double().numpy()), rel=1e-4)
