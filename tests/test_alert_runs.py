"""Alerts in real fits: failing user code (an action, a rule) neither stops nor changes training, and is said once."""

import warnings

import pytest
import torch

lightning = pytest.importorskip("lightning.pytorch")

from geomon.alerts import Custom  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from geomon.functional import GeomonWarning  # noqa: E402
from tests.test_alert_actions import Attention  # noqa: E402


class Tiny(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention()
        self.losses = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.attn(x).square().mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_fit(tmp_path, **callback_options):
    torch.manual_seed(0)
    x = torch.randn(32, 6, 8, generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    module = Tiny()
    callback = GeomonCallback(every_n_steps=1, head=None, media=False, **callback_options)
    trainer = lightning.Trainer(
        max_steps=8, default_root_dir=tmp_path, logger=False, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer, module


def test_a_failing_action_and_rule_neither_stop_nor_change_training_and_are_said_once(tmp_path):
    def page_me(event):
        raise ConnectionError("pager unreachable")

    def broken(step, scalars, heads):
        raise KeyError("no such key")

    fires = Custom("always", lambda step, s, h: True, level="ERROR")  # fires at step 0, stays open
    flips = Custom("flips", lambda step, s, h: step % 2 == 0)  # a new episode at every even step: 4 actions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module = _tiny_fit(tmp_path, alerts=[fires, flips, Custom("broken", broken)], on_alert=page_me)
    reference_trainer, reference = _tiny_fit(tmp_path / "reference", alerts=())
    assert trainer.global_step == reference_trainer.global_step == 8
    assert module.losses == reference.losses  # bit-identical
    for name, value in module.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    messages = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]
    assert sum("pager unreachable" in m for m in messages) == 1, messages
    assert sum("no such key" in m for m in messages) == 1, messages
    counters = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("geomon/alerts/")}
    assert counters == {"geomon/alerts/always": 1.0, "geomon/alerts/flips": 4.0, "geomon/alerts/broken": 0.0}


def test_a_rule_whose_pattern_matches_no_logged_key_is_named_once_with_the_keys_there_are():
    """A typo in a key pattern would leave a rule that can never fire, in silence: the monitor says so at its
    first compute (once), naming the rule, its pattern and the key families it logs; a rule with its default
    pattern (entropy collapse on a model without attention) and a pattern that matches stay quiet."""
    from geomon import Monitor
    from geomon.alerts import EntropyCollapse, Threshold

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    rules = [
        Threshold("geomon/rankme/1*", below=1.0, name="typo"),  # the probe is "0"
        Threshold("geomon/rankme/*", below=1.0, name="fine"),
        EntropyCollapse(),
    ]
    monitor = Monitor(every_n_steps=1, head=None, embedding_modules=["0"], window_rows=8, alerts=rules).attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            with monitor.step(step):
                model(torch.randn(8, 8))
            monitor.compute(step)
    messages = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]
    named = [m for m in messages if "'typo'" in m]
    assert len(named) == 1 and "geomon/rankme/1*" in named[0] and "geomon/rankme/*" in named[0], messages
    assert not [m for m in messages if "'fine'" in m or "entropy_collapse" in m], messages
