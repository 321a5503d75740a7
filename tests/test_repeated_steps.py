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


lightning = pytest.importorskip("lightning.pytorch")


class ManualAccumulation(lightning.LightningModule):
    """Manual optimization that steps the optimizer every ``ACCUMULATE`` batches: ``global_step`` stays put in
    between, so the callback sees one step over several batches."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = TinyGPT(vocab_size=VOCAB, d_model=32, context=SEQ)
        self.rows: list[tuple[int, torch.Tensor]] = []
        self.net.head.register_forward_pre_hook(
            lambda module, args: self.rows.append((self.trainer.global_step, args[0].detach().flatten(0, -2)))
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        self.manual_backward(F.cross_entropy(self.net(x).flatten(0, 1), y.flatten()))
        if (batch_idx + 1) % ACCUMULATE == 0:
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_manual_accumulation_logs_each_step_once_after_its_optimizer_step(tmp_path):
    from geomon.callback import GeomonCallback

    calls: list[tuple[int, int, float]] = []  # (step logged at, global_step when logged, value)

    class Spy(lightning.loggers.CSVLogger):
        def log_metrics(self, metrics, step=None):
            if NET_KEY in metrics:
                calls.append((step, trainer.global_step, metrics[NET_KEY]))
            super().log_metrics(metrics, step)

    torch.manual_seed(0)
    module = ManualAccumulation()
    loader = torch.utils.data.DataLoader(micro_batches(), batch_size=None)
    trainer = lightning.Trainer(
        max_epochs=1, accelerator="cpu", logger=Spy(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[GeomonCallback(every_n_steps=1, neural_collapse=False)],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    assert [c[0] for c in calls] == list(range(STEPS))
    assert all(now > step for step, now, _ in calls), "computed before the step's optimizer step"
    firsts = {}
    for step, rows in module.rows:
        firsts.setdefault(step, rows)  # the step's first batch is the measured one
    for step, _, value in calls:
        assert value == pytest.approx(ref_rankme(firsts[step].double().numpy()), rel=1e-4)
    assert not [w for w in caught if "already measured" in str(w.message)]
