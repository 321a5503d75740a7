"""Bad input to the user-facing entry points fails at the boundary with an error that names the argument, what it
got and what is allowed; nothing odd is accepted to fail later (or to mean something else, as a string flag would)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon._tiny_gpt import TinyGPT
from geomon.alerts import EntropyCollapse
from geomon.functional import GeomonWarning


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"attention": "no"}, ["attention", "True or False", "'no'"]),
        ({"entropy_bound": "false"}, ["entropy_bound", "'false'"]),
        ({"strict": 1}, ["strict", "True or False"]),
        ({"head": 3}, ["head", "module name"]),
        ({"embedding_modules": None}, ["embedding_modules", "sequence", "None"]),
        ({"spectral_modules": [3]}, ["spectral_modules", "strings"]),
        ({"spectral_modules": "head"}, ["spectral_modules", "not a string"]),
        ({"alerts": 5}, ["alerts", "list of rules", "5"]),
        ({"alerts": "default"}, ["alerts", "'default'"]),
        ({"alerts": EntropyCollapse()}, ["alerts", "a single rule goes in a list"]),
        ({"alerts": [EntropyCollapse(), "nc"]}, ["alerts", "evaluate", "'nc'"]),
    ],
)
def test_monitor_arguments_are_checked_at_construction(kwargs, names):
    with pytest.raises(TypeError) as caught:
        Monitor(**kwargs)
    for name in names:
        assert name in str(caught.value), (name, str(caught.value))


def test_a_duck_typed_rule_is_accepted():
    class Quiet:
        name = "quiet"

        def evaluate(self, step, scalars, heads=None):
            return []

    assert Monitor(alerts=[Quiet()]).alert_engine.rules


def _attached():
    model = TinyGPT(vocab_size=11, d_model=16, n_layer=1, n_head=2, context=8)
    return model, Monitor(every_n_steps=1, strict=True).attach(model)


@pytest.mark.parametrize(
    ("labels", "names"),
    [
        (torch.tensor([[1.0, 2.0]]), ["integer tensor", "float32", ".long()"]),
        (torch.tensor([[True, False]]), ["integer tensor", "torch.bool"]),
        ([[1, 2]], ["torch.Tensor", "list"]),
    ],
)
def test_labels_that_are_not_integer_tensors_are_refused(labels, names):
    _, monitor = _attached()
    with pytest.raises(TypeError) as caught:
        monitor.step(0, labels=labels)
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize(("tensor", "shown"), [([1.0, 2.0], "list"), (torch.tensor(3.0), "shape ()")])
def test_observe_refuses_what_holds_no_rows(tensor, shown):
    _, monitor = _attached()
    with pytest.raises(TypeError, match=r"observe\('z', \.\.\.\) needs a tensor of embeddings") as caught:
        monitor.observe("z", tensor)
    assert shown in str(caught.value)


def test_observe_refuses_a_name_that_would_break_the_keys():
    _, monitor = _attached()
    with pytest.raises(ValueError, match=r"'proj/out' holds '/'.*'proj\.out'"):
        monitor.observe("proj/out", torch.randn(4, 3))


def test_compute_on_a_meta_model_warns_instead_of_raising():
    with torch.device("meta"):
        model = TinyGPT(vocab_size=11, d_model=16, n_layer=1, n_head=2, context=8)
    monitor = Monitor(every_n_steps=1).attach(model)
    x = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor.step(0):
            model(x)
        values = monitor.compute(0)  # the alert rules read floats, which meta tensors do not have
    assert isinstance(values, dict)
    assert any(issubclass(w.category, GeomonWarning) and "alert evaluation" in str(w.message) for w in caught)


lightning = pytest.importorskip("lightning.pytorch")
from geomon.callback import GeomonCallback  # noqa: E402


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [({"media": "no"}, ["media", "'no'"]), ({"on_alert": None}, ["on_alert", "callable", "None"])],
)
def test_callback_arguments_are_checked_at_construction(kwargs, names):
    with pytest.raises(TypeError) as caught:
        GeomonCallback(**kwargs)
    for name in names:
        assert name in str(caught.value)


class _Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.relu(self.body(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_float_labels_from_labels_fn_are_skipped_with_one_warning_not_truncated(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callback = GeomonCallback(every_n_steps=1, head="head", window_rows=16, labels_fn=lambda b: b[1].float() + 0.7)
    trainer = lightning.Trainer(max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_Classifier(), loader)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning) and "labels" in str(w.message)]
    assert any("integer tensor" in message and "float32" in message for message in said), said
    assert not [key for key in trainer.callback_metrics if key.startswith("geomon/nc/")]  # no truncated labels
    assert "geomon/rankme/head.input" in trainer.callback_metrics  # the rest is measured


def test_the_callbacks_take_the_memory_budget_that_the_attach_error_tells_to_raise(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from geomon._tiny_gpt import TinyGPT
    from geomon.callback import GeomonCallback

    class Lit(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyGPT(vocab_size=11, d_model=16, n_layer=1, n_head=2, context=8)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(callback):
        trainer = lightning.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, accelerator="cpu", callbacks=[callback])  # fmt: skip
        trainer.fit(Lit(), torch.utils.data.DataLoader([(torch.randint(0, 11, (2, 8)),)], batch_size=None))

    with pytest.raises(ValueError, match=r"over memory_budget_mib=0\.001.*or raise memory_budget_mib"):
        fit(GeomonCallback(memory_budget_mib=0.001))
    fit(GeomonCallback(memory_budget_mib=1.0, strict=True))  # the same plan fits in 1 MiB
    pytest.importorskip("transformers")
    from geomon.integrations.huggingface import GeomonTrainerCallback

    assert GeomonTrainerCallback(memory_budget_mib=0.5).monitor.options.memory_budget_mib == 0.5
