"""The callback's values reach real trackers: W&B offline (read back from the run file) and TensorBoard."""

import time

import pytest
import torch

lightning = pytest.importorskip("lightning.pytorch")

from geomon.callback import GeomonCallback  # noqa: E402
from tests.test_callback import _loader, _module_class  # noqa: E402

KEY = "geomon/attention/entropy/model.blocks.0.attn"


def _fit(logger):
    torch.manual_seed(0)
    trainer = lightning.Trainer(
        max_steps=5, logger=logger, callbacks=[GeomonCallback(every_n_steps=2)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_module_class(lightning)(), _loader())


def test_wandb_offline_run_holds_the_values_on_the_global_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.wandb_records import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = lightning.loggers.WandbLogger(project="geomon-test", save_dir=str(tmp_path), offline=True)
    _fit(logger)
    logger.experiment.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:  # the W&B service may still be flushing the run file when finish() returns on a loaded machine
        rows = [row for row in history(run_file) if KEY in row]
        if len(rows) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [row["trainer/global_step"] for row in rows] == [0, 2, 4], history(run_file)
    assert all(0 < row[KEY] < 2.5 for row in rows)


def test_tensorboard_event_files_hold_the_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="run")
    _fit(logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [event.step for event in events.Scalars(KEY)] == [0, 2, 4]
