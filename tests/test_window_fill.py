"""Windows that fill: a classifier (one head-input row per image) gets its first RankMe within a few logging
intervals at default settings, and the values are those of exactly the rows the rule says were accumulated.

The references are computed here from rows this test captures with its own hook on every step: a float64 SVD for
RankMe (METRICS.md §1) and the one-shot :func:`geomon.functional.neural_collapse` for NC1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon.functional import neural_collapse

torchvision_models = pytest.importorskip("torchvision.models")

BATCH, CLASSES, EVERY = 8, 10, 50  # EVERY: the default every_n_steps
KEY = "geomon/rankme/heads.head.input"


def vit(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return torchvision_models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=hidden, mlp_dim=2 * hidden, num_classes=CLASSES)  # fmt: skip


def rankme_reference(z: torch.Tensor, centered: bool = False, eps: float = 1e-7) -> float:
    """RankMe of the rows ``z`` from their singular values (float64 SVD), as METRICS.md §1 defines it."""
    z = z.double()
    if centered:
        z = z - z.mean(dim=0)
    s = torch.linalg.svdvals(z)  # min(N, D) values
    values = s**2 if centered else s
    p = values / values.sum() + eps
    return math.exp(-float((p * p.log()).sum()))


def accumulated(step: int, last_closed: int, lead: int) -> bool:
    """The documented rule: after the window closed at ``last_closed``, a step adds rows when it is measured
    (a multiple of the period) or one of the ``lead - 1`` steps before a measured step."""
    return step > last_closed and (step % EVERY == 0 or (-step) % EVERY < lead)


def train(hidden: int, steps: int, monitor: Monitor | None):
    """A plain training loop at batch 8; returns (rows and labels per step, values per measured step, weights)."""
    model = vit(hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1)
    rows: list[torch.Tensor] = []
    handle = model.heads.head.register_forward_hook(lambda m, args, out: rows.append(args[0].detach().clone()))
    if monitor is not None:
        monitor.attach(model)
    labels, logged = [], {}
    for step in range(steps + 1):
        x = torch.randn(BATCH, 3, 32, 32, generator=data)
        y = torch.randint(0, CLASSES, (BATCH,), generator=data)
        labels.append(y)
        with monitor.step(step, labels=y) if monitor is not None else torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None and monitor.is_scheduled(step):
            logged[step] = {key: float(value) for key, value in monitor.compute(step).items()}
    handle.remove()
    return rows, labels, logged, model.state_dict()


@pytest.mark.parametrize(("hidden", "first"), [(64, 50), (128, 100)])
def test_classifier_window_fills_within_a_few_intervals_on_exactly_the_accumulated_rows(hidden, first):
    # hidden 64: a window of 4 x 64 = 256 rows = 32 steps of 8, fewer than the period: it fills from the 31 steps
    # before step 50. hidden 128: 512 rows = 64 steps, more than the period: every step feeds it (vit_b_16's case).
    rows, labels, logged, weights = train(hidden, 100, Monitor(strict=True))
    if hidden == 64:
        _, _, _, plain = train(hidden, 100, None)
        for name, tensor in plain.items():  # monitoring on (fill steps included) does not change training
            assert torch.equal(weights[name], tensor), name
    firsts = [step for step, values in logged.items() if KEY in values]
    assert firsts[0] == first <= 10 * EVERY
    lead = math.ceil(4 * hidden / BATCH)
    last_closed = -1
    assert firsts == ([50, 100] if hidden == 64 else [100])  # hidden 64: a window every period from then on
    for step in firsts:
        taken = [s for s in range(step + 1) if accumulated(s, last_closed, lead)]
        z, y = torch.cat([rows[s] for s in taken]), torch.cat([labels[s] for s in taken])
        assert z.shape[0] >= 4 * hidden
        values = logged[step]
        assert values[KEY] == pytest.approx(rankme_reference(z), rel=1e-6), step
        assert values["geomon/rankme_cov/heads.head.input"] == pytest.approx(rankme_reference(z, True), rel=1e-6)
        nc1 = float(neural_collapse(z.double(), y, num_classes=CLASSES)["nc1"])
        assert values["geomon/nc/nc1/heads.head.input"] == pytest.approx(nc1, rel=1e-6), step
        last_closed = step


def test_fill_steps_arm_only_the_windowed_probes_and_only_when_needed():
    model = vit(64)
    monitor = Monitor().attach(model)
    assert not monitor.fills(49)  # the rows per step are not known before a measured step
    with monitor.step(0, labels=torch.zeros(BATCH, dtype=torch.long)):
        model(torch.randn(BATCH, 3, 32, 32))
    monitor.compute(0)
    assert [s for s in range(1, 101) if monitor.fills(s)] == [*range(19, 50), *range(69, 100)]
    assert {p.pid for p in monitor.plan.fill_probes(1)} == {"collapse:heads.head.input", "embedding:heads.head.input"}
    with monitor.step(49, labels=torch.zeros(BATCH, dtype=torch.long)):
        assert len(model.heads.head._forward_hooks) == 2  # the two windowed probes, no attention capture
        model(torch.randn(BATCH, 3, 32, 32))
    assert not model.heads.head._forward_hooks
    assert monitor.compute() == {}  # rows added, nothing measured: no value yet, no weight-based probe
    assert float(monitor.collapse.metric.count.sum()) == 2 * BATCH and not monitor.collapse.ignored


def test_token_level_heads_are_measured_on_measured_steps_only():
    from geomon._tiny_gpt import TinyGPT

    model = TinyGPT(vocab_size=30, d_model=32, context=16)  # 8 x 16 = 128 rows per step = 4 x D: no fill
    monitor = Monitor().attach(model)
    with monitor.step(0, labels=torch.randint(0, 30, (8, 16))):
        model(torch.randint(0, 30, (8, 16)))
    assert "geomon/rankme/head.input" in monitor.compute(0)
    assert not any(monitor.fills(step) for step in range(1, 200))


def test_lightning_callback_logs_the_classifiers_first_rankme_at_the_first_period(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from geomon import GeomonCallback

    class LitViT(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = vit(64)
            self.rows: list[torch.Tensor] = []
            self.model.heads.head.register_forward_hook(lambda m, args, out: self.rows.append(args[0].detach()))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Recorder(lightning.loggers.Logger):
        name, version = "recorder", 0

        def __init__(self):
            super().__init__()
            self.logged: dict[int, dict[str, float]] = {}

        def log_metrics(self, metrics, step=None):
            self.logged.setdefault(step, {}).update(metrics)

        def log_hyperparams(self, *args, **kwargs):
            pass

    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(51 * BATCH, 3, 32, 32, generator=g),
                                          torch.randint(0, CLASSES, (51 * BATCH,), generator=g))  # fmt: skip
    module, logger = LitViT(), Recorder()
    trainer = lightning.Trainer(max_steps=51, logger=logger, callbacks=[GeomonCallback(labels_fn=lambda b: b[1])],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH))
    key = "geomon/rankme/model.heads.head.input"
    assert [step for step, values in logger.logged.items() if key in values] == [50]
    taken = [0, *range(19, 51)]  # the measured step 0, then the 31 fill steps before step 50, and step 50
    z = torch.cat([module.rows[s] for s in taken])
    assert logger.logged[50][key] == pytest.approx(rankme_reference(z), rel=1e-5)  # logged as float32


def _forward_only(monitor: Monitor, rank: int | None, world: int) -> dict[str, float]:
    """Steps 0..50 of forward passes on the global batches of 8 (a rank takes its share); the values at step 50."""
    model = vit(64).eval()
    monitor.attach(model)
    data = torch.Generator().manual_seed(3)
    values = {}
    for step in range(EVERY + 1):
        x = torch.randn(BATCH, 3, 32, 32, generator=data)
        y = torch.randint(0, CLASSES, (BATCH,), generator=data)
        if rank is not None:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        with torch.no_grad(), monitor.step(step, labels=y):
            model(x)
        if monitor.is_scheduled(step):
            values = {key: float(value) for key, value in monitor.compute(step).items()}
    return values


def _ddp_body(rank, world):
    monitor = Monitor()
    values = _forward_only(monitor, rank, world)
    return values, [s for s in range(1, EVERY) if monitor.fills(s)]


def test_two_ranks_fill_the_window_as_one_process_on_the_union(tmp_path):
    import torch.distributed as dist

    from tests.ranks import spawn

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no gloo backend")
    reference = _forward_only(Monitor(), None, 1)
    assert KEY in reference
    for values, fills in spawn(_ddp_body, tmp_path):
        # 4 rows a step on each of 2 ranks: the same 32 steps fill the 256-row window as 8 rows on one process
        assert fills == list(range(19, EVERY))
        assert values.keys() == reference.keys()
        for key, value in reference.items():
            assert values[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
