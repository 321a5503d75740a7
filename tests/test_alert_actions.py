"""What GeomonCallback's ``on_alert`` actions do in real fits: stop every DDP rank at the same step, write a
checkpoint that loads and resumes, hand the event to a user function."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

lightning = pytest.importorskip("lightning.pytorch")


from geomon.alerts import Custom, EntropyCollapse, MaxLogitAbove  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from tests.test_callback import _loader  # noqa: E402
from tests.test_callback_ddp import TinyLitGPT as LitGPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVERY, FIRE_AT, MAX_STEPS = 2, 4, 12


def fires_at(step, scalars, heads):
    """A deterministic trigger (module level: ddp_spawn pickles the callback): the first measurement at or after
    ``FIRE_AT``, given that the attention values were computed (collectively, so every rank sees the same)."""
    return step >= FIRE_AT and any(key.startswith("geomon/attention/entropy/") for key in scalars)


def _trainer(root, callbacks, max_steps=MAX_STEPS, **kwargs):
    return lightning.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs,
    )  # fmt: skip


class Attention(nn.Module):
    """One SDPA self-attention over float inputs: its logits scale with the square of the inputs' scale."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (part.view(b, t, 2, 4).transpose(1, 2) for part in self.qkv(x).chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 8)


def rank_inputs(rank):
    """Rank 0's inputs are tiny at every step (max logit ~1e-3); rank 1's are tiny before batch ``FIRE_AT`` and
    large from there (max logit in the thousands): only the all-reduced max crosses 100 on both ranks."""
    x = torch.randn(MAX_STEPS, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    loud = (rank == 1) & (torch.arange(MAX_STEPS) >= FIRE_AT)
    return (x * torch.where(loud, 30.0, 0.05).view(-1, 1, 1, 1)).flatten(0, 1)


class QuietAndLoud(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.attn(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put: the logits are the inputs'

    def train_dataloader(self):
        dataset = torch.utils.data.TensorDataset(rank_inputs(self.global_rank))
        return torch.utils.data.DataLoader(dataset, batch_size=4)


class Record(lightning.Callback):
    """Each rank writes what it decided (ddp_spawn's parent never sees the ranks' trainers): the step it ended at
    and the geomon values it holds (the max logit, the alert counter)."""

    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("geomon/")}
        record = {"step": trainer.global_step, "metrics": metrics}
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def ddp_stop_fit(root):
    """The fit the DDP test runs in a child process (so that a hang cannot hang the test session)."""
    callback = GeomonCallback(
        every_n_steps=EVERY, alerts=[MaxLogitAbove(threshold=100.0)], on_alert=["checkpoint", "stop"], head=None,
        media=False, strict=True,
    )  # fmt: skip
    trainer = _trainer(root, [callback, Record(root)], devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    trainer.fit(QuietAndLoud())


def _local_max_logits():
    """The max attention logit of each rank's own batch at step ``FIRE_AT``, from an explicit scale x q.k over
    every head and pair: what a rank that did not sync would have compared with the threshold."""
    attn, out = QuietAndLoud().attn, []
    for rank in (0, 1):
        x = rank_inputs(rank)[4 * FIRE_AT : 4 * FIRE_AT + 4]
        with torch.no_grad():
            q, k, _ = (p.view(4, 6, 2, 4).transpose(1, 2) for p in attn.qkv(x).chunk(3, dim=-1))
        out.append(float((q @ k.transpose(-1, -2) / 2.0).max()))
    return out


@pytest.mark.slow
def test_stop_and_checkpoint_end_every_ddp_rank_at_the_alert_step(tmp_path):
    """Two gloo ranks see different data, so that only rank 1's own values cross the max-logit threshold: every
    rank must still take the same decision (the values are all-reduced before the rules see them)."""
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    quiet, loud = _local_max_logits()
    assert quiet < 1.0 and loud > 1000.0  # only rank 1's own values would cross the threshold 100
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
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # measured at 0, 2, 4: the alert of step FIRE_AT (patience 1) stops both ranks after its optimizer step
    assert [r["step"] for r in ranks] == [FIRE_AT + 1] * 2, output[-3000:]
    for r in ranks:  # both hold the global max (rank 1's) and counted one alert
        assert r["metrics"]["geomon/alerts/max_logit"] == 1.0
        assert r["metrics"]["geomon/attention/max_logit/attn"] == pytest.approx(loud, rel=1e-3)
    assert output.count(f"Max attention logit in layer attn at step {FIRE_AT}") == 1  # logged once, by rank zero
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
