"""The Hugging Face Trainer integration: keys as they are in W&B, TensorBoard and log_history; alerts stop the run;
gradient accumulation measures the first micro-batch; the monitor's state round-trips through Trainer checkpoints."""

import glob
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from geomon.alerts import Threshold  # noqa: E402
from geomon.integrations.huggingface import STATE_FILE, GeomonTrainerCallback  # noqa: E402
from tests.firing_rule import FiresFrom  # noqa: E402
from tests.reference import ref_rankme  # noqa: E402
from tests.spies import spy_computes  # noqa: E402

VOCAB, CONTEXT, BATCH, WIDTH = 50, 16, 8, 32  # one micro-batch = 128 rows = 4 x WIDTH: one full RankMe window
RANKME = "geomon/rankme/lm_head.input"
ENTROPY = "geomon/attention/entropy/transformer.h.0.attn"


class Tokens(torch.utils.data.Dataset):
    """Random token rows as a data collator makes them: ``{"input_ids", "labels"}``."""

    def __init__(self, rows: int = 256) -> None:
        self.ids = torch.randint(0, VOCAB, (rows, CONTEXT), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=CONTEXT,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _trainer(tmp_path, callback, *, steps, report_to=(), accumulation=1, save_steps=None, model=None):
    args = _args(tmp_path, steps=steps, report_to=report_to, accumulation=accumulation, save_steps=save_steps)
    return transformers.Trainer(model=model or _model(), args=args, train_dataset=Tokens(), callbacks=[callback])


def _args(tmp_path, *, steps, report_to=(), accumulation=1, save_steps=None):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        lr_scheduler_type="constant", gradient_accumulation_steps=accumulation, logging_steps=2,
        report_to=list(report_to), use_cpu=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip


def _record_head_inputs(model) -> list[torch.Tensor]:
    """The rows entering the LM head, one tensor per forward call (a hook of the test's own)."""
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].detach().reshape(-1, WIDTH)))
    return rows


def _geomon_rows(history):
    return {row["step"]: row for row in history if any(key.startswith("geomon/") for key in row)}


def _wandb_history(tmp_path, ready):
    from tests.wandb_records import history

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:  # the W&B service may still be flushing the run file after finish() on a loaded machine
        rows = history(run_file)
        if ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # W&B keeps the settings (its directory) of the process's first run until torn down
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "geomon-test")
    yield wandb
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def test_values_reach_wandb_tensorboard_and_log_history_unprefixed(tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = GeomonTrainerCallback(every_n_steps=2, strict=True)
    model = _model()
    head_rows = _record_head_inputs(model)
    computed = spy_computes(callback)
    trainer = _trainer(tmp_path, callback, steps=4, report_to=["wandb", "tensorboard"], model=model)
    trainer.train()
    offline_wandb.finish()

    assert sorted(computed) == [2, 4] and all(computed.values())
    # log_history: one row per measured step, at the step the measured update completed, keys as computed
    rows = _geomon_rows(trainer.state.log_history)
    assert sorted(rows) == [2, 4]
    for step, values in computed.items():
        assert {key: rows[step][key] for key in values} == values
    assert not any(key.startswith("train/geomon") for row in trainer.state.log_history for key in row)
    # an independent reference: RankMe of the rows the measured forward (the first of step 2) fed the head
    assert len(head_rows) == 4
    assert math.isclose(rows[2][RANKME], ref_rankme(head_rows[1].numpy().astype(np.float64)), rel_tol=1e-4)
    assert math.isclose(rows[4][RANKME], ref_rankme(head_rows[3].numpy().astype(np.float64)), rel_tol=1e-4)
    assert not math.isclose(rows[2][RANKME], ref_rankme(head_rows[0].numpy().astype(np.float64)), rel_tol=1e-4)

    # TensorBoard: the same keys, unprefixed, at the same steps with the same values
    (log_dir,) = {str(Path(f).parent) for f in glob.glob(f"{tmp_path}/runs/**/events.out.tfevents.*", recursive=True)}
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert set(computed[2]) | set(computed[4]) <= tags
    assert "train/loss" in tags and not any(tag.startswith("train/geomon") for tag in tags)
    for key in (ENTROPY, RANKME):
        scalars = events.Scalars(key)
        assert [event.step for event in scalars] == [2, 4]
        assert [event.value for event in scalars] == pytest.approx([computed[s][key] for s in (2, 4)], rel=1e-6)

    # W&B: the keys as they are, beside the Trainer's step
    overview_key = "geomon-overview/entropy_normalized_min"
    history = _wandb_history(
        tmp_path, lambda rows: sum(ENTROPY in r for r in rows) + sum(overview_key in r for r in rows) >= 4
    )
    logged = [row for row in history if ENTROPY in row]
    assert [row["train/global_step"] for row in logged] == [2, 4]
    for row in logged:
        step = row["train/global_step"]
        assert {key: row[key] for key in computed[step]} == pytest.approx(computed[step], rel=1e-9)
    assert not any(key.startswith("train/geomon") for row in history for key in row)
    assert any("train/loss" in row for row in history)  # the Trainer's own logs still go there
    # the dashboard: summaries that apply (min of the normalised entropy over its history), the overview section,
    # geomon's settings in the run config
    from tests.wandb_records import config, summary

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    final = summary(run_file)
    for key in (k for k in computed[2] if k.startswith("geomon/attention/entropy_normalized/")):
        assert final[key] == {"min": pytest.approx(min(computed[s][key] for s in (2, 4)), rel=1e-6)}
    overview = [row for row in history if overview_key in row]
    assert [row["train/global_step"] for row in overview] == [2, 4]
    normalized = [k for k in computed[4] if k.startswith("geomon/attention/entropy_normalized/")]
    expected_min = min(computed[4][k] for k in normalized)
    assert overview[-1][overview_key] == pytest.approx(expected_min, rel=1e-6)
    assert config(run_file)["geomon"]["every_n_steps"] == 2


def test_an_alert_reaches_wandb_and_stops_training(tmp_path, offline_wandb):
    from tests.wandb_records import alerts

    always = Threshold("geomon/attention/entropy/*", below=1e6, name="forced_collapse")
    callback = GeomonTrainerCallback(every_n_steps=2, alerts=[always], on_alert="stop", strict=True)
    trainer = _trainer(tmp_path, callback, steps=10, report_to=["wandb"])
    trainer.train()
    offline_wandb.finish()

    assert trainer.state.global_step == 2  # stopped at the first measured step, not at max_steps=10
    rows = _geomon_rows(trainer.state.log_history)
    assert rows[2]["geomon/alerts/forced_collapse"] == 2.0  # one event per attention layer
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while not (found := alerts(run_file)) and time.monotonic() < deadline:
        time.sleep(0.5)
    titles = [alert["title"] for alert in found]
    assert titles and all("forced_collapse" in title for title in titles), found
    assert (tmp_path / "geomon_alerts.csv").read_text().count("forced_collapse") >= 1


def test_gradient_accumulation_measures_the_first_micro_batch(tmp_path):
    callback = GeomonTrainerCallback(every_n_steps=2, attention=False, neural_collapse=False, strict=True)
    model = _model()
    head_rows = _record_head_inputs(model)
    trainer = _trainer(tmp_path, callback, steps=4, accumulation=2, model=model)
    trainer.train()

    assert len(head_rows) == 8  # 4 optimizer steps x 2 micro-batches
    rows = _geomon_rows(trainer.state.log_history)
    assert sorted(rows) == [2, 4]
    for step in (2, 4):
        first, second = head_rows[2 * (step - 1)], head_rows[2 * (step - 1) + 1]
        assert math.isclose(rows[step][RANKME], ref_rankme(first.numpy().astype(np.float64)), rel_tol=1e-4)
        assert not math.isclose(rows[step][RANKME], ref_rankme(second.numpy().astype(np.float64)), rel_tol=1e-4)


def test_checkpoint_resume_continues_the_open_window(tmp_path):
    def callback():  # windows of 2 measured steps: the window open at step 3 must survive the checkpoint
        return GeomonTrainerCallback(every_n_steps=1, attention=False, neural_collapse=False, window_rows=256,
                                     strict=True)  # fmt: skip

    model = _model()
    head_rows = _record_head_inputs(model)
    straight = _trainer(tmp_path / "straight", callback(), steps=4, model=model)
    straight.train()
    expected = _geomon_rows(straight.state.log_history)
    assert RANKME in expected[4] and RANKME not in expected[3]
    window = torch.cat([head_rows[2], head_rows[3]]).numpy().astype(np.float64)  # steps 3 and 4
    assert math.isclose(expected[4][RANKME], ref_rankme(window), rel_tol=1e-4)

    _trainer(tmp_path / "first", callback(), steps=3, save_steps=3).train()
    checkpoint = tmp_path / "first" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).is_file()
    bare = shutil.copytree(checkpoint, tmp_path / "bare" / "checkpoint-3")
    (bare / STATE_FILE).unlink()

    # resumed from an explicit path into another output directory: the state comes from that checkpoint
    resumed = _trainer(tmp_path / "second", callback(), steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    rows = _geomon_rows(resumed.state.log_history)
    assert rows[4][RANKME] == pytest.approx(expected[4][RANKME], rel=1e-5)

    # without the saved state, the resumed window holds only step 4's rows: no RankMe at step 4
    fresh = _trainer(tmp_path / "third", callback(), steps=4)
    with pytest.warns(UserWarning, match="without a saved monitor state"):
        fresh.train(resume_from_checkpoint=str(bare))
    assert 4 in _geomon_rows(fresh.state.log_history)
    assert RANKME not in _geomon_rows(fresh.state.log_history)[4]


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="on_alert"):
        GeomonTrainerCallback(on_alert="explode")
    with pytest.raises(ValueError, match="every_n_steps"):
        GeomonTrainerCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="labels_fn"):
        GeomonTrainerCallback(labels_fn="labels")


def _two_process_run(rank, world):
    import os
    import tempfile

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # the Trainer reads these
    callback = GeomonTrainerCallback(every_n_steps=2, neural_collapse=False, strict=True)
    model = _model()
    head_rows = _record_head_inputs(model)
    trainer = _trainer(Path(tempfile.mkdtemp()), callback, steps=4, model=model)
    trainer.train()
    return {"rows": _geomon_rows(trainer.state.log_history), "head": head_rows,
            "wrapped": type(trainer.model_wrapped).__name__}  # fmt: skip


def test_two_ddp_processes_log_the_union_of_their_batches(tmp_path):
    from tests.ranks import spawn

    first, second = spawn(_two_process_run, tmp_path, timeout=300)
    assert first["wrapped"] == "DistributedDataParallel"
    assert sorted(first["rows"]) == [2, 4] and first["rows"] == second["rows"]
    assert ENTROPY in first["rows"][2]  # module paths of the model, not of the DDP wrapper (module.)
    assert not any("module." in key for row in first["rows"].values() for key in row)
    for step in (2, 4):  # RankMe of the rows both processes fed the head in the measured forward
        union = torch.cat([first["head"][step - 1], second["head"][step - 1]]).numpy().astype(np.float64)
        assert math.isclose(first["rows"][step][RANKME], ref_rankme(union), rel_tol=1e-4)
        alone = first["head"][step - 1].numpy().astype(np.float64)
        assert not math.isclose(first["rows"][step][RANKME], ref_rankme(alone), rel_tol=1e-4)


def test_windows_fill_on_the_steps_before_each_measured_one(tmp_path):
    """A window of 512 head-input rows and 128 rows a step: the head-input hooks also run on the three steps before
    each measured step (after the first measured step has shown the rows per step), so the first RankMe comes at
    the second measured step (8) from the rows of steps 4 to 8, not at step 16 from measured steps alone."""
    callback = GeomonTrainerCallback(every_n_steps=4, window_rows=512, strict=True)
    model = _model()
    head_rows = _record_head_inputs(model)
    computed = spy_computes(callback)
    _trainer(tmp_path, callback, steps=8, model=model).train()
    assert RANKME not in computed[4] and RANKME in computed[8]
    rows = torch.cat(head_rows[3:8]).numpy().astype(np.float64)  # forward i completes step i + 1
    assert math.isclose(computed[8][RANKME], ref_rankme(rows), rel_tol=1e-4)
    assert not math.isclose(computed[8][RANKME], ref_rankme(torch.cat(head_rows[4:8]).numpy()), rel_tol=1e-4)


def test_a_wandb_run_the_trainer_does_not_report_to_gets_nothing_from_geomon(tmp_path, offline_wandb):
    """A run the user opened while the Trainer reports elsewhere (``report_to=[]``) receives none of geomon's values,
    so it gets none of its dashboard (overview rows, tables, config) or alerts either."""
    from tests.wandb_records import config

    run = offline_wandb.init(mode="offline", dir=str(tmp_path), project="geomon-test")
    always = Threshold("geomon/attention/entropy/*", below=1e6, name="forced_collapse")
    callback = GeomonTrainerCallback(every_n_steps=2, alerts=[always], strict=True)
    trainer = _trainer(tmp_path, callback, steps=4, report_to=[])
    trainer.train()
    run.log({"mine": 1.0})
    offline_wandb.finish()
    assert _geomon_rows(trainer.state.log_history)  # geomon ran and logged to the Trainer's history
    history = _wandb_history(tmp_path, lambda rows: any("mine" in row for row in rows))
    assert any("mine" in row for row in history)
    assert not [key for row in history for key in row if key.startswith(("geomon", "train/"))], history
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert "geomon" not in config(run_file)


def test_a_resumed_run_writes_each_alert_once(tmp_path):
    """The alerts file lives in the output directory: a run resumed from a checkpoint there runs the later steps
    again, and their events must replace the first run's, not follow them."""
    import csv

    def callback():
        return GeomonTrainerCallback(every_n_steps=2, alerts=[FiresFrom(3)], neural_collapse=False, strict=True)

    _trainer(tmp_path, callback(), steps=6, save_steps=2).train()  # events at 4 and 6, checkpoints at 2, 4, 6
    first = (tmp_path / "geomon_alerts.csv").read_text()
    resumed = _trainer(tmp_path, callback(), steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with open(tmp_path / "geomon_alerts.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["step"], row["kind"]) for row in rows] == [("4", "fired"), ("6", "fired")], first
    with open(tmp_path / "geomon_alerts.superseded.csv", newline="") as handle:  # moved aside, not lost
        assert [row["step"] for row in csv.DictReader(handle)] == ["4", "6"]
    # a fresh run in the same output directory resumes nothing: it keeps the rows there and adds its own
    _trainer(tmp_path, callback(), steps=4).train()
    with open(tmp_path / "geomon_alerts.csv", newline="") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["4", "6", "4"]


def test_a_subclass_of_the_wandb_callback_counts_as_reporting_to_wandb(monkeypatch):
    """W&B documents subclassing ``WandbCallback`` (e.g. to log predictions): such a Trainer reports to W&B."""
    import sys
    from types import SimpleNamespace

    class WandbCallback:  # stands for transformers' class, matched by name through the bases
        pass

    class Predictions(WandbCallback):
        pass

    run = object()
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=run))
    callback = GeomonTrainerCallback(every_n_steps=2)
    for handler, want in (([Predictions()], run), ([object()], None)):
        callback.trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=handler))
        assert callback._reported_run() is want


class BufferedMetricsTrainer(transformers.Trainer):
    """Logs like TRL's trainers (SFT, DPO, GRPO, KTO): ``compute_loss`` buffers a metric per micro-batch and the
    ``log`` override adds their mean to the row being logged, then empties the buffer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffered: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        self.buffered.append(float(inputs["input_ids"][:, 0].float().mean()))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    def log(self, logs, start_time=None):
        if self.buffered:
            logs = {**logs, "first_token_mean": sum(self.buffered) / len(self.buffered)}
            self.buffered = []
        super().log(logs, start_time)


def _buffered_run(tmp_path, callback):
    trainer = BufferedMetricsTrainer(model=_model(), args=_args(tmp_path, steps=6), train_dataset=Tokens(),
                                     callbacks=[callback] if callback else [])  # fmt: skip
    trainer.train()
    return [row for row in trainer.state.log_history if "train_runtime" not in row]  # the end's summary aside


def test_a_trainer_that_builds_its_rows_in_log_keeps_them(tmp_path):
    """geomon's row goes through ``transformers.Trainer.log``, not the subclass's override: the Trainer's own rows
    keep the metrics it buffered (they moved into geomon's rows before, and their averaging windows changed)."""
    plain = _buffered_run(tmp_path / "plain", None)
    monitored = _buffered_run(tmp_path / "monitored", GeomonTrainerCallback(every_n_steps=3, attention=False))
    own = [row for row in monitored if not any(key.startswith("geomon/") for key in row)]
    assert [(r["step"], r["first_token_mean"]) for r in own] == [(r["step"], r["first_token_mean"]) for r in plain]
    geomon = [row for row in monitored if any(key.startswith("geomon/") for key in row)]
    assert [row["step"] for row in geomon] == [3, 6] and not any("first_token_mean" in row for row in geomon)


class GeneratingTrainer(transformers.Trainer):
    """Generates from the batch's prompts before the loss's forward, as GRPO does (under no_grad)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        model.generate(inputs["input_ids"][:, : CONTEXT // 2], max_new_tokens=3, do_sample=False, pad_token_id=0)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


def test_generation_before_the_trained_forward_is_not_measured(tmp_path):
    model = _model()
    calls = []  # (grad enabled, head input rows) of every forward of the model
    model.lm_head.register_forward_hook(
        lambda module, args, out: calls.append((torch.is_grad_enabled(), args[0].detach().reshape(-1, WIDTH)))
    )
    callback = GeomonTrainerCallback(every_n_steps=2, attention=False, neural_collapse=False, strict=True)
    trainer = GeneratingTrainer(
        model=model, args=_args(tmp_path, steps=2), train_dataset=Tokens(), callbacks=[callback]
    )
    trainer.train()
    (value,) = [row[RANKME] for row in trainer.state.log_history if RANKME in row]
    trained = [rows for grad, rows in calls if grad]
    assert len(trained) == 2 and len(calls) > 2  # one trained forward per step, generation's forwards besides
    assert math.isclose(value, ref_rankme(trained[1].numpy().astype(np.float64)), rel_tol=1e-4)


def test_checkpoint_and_stop_actions_save_once_and_a_resume_does_not_fire_again(tmp_path):
    """on_alert=["checkpoint", "stop"] under the Trainer: the alert of step 4 saves checkpoint-4 (save_strategy
    "no" otherwise) with the monitor's state, its episode open, and ends the run there; a run resumed from it
    continues the episode: no second event, no second checkpoint."""
    from geomon.alerts import Custom

    def callback(on_alert):
        rule = Custom("trigger", lambda step, scalars, heads: step >= 4, level="ERROR")
        return GeomonTrainerCallback(every_n_steps=2, alerts=[rule], on_alert=on_alert, neural_collapse=False,
                                     strict=True)  # fmt: skip

    first = _trainer(tmp_path, callback(["checkpoint", "stop"]), steps=10)
    first.train()
    assert first.state.global_step == 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
    state = torch.load(tmp_path / "checkpoint-4" / STATE_FILE, weights_only=True)
    assert state["alerts"]["counters"] == {"trigger": 1} and state["alerts"]["rules"]["trigger"]["open"]
    resumed_callback = callback("checkpoint")
    resumed = _trainer(tmp_path, resumed_callback, steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.state.global_step == 8
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
    assert resumed_callback.monitor.alert_engine.counters() == {"geomon/alerts/trigger": 1}
    rows = [row for row in resumed.state.log_history if "geomon/alerts/trigger" in row]
    # the history resumes with the checkpoint's rows (2, 4); the counter stays at 1 after it
    assert [(row["step"], row["geomon/alerts/trigger"]) for row in rows] == [(2, 0.0), (4, 1.0), (6, 1.0), (8, 1.0)]
