"""GeomonCallback keeps the plan's promises under Lightning: ranks running different work log what one process
logs, nothing that did not run stops a healthy run, and a model built in ``configure_model`` is watched.

The 2-process run uses the routes of tests/test_plan_ddp.py (rank 0 skips blocks on the first measured step, the
ranks run the blocks in opposite orders, rank 0's batch is empty), with ``on_alert="stop"``: a false alarm would
stop the run early and lose the later steps."""

import csv
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

lightning = pytest.importorskip("lightning.pytorch")

from geomon._tiny_gpt import TinyGPT  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from tests.test_plan_ddp import ROUTES, VOCAB, Routed, T, _global_batches, _half  # noqa: E402

STEPS = len(ROUTES)


class RoutedLit(lightning.LightningModule):
    """Each rank runs its half of the global batch along its route; one process runs both halves, each along its
    rank's route, and the head once over both: the same rows and the same operations."""

    def __init__(self):
        super().__init__()
        self.model = Routed()

    def training_step(self, batch, batch_idx):
        (data,) = batch
        step, world = self.trainer.global_step, self.trainer.world_size
        ranks = [self.global_rank] if world > 1 else [0, 1]
        hidden = torch.cat([self._route(_half(data, step, rank)[:, :-1], ROUTES[step][rank]) for rank in ranks])
        logits = self.model.head(self.model.ln_f(hidden))
        return logits.sum() * 0.0  # lr 0: the weights stay as they are; the values are what is compared

    def _route(self, idx, route):
        x = self.model.embed(idx)
        for name in route:
            x = self.model.blocks[name](x)
        return x

    def train_dataloader(self):
        data = torch.stack(_global_batches())  # every rank reads the whole global batch and takes its half
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _logged(tmp_path, devices):
    module = RoutedLit()
    callback = GeomonCallback(every_n_steps=1, embedding_modules=["model.ln_f"], window_rows=24, on_alert="stop",
                              labels_fn=RankLabels(module), strict=True)  # fmt: skip
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn_find_unused_parameters_true" if devices > 1 else "auto",
        logger=lightning.loggers.CSVLogger(tmp_path, name="run"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    with open(f"{tmp_path}/run/version_0/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {(int(row["step"]), key): float(value) for row in rows for key, value in row.items()
            if key.startswith("geomon/") and value}  # fmt: skip


class RankLabels:
    """``labels_fn``: the labels of the rows this rank runs (a class, so that ddp_spawn can pickle it)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, batch):
        (data,) = batch
        module = self.module
        step, world = module.trainer.global_step, module.trainer.world_size
        ranks = [module.global_rank] if world > 1 else [0, 1]
        return torch.cat([_half(data, step, rank)[:, 1:] for rank in ranks])


@pytest.mark.slow
def test_two_ranks_running_different_layers_log_the_single_process_values(tmp_path):
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    single = _logged(tmp_path / "one", devices=1)
    double = _logged(tmp_path / "two", devices=2)
    assert {step for step, _ in single} == set(range(STEPS))  # no false alarm stopped the run
    assert double.keys() == single.keys(), sorted(double.keys() ^ single.keys())
    assert (0, "geomon/attention/entropy/model.blocks.a") in single  # run on rank 1 alone, found at run time
    assert not [key for key in single if key[0] == 0 and key[1].endswith("blocks.c")]  # run by no rank
    for key, value in single.items():
        assert math.isfinite(value) or "alpha_req" in key[1], key
        assert double[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert not [key for key in single if key[1].startswith("geomon/alerts/") and single[key] > 0]


class SkippingLit(lightning.LightningModule):
    """Returns ``None`` (a skipped batch) on step 2: the measured step runs no layer at all."""

    def __init__(self, built_in_configure_model=False):
        super().__init__()
        self.built_late = built_in_configure_model
        self.model = None if built_in_configure_model else self._build()

    def _build(self):
        torch.manual_seed(0)
        return TinyGPT(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, context=T)

    def configure_model(self):
        if self.model is None:
            self.model = self._build()

    def training_step(self, batch, batch_idx):
        (data,) = batch
        if self.trainer.global_step == 2 and not self.built_late:
            return None
        return F.cross_entropy(self.model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())

    def train_dataloader(self):
        data = torch.cat(_global_batches())
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit_single(tmp_path, module, callback, steps=4):
    trainer = lightning.Trainer(max_steps=steps, accelerator="cpu", logger=lightning.loggers.CSVLogger(tmp_path),
                                callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)  # fmt: skip
    trainer.fit(module)
    return trainer


def test_a_skipped_batch_stops_nothing_and_logs_no_nan(tmp_path):
    callback = GeomonCallback(every_n_steps=1, on_alert="stop", labels_fn=lambda b: b[0][:, 1:], window_rows=8)
    trainer = _fit_single(tmp_path, SkippingLit(), callback)
    assert trainer.global_step == 4 and not trainer.should_stop
    assert not [e for e in callback.monitor.events if e.kind == "fired"]
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    values = [float(v) for row in rows for k, v in row.items() if k.startswith("geomon/") and v]
    assert values and all(math.isfinite(v) for v in values)


def test_a_model_built_in_configure_model_is_watched_by_default(tmp_path):
    callback = GeomonCallback(every_n_steps=1, embedding_modules=["model.ln_f"], window_rows=8,
                              labels_fn=lambda b: b[0][:, 1:], strict=True)  # fmt: skip
    trainer = _fit_single(tmp_path, SkippingLit(built_in_configure_model=True), callback, steps=2)
    logged = set(trainer.callback_metrics)
    for key in (
        "geomon/rankme/model.head.input",
        "geomon/nc/nc1/model.head.input",
        "geomon/rankme/model.ln_f",
        "geomon/attention/entropy/model.blocks.1.attn",
        "geomon/spectral/logit_sigma/model.blocks.0.attn",
    ):
        assert key in logged, key
