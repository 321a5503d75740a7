"""The W&B dashboard, read back from offline runs: summaries that apply, the overview section, the per-head tables,
geomon's settings in the config; and the recommended workspace built without network."""

import csv
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

lightning = pytest.importorskip("lightning.pytorch")
pytest.importorskip("wandb")

from geomon._tiny_gpt import TinyGPT  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from geomon.integrations.wandb_dashboard import OVERVIEW_PREFIX, recommended_workspace, workspace_sections  # noqa: E402
from geomon.monitor import Monitor  # noqa: E402
from tests.wandb_records import config, history, metrics, summary  # noqa: E402

NORMALIZED = "geomon/attention/entropy_normalized/"
MAX_LOGIT = "geomon/attention/max_logit/"
#: qkv weights scaled by this per optimizer step: attention is sharpest at step 2 and neither min nor max is last
SHARPNESS = {0: 1.0, 1: 1.0, 2: 4.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 2.0}


class ScheduledSharpness(lightning.LightningModule):
    """A TinyGPT whose attention logits the test sets per step (lr 0: nothing else changes the weights)."""

    def __init__(self, n_layer):
        super().__init__()
        self.model = TinyGPT(vocab_size=19, d_model=32, n_layer=n_layer, n_head=4, context=12)
        self.base = [block.attn.qkv.weight.detach().clone() for block in self.model.blocks]

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            for block, base in zip(self.model.blocks, self.base, strict=True):
                block.attn.qkv.weight.copy_(base * SHARPNESS[self.trainer.global_step])
        (x,) = batch
        return F.cross_entropy(self.model(x).flatten(0, 1), x.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(directory, monkeypatch, n_layer):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    logger = lightning.loggers.WandbLogger(project="geomon-test", save_dir=str(directory), offline=True)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 19, (64, 12), generator=torch.Generator().manual_seed(0)))
    trainer = lightning.Trainer(
        max_steps=7, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
        callbacks=[GeomonCallback(every_n_steps=2, query_rows=8, labels_fn=lambda batch: batch[0], strict=True)],
    )  # fmt: skip
    trainer.fit(ScheduledSharpness(n_layer), torch.utils.data.DataLoader(data, batch_size=8))
    files_dir = logger.experiment.dir
    logger.experiment.finish()
    (run_file,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the W&B service may still be flushing the run file on a loaded machine
        if any(f"{NORMALIZED}model.blocks.0.attn" in s for s in [summary(run_file)]) and config(run_file):
            break
        time.sleep(0.5)
    return run_file, files_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    try:
        return {n: _fit(tmp_path_factory.mktemp(f"layers{n}"), monkeypatch, n) for n in (2, 6)}
    finally:
        monkeypatch.undo()


def _series(rows, prefix):
    found = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and "/" not in key[len(prefix) :] and isinstance(value, float):
                found.setdefault(key, []).append((row["trainer/global_step"], value))
    return found


def test_summaries_are_the_worst_value_of_each_series(runs):
    run_file, _ = runs[2]
    rows, final = history(run_file), summary(run_file)
    entropy, logits = _series(rows, NORMALIZED), _series(rows, MAX_LOGIT)
    assert sorted(entropy) == [f"{NORMALIZED}model.blocks.{i}.attn" for i in range(2)]
    for key, points in entropy.items():
        assert [step for step, _ in points] == [0, 2, 4, 6]
        values = [value for _, value in points]
        assert values[-1] > min(values) + 0.01  # the schedule makes the last value not the worst one
        assert final[key] == {"min": pytest.approx(min(values))}
    for key, points in logits.items():
        values = [value for _, value in points]
        assert values[-1] < max(values) - 0.01
        assert final[key] == {"max": pytest.approx(max(values))}
    # each key is defined exactly (dots escaped) and plotted against the trainer's step
    defined = metrics(run_file)
    assert defined[r"geomon/attention/entropy_normalized/model\.blocks\.1\.attn"].step_metric == "trainer/global_step"


def test_the_overview_reduces_the_layers_and_does_not_grow_with_depth(runs):
    overview_keys = {}
    for n_layer, (run_file, _) in runs.items():
        rows = history(run_file)
        overview_keys[n_layer] = {key for row in rows for key in row if key.startswith(OVERVIEW_PREFIX)}
        for row in rows:
            layers = [v for k, v in row.items() if k.startswith(NORMALIZED) and isinstance(v, float)]
            if len(layers) == n_layer:  # the step's own overview row follows its scalar row
                later = [r for r in rows if r.get("trainer/global_step") == row["trainer/global_step"]]
                (over,) = [r for r in later if OVERVIEW_PREFIX + "entropy_normalized_min" in r]
                assert over[OVERVIEW_PREFIX + "entropy_normalized_min"] == pytest.approx(min(layers))
                assert over[OVERVIEW_PREFIX + "entropy_normalized_mean"] == pytest.approx(sum(layers) / n_layer)
                logits = [v for k, v in row.items() if k.startswith(MAX_LOGIT) and isinstance(v, float)]
                assert over[OVERVIEW_PREFIX + "max_logit_max"] == pytest.approx(max(logits))
        assert {OVERVIEW_PREFIX + name for name in ("entropy_normalized_min", "max_logit_max", "rankme", "nc1",
                                                    "alerts")} <= overview_keys[n_layer]  # fmt: skip
    assert overview_keys[2] == overview_keys[6]
    rows6 = history(runs[6][0])
    assert len({k for row in rows6 for k in row if k.startswith(NORMALIZED)}) == 6  # the detail does grow


def test_per_head_values_arrive_as_a_table(runs):
    for n_layer, (run_file, files_dir) in runs.items():
        rows = [row for row in history(run_file) if "geomon-heads/entropy_normalized/_type" in row]
        assert [row["trainer/global_step"] for row in rows] == [0, 2, 4, 6]
        assert {row["geomon-heads/entropy_normalized/_type"] for row in rows} == {"incremental-table-file"}
        table = []
        for row in rows:
            with open(f"{files_dir}/{row['geomon-heads/entropy_normalized/path']}") as handle:
                increment = json.load(handle)
            assert increment["columns"] == ["step", "layer", "head", "value"]
            table += increment["data"]
        assert len(table) == 4 * n_layer * 4  # steps x layers x heads
        with open(f"{files_dir}/geomon_heads.csv") as handle:
            written = {(int(r["step"]), r["key"].removeprefix(NORMALIZED), int(r["head"])): float(r["value"])
                       for r in csv.DictReader(handle) if r["key"].startswith(NORMALIZED)}  # fmt: skip
        assert {(s, layer, h): v for s, layer, h, v in table} == pytest.approx(written)
        # the heads of a layer average to the layer's logged value (every head sees the same query rows)
        scalars = {(row["trainer/global_step"], k.removeprefix(NORMALIZED)): v for row in history(run_file)
                   for k, v in row.items() if k.startswith(NORMALIZED) and isinstance(v, float)}  # fmt: skip
        for (step, layer), value in scalars.items():
            heads = [v for s, name, _, v in table if (s, name) == (step, layer)]
            assert sum(heads) / len(heads) == pytest.approx(value, rel=1e-5)
        logits = [row for row in history(run_file) if "geomon-heads/max_logit/_type" in row]
        assert logits[-1]["geomon-heads/max_logit/nrows"] == 4 * n_layer * 4


def test_the_run_config_holds_geomons_settings(runs):
    settings = config(runs[2][0])["geomon"]
    assert settings["every_n_steps"] == 2 and settings["query_rows"] == 8 and settings["strict"] is True
    assert settings["resolved_head"] == "model.head" and settings["media"] is True
    assert settings["on_alert"] == ["warn"] and settings["action_level"] == "WARN"
    assert [rule["name"] for rule in settings["alerts"]] == ["entropy_collapse", "max_logit", "rank_collapse",
                                                             "non_finite"]  # fmt: skip
    import inspect

    options = set(inspect.signature(Monitor.__init__).parameters) - {"self"}
    options |= set(inspect.signature(GeomonCallback.__init__).parameters) - {"self"}
    assert options <= set(settings), options - set(settings)


def test_the_heatmap_grows_with_the_model_and_keeps_its_title():
    pytest.importorskip("matplotlib")
    from geomon._media import heatmap_figure, render_rgb

    sizes = {}
    for layers, heads in ((2, 4), (24, 16)):
        values = {f"{NORMALIZED}model.transformer.h.{i}.attn": torch.rand(heads) for i in range(layers)}
        figure = heatmap_figure(values, step=123456)
        rgb = render_rgb(figure)
        renderer = figure.canvas.get_renderer()
        title = figure._suptitle
        box = title.get_window_extent(renderer)
        assert "step 123456" in title.get_text()
        assert box.x0 >= 0 and box.x1 <= rgb.shape[1] and box.y1 <= rgb.shape[0]
        sizes[layers] = rgb.shape[:2]
    assert sizes[2][0] >= 260 and sizes[2][1] >= 500  # readable even for a tiny model
    assert sizes[24][0] > 2 * sizes[2][0] and sizes[24][1] > sizes[2][1]


def test_the_recommended_workspace_is_built_without_network(runs):
    sections = workspace_sections()
    assert sections[0].name == "geomon-overview" and sections[0].pinned
    logged = {k for row in history(runs[6][0]) for k in row if k.startswith(OVERVIEW_PREFIX)}
    shown = {key for panel in sections[0].panels for key in panel.keys}
    assert logged <= shown  # every overview key has its panel
    regexes = [panel.regex for section in sections for panel in section.panels if panel.regex]
    import re

    for key in {k for row in history(runs[6][0]) for k in row if k.startswith("geomon/")
                and not k.startswith("geomon/media/")}:  # fmt: skip
        assert any(re.fullmatch(regex, key) for regex in regexes), key  # every logged series is on some panel
    pytest.importorskip("wandb_workspaces")
    view = recommended_workspace("my-entity", "my-project")._to_model().model_dump(by_alias=True, exclude_none=True)
    spec = view["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in spec] == [s.name for s in sections]
    assert [len(s["panels"]) for s in spec] == [len(s.panels) for s in sections]
    panels = {p["config"].get("chartTitle"): p["config"] for s in spec for p in s["panels"]}
    regex = panels["normalised attention entropy, per layer"]
    assert regex["useMetricRegex"] and re.fullmatch(regex["metricRegex"], NORMALIZED + "model.blocks.5.attn")
    assert panels["normalised attention entropy of the worst layer"]["metrics"] == [
        OVERVIEW_PREFIX + "entropy_normalized_min"
    ]
    assert view["entity"] == "my-entity" and math.isfinite(len(spec))


def test_the_docs_list_every_overview_key_and_section():
    from pathlib import Path

    from geomon.integrations.wandb_dashboard import OVERVIEW

    page = (Path(__file__).parents[1] / "docs" / "guides" / "wandb.md").read_text()
    assert all(f"| `{OVERVIEW_PREFIX}{item.name}` |" in page for item in OVERVIEW)
    assert all(f"| {section.name} " in page for section in workspace_sections())
