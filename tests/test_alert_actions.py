"""What GeomonCallback's ``on_alert`` actions do in real fits: stop every DDP rank at the same step, write a
checkpoint that loads and resumes, hand the event to a user function."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

lightning = pytest.importorskip("lightning.pytorch")


from geomon.alerts import Custom, EntropyCollapse  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from tests.test_callback import _loader  # noqa: E402
from tests.test_callback_ddp import TinyLitGPT as LitGPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVERY, FIRE_AT, MAX_STEPS = 2, 4, 12


class ShardedGPT(LitGPT):
    def train_dataloader(self):
        """Rank r gets every world-th row of the 48: each rank its own batches, as many on every rank."""
        data = _loader().dataset
        shard = torch.utils.data.Subset(data, range(self.global_rank, len(data), self.trainer.world_size))
        return torch.utils.data.DataLoader(shard, batch_size=4)


def fires_at(step, scalars, heads):
    """A deterministic trigger (module level: ddp_spawn pickles the callback): the first measurement at or after
    ``FIRE_AT``, given that the attention values were computed (collectively, so every rank sees the same)."""
    return step >= FIRE_AT and any(key.startswith("geomon/attention/entropy/") for key in scalars)


class FinalStep(lightning.Callback):
    """Each rank writes the global step it ended at (ddp_spawn's parent process never sees the ranks' trainers)."""

    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        Path(self.directory, f"rank{trainer.global_rank}.step").write_text(str(trainer.global_step))


def _trainer(root, callbacks, max_steps=MAX_STEPS, **kwargs):
    return lightning.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs,
    )  # fmt: skip


def ddp_stop_fit(root):
    """The fit the DDP test runs in a child process (so that a hang cannot hang the test session)."""
    torch.manual_seed(0)
    callback = GeomonCallback(
        every_n_steps=EVERY, alerts=[Custom("trigger", fires_at)], on_alert=["checkpoint", "stop"],
        neural_collapse=False, strict=True,
    )  # fmt: skip
    trainer = _trainer(
        root, [callback, FinalStep(root)], devices=2, strategy="ddp_spawn", use_distributed_sampler=False
    )
    trainer.fit(ShardedGPT())


@pytest.mark.slow
def test_stop_and_checkpoint_end_every_ddp_rank_at_the_alert_step(tmp_path):
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    code = f"from tests.test_alert_actions import ddp_stop_fit; ddp_stop_fit({str(tmp_path)!r})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and the ranks it spawned
        output, _ = child.communicate()
        pytest.fail(f"the 2-process fit did not return within 240 s (a rank hung?):\n{output[-3000:]}")
    assert child.returncode == 0, output[-3000:]
    steps = {path.name: int(path.read_text()) for path in tmp_path.glob("rank*.step")}
    # the alert fires on the measured step FIRE_AT, after whose optimizer step both ranks stop
    assert steps == {"rank0.step": FIRE_AT + 1, "rank1.step": FIRE_AT + 1}, output[-3000:]
    assert "Rule trigger fired at step 4" in output  # logged once, by rank zero
    assert output.count("Rule trigger fired") == 1
    # the checkpoint action is a collective (a barrier on every rank): it neither hangs nor writes twice
    assert [path.name for path in tmp_path.glob("*.ckpt")] == [f"geomon-alert-step{FIRE_AT}.ckpt"]
    checkpoint = torch.load(tmp_path / f"geomon-alert-step{FIRE_AT}.ckpt", weights_only=False)
    assert checkpoint["global_step"] == FIRE_AT + 1


def test_checkpoint_action_writes_a_checkpoint_that_loads_and_resumes(tmp_path):
    torch.manual_seed(0)
    module = LitGPT()
    snapshots = []  # the weights at the moment the alert fired, taken by a second action
    callback = GeomonCallback(
        every_n_steps=EVERY, alerts=[Custom("trigger", fires_at)], neural_collapse=False, strict=True,
        on_alert=["checkpoint", lambda event: snapshots.append({k: v.clone() for k, v in module.state_dict().items()})],
    )  # fmt: skip
    _trainer(tmp_path, [callback], max_steps=8).fit(module, _loader())
    assert [path.name for path in tmp_path.glob("*.ckpt")] == [f"geomon-alert-step{FIRE_AT}.ckpt"]
    path = tmp_path / f"geomon-alert-step{FIRE_AT}.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["global_step"] == FIRE_AT + 1  # saved after the optimizer step of the measured step
    loaded = LitGPT.load_from_checkpoint(path)
    assert len(snapshots) == 1
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, snapshots[0][key]), key
    # the alert engine's state travelled with it: the episode is open and counted once
    (geomon_state,) = [v for k, v in checkpoint["callbacks"].items() if "GeomonCallback" in k]
    assert geomon_state["alerts"]["counters"] == {"trigger": 1}

    # resume: the fit goes on from the checkpoint's step; the open episode does not fire (or checkpoint) again
    resumed = GeomonCallback(
        every_n_steps=EVERY, alerts=[Custom("trigger", fires_at)], on_alert="checkpoint", neural_collapse=False,
        strict=True,
    )  # fmt: skip
    trainer = _trainer(tmp_path / "resumed", [resumed], max_steps=10)
    trainer.fit(LitGPT(), _loader(), ckpt_path=path)
    assert trainer.global_step == 10
    assert resumed.monitor.alert_engine.counters() == {"geomon/alerts/trigger": 1}
    assert float(trainer.callback_metrics["geomon/alerts/trigger"]) == 1.0
    assert not list((tmp_path / "resumed").glob("*.ckpt"))


def test_callable_action_gets_the_event_naming_layer_and_step(tmp_path, monkeypatch):
    events, saves = [], []
    save_checkpoint = lightning.Trainer.save_checkpoint

    def counted(self, path, *args, **kwargs):
        saves.append(Path(path).name)
        return save_checkpoint(self, path, *args, **kwargs)

    monkeypatch.setattr(lightning.Trainer, "save_checkpoint", counted)
    # at initialisation every head's normalised entropy is about 0.98: below 0.999 from the first measurement
    rule = EntropyCollapse(threshold=0.999, relative_drop=None, patience=1)
    callback = GeomonCallback(
        every_n_steps=EVERY, alerts=[rule], on_alert=[events.append, "checkpoint"], neural_collapse=False
    )
    torch.manual_seed(0)
    _trainer(tmp_path, [callback], max_steps=4).fit(LitGPT(), _loader())
    assert [(e.kind, e.step, e.level) for e in events] == [("fired", 0, "ERROR")] * 2  # 8 of 8 heads: ERROR
    assert saves == ["geomon-alert-step0.ckpt"]  # two layers fired at step 0: one checkpoint, saved once
    for event, layer in zip(events, ("model.blocks.0.attn", "model.blocks.1.attn"), strict=True):
        assert event.title == f"Entropy collapse: {layer}"
        assert event.text.startswith(f"Entropy collapse in layer {layer} at step 0: heads 0, 1, 2, 3 of 4")
        assert event.key == f"geomon/attention/entropy_normalized/{layer}" and event.heads == (0, 1, 2, 3)


def test_actions_below_the_action_level_do_not_run(tmp_path):
    events = []
    callback = GeomonCallback(
        every_n_steps=EVERY, alerts=[Custom("trigger", fires_at, level="WARN")], on_alert=[events.append, "stop"],
        action_level="ERROR", neural_collapse=False,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [callback], max_steps=8)
    trainer.fit(LitGPT(), _loader())
    assert events == [] and trainer.global_step == 8  # the alert fired (and was counted), no action ran
    assert callback.monitor.alert_engine.counters() == {"geomon/alerts/trigger": 1}
