"""The callback's values reach real trackers: W&B offline (read back from the run file), TensorBoard, MLflow (a
local file store) and CSV, each read back with its own reader."""

import csv
import time

import pytest
import torch

lightning = pytest.importorskip("lightning.pytorch")

from geomon.callback import GeomonCallback  # noqa: E402
from tests.spies import spy_computes  # noqa: E402
from tests.test_callback import _loader, _module_class  # noqa: E402

KEY = "geomon/attention/entropy/model.blocks.0.attn"


def _fit(logger, steps=5, ckpt=None):
    torch.manual_seed(0)
    trainer = lightning.Trainer(
        max_steps=steps, logger=logger, callbacks=[GeomonCallback(every_n_steps=2)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_module_class(lightning)(), _loader(), ckpt_path=ckpt)
    return trainer


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


def _wandb_run(tmp_path, monkeypatch, callback, steps=5, prefix=""):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = lightning.loggers.WandbLogger(project="geomon-test", save_dir=str(tmp_path), offline=True, prefix=prefix)
    torch.manual_seed(0)
    trainer = lightning.Trainer(
        max_steps=steps, logger=logger, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_module_class(lightning)(), _loader())
    files_dir = logger.experiment.dir
    logger.experiment.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    return run_file, files_dir


def _records(run_file, kind, ready):
    from geomon.tools.report.wandb_log import records

    deadline = time.monotonic() + 30
    while True:  # the service may still be flushing the file after finish() on a loaded machine
        found = [r for r in records(run_file) if r.WhichOneof("record_type") == kind]
        if ready(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_wandb_gets_heatmaps_per_head_files_and_worst_value_summaries(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    import csv

    from tests.wandb_records import history

    run_file, files_dir = _wandb_run(tmp_path, monkeypatch, GeomonCallback(every_n_steps=2, strict=True))
    media = "geomon/media/entropy_heatmap/_type"
    deadline = time.monotonic() + 30
    while True:  # the service may still be flushing the file after finish() on a loaded machine
        rows, images = ([row for row in history(run_file) if key in row] for key in (KEY, media))
        if len(images) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [row["trainer/global_step"] for row in images] == [0, 2, 4]
    assert all(row[media] == "image-file" for row in images)
    # the run defines worst-value summaries of each exact key (dots escaped: W&B's globs skip dotted keys) on the
    # trainer's step; tests/test_wandb_dashboard.py reads the summaries themselves back
    metrics = {r.metric.name: r.metric for r in _records(run_file, "metric", lambda found: len(found) >= 4)}
    assert metrics[r"geomon/attention/max_logit/model\.blocks\.0\.attn"].summary.max
    assert metrics[r"geomon/attention/entropy_normalized/model\.blocks\.0\.attn"].summary.min
    assert metrics[r"geomon/attention/entropy/model\.blocks\.0\.attn"].step_metric == "trainer/global_step"
    assert len(rows) == 3 and all(0 < row[KEY] < 2.5 for row in rows)
    with open(f"{files_dir}/geomon_heads.csv") as handle:
        heads = list(csv.DictReader(handle))
    assert {int(r["step"]) for r in heads} == {0, 2, 4} and {int(r["head"]) for r in heads} == {0, 1, 2, 3}


def test_tensorboard_gets_per_head_histograms_and_heatmap_images(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="run")
    _fit(logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    histograms = events.Histograms("geomon/media/heads/attention/entropy_normalized/model.blocks.0.attn")
    assert [h.step for h in histograms] == [0, 2, 4]
    assert all(h.histogram_value.num == 4 for h in histograms)  # one value per head
    assert [image.step for image in events.Images("geomon/media/entropy_heatmap")] == [0, 2, 4]
    tags = events.Tags()
    assert not set(tags["scalars"]) & set(tags["histograms"])  # one tag, one kind
    # what TensorBoard's UI reads: its data provider lists and reads every per-layer scalar series
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.data.provider import RunTagFilter

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logger.log_dir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logger.log_dir)
    request = context.RequestContext()
    listed = provider.list_scalars(request, experiment_id="", plugin_name="scalars")
    key = "geomon/attention/entropy_normalized/model.blocks.0.attn"
    run = next(run for run, tags in listed.items() if key in tags)
    read = provider.read_scalars(request, experiment_id="", plugin_name="scalars", downsample=100,
                                 run_tag_filter=RunTagFilter(runs=[run], tags=[key]))  # fmt: skip
    assert [point.step for point in read[run][key]] == [0, 2, 4]


def test_mlflow_local_file_store_holds_the_values(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    logger = lightning.loggers.MLFlowLogger(experiment_name="geomon-test", tracking_uri=uri)
    _fit(logger)
    history = MlflowClient(tracking_uri=uri).get_metric_history(logger.run_id, KEY)
    assert [m.step for m in history] == [0, 2, 4]
    assert all(0 < m.value < 2.5 for m in history)


def test_loggers_sharing_a_directory_get_each_sidecar_row_once(tmp_path):
    """A CSV and a TensorBoard logger given one version directory (the layout `geomon report` reads) share its
    sidecars: every per-head value and every alert event is written once, not once per logger."""
    from tests.firing_rule import FiresFrom

    csv_logger = lightning.loggers.CSVLogger(tmp_path, name="run", version=0)
    tb_logger = lightning.loggers.TensorBoardLogger(tmp_path, name="run", version=0)
    assert csv_logger.log_dir == tb_logger.log_dir
    torch.manual_seed(0)
    trainer = lightning.Trainer(
        max_steps=3, logger=[csv_logger, tb_logger], callbacks=[GeomonCallback(every_n_steps=2, alerts=[FiresFrom()])],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_module_class(lightning)(), _loader())
    with open(f"{csv_logger.log_dir}/geomon_heads.csv") as handle:
        heads = [tuple(row.values()) for row in csv.DictReader(handle)]
    assert heads and len(heads) == len(set(heads))
    assert {row[0] for row in heads} == {"0", "2"}
    with open(f"{csv_logger.log_dir}/geomon_alerts.csv") as handle:
        alerts = [tuple(row.values()) for row in csv.DictReader(handle)]
    assert len(alerts) == 2 and len(set(alerts)) == 2  # steps 0 and 2, once each


def test_a_fit_resumed_into_its_own_directory_writes_each_sidecar_row_once(tmp_path):
    """Resumed twice from the checkpoint of step 2 into the same version directory (a crash after step 4): the rows of
    steps 2 and 4 are written again by each resume, and must replace the earlier ones."""

    def logger():
        return lightning.loggers.CSVLogger(tmp_path, name="run", version=0)

    trainer = _fit(logger(), steps=2)
    directory = trainer.logger.log_dir
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    for _ in range(2):
        _fit(logger(), steps=5, ckpt=str(tmp_path / "step2.ckpt"))
    with open(f"{directory}/geomon_heads.csv") as handle:
        rows = [(row["step"], row["key"], row["head"]) for row in csv.DictReader(handle)]
    assert {step for step, _, _ in rows} == {"0", "2", "4"}
    assert len(rows) == len(set(rows))
    with open(f"{directory}/geomon_heads.superseded.csv") as handle:  # the first resume's rows, moved, not lost
        moved = [(row["step"], row["key"], row["head"]) for row in csv.DictReader(handle)]
    assert {step for step, _, _ in moved} == {"2", "4"} and len(moved) == len(set(moved))


def test_a_second_fresh_fit_into_the_same_directory_keeps_the_first_ones_rows(tmp_path):
    """Two stages of training through one logger (two Trainers, no checkpoint): nothing is resumed, so the first
    stage's sidecar rows stay, as its rows of metrics.csv do."""
    logger = lightning.loggers.CSVLogger(tmp_path, name="run", version=0)
    for _ in range(2):
        _fit(logger, steps=3)
    with open(f"{logger.log_dir}/geomon_heads.csv") as handle:
        steps = [row["step"] for row in csv.DictReader(handle)]
    per_stage = len(steps) // 2
    assert per_stage and set(steps) == {"0", "2"}
    assert steps[:per_stage] == steps[per_stage:]  # both stages' rows, in order


def test_a_subclass_of_a_known_logger_gets_its_sidecars_and_media(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class TeamLogger(lightning.loggers.TensorBoardLogger):
        """A logger of one's own on top of TensorBoard's."""

    logger = TeamLogger(tmp_path, name="run")
    _fit(logger)
    assert (tmp_path / "run" / "version_0" / "geomon_heads.csv").is_file()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert any(tag.startswith("geomon/media/heads/") for tag in events.Tags()["histograms"])


def test_a_prefixed_wandb_logger_gets_the_summaries_of_its_prefixed_keys(tmp_path, monkeypatch):
    """``WandbLogger(prefix="exp")`` logs ``exp-geomon/...``: the worst-value summaries are defined for those names
    (the overview, which the dashboard logs itself, keeps its own)."""
    pytest.importorskip("wandb")
    from tests.wandb_records import history, summary

    run_file, _ = _wandb_run(tmp_path, monkeypatch, GeomonCallback(every_n_steps=2, strict=True), prefix="exp")
    key = "exp-geomon/attention/entropy_normalized/model.blocks.0.attn"
    deadline = time.monotonic() + 30
    while True:  # the service may still be flushing the file after finish() on a loaded machine
        rows = [row for row in history(run_file) if key in row]
        if len(rows) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rows) == 3
    assert summary(run_file)[key] == {"min": pytest.approx(min(row[key] for row in rows), rel=1e-6)}


@pytest.fixture(scope="module")
def four_loggers(tmp_path_factory):
    """One fit logging to CSV, TensorBoard, MLflow (a local file store) and W&B (offline) at once, with what the
    monitor computed at each step, and a rule whose episode starts at step 0 and never ends."""
    for package in ("wandb", "mlflow", "tensorboard"):
        pytest.importorskip(package)
    from geomon.alerts import MaxLogitAbove

    directory = tmp_path_factory.mktemp("four_loggers")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(directory),
                            "MLFLOW_ALLOW_FILE_STORE": "true"}.items():  # fmt: skip
            patch.setenv(name, value)
        loggers = {
            "csv": lightning.loggers.CSVLogger(directory, name="csv"),
            "tensorboard": lightning.loggers.TensorBoardLogger(directory, name="tb"),
            "mlflow": lightning.loggers.MLFlowLogger(experiment_name="geomon", tracking_uri=_mlflow_uri(directory)),
            "wandb": lightning.loggers.WandbLogger(project="geomon-test", save_dir=str(directory), offline=True),
        }
        rule = MaxLogitAbove(threshold=1e-6, name="logit_forced")  # every head is above it from the first step on
        callback = GeomonCallback(every_n_steps=2, spectral_modules=["model.head"], alerts=[rule], strict=True)
        computed = spy_computes(callback)
        torch.manual_seed(0)
        trainer = lightning.Trainer(
            max_steps=5, logger=list(loggers.values()), callbacks=[callback], enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        trainer.fit(_module_class(lightning)(), _loader())
        loggers["wandb"].experiment.finish()
    (run_file,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    return {"loggers": loggers, "computed": computed, "run_file": run_file, "directory": directory}


def _mlflow_uri(directory):
    return f"file:{directory / 'mlruns'}"


def _by_step(points):
    """``(step, key, value)`` triples as ``{step: {key: value}}``, each (step, key) required to be logged once."""
    found: dict[int, dict[str, float]] = {}
    for step, key, value in points:
        assert key not in found.setdefault(step, {}), f"{key} logged twice at step {step}"
        found[step][key] = value
    return found


def _csv_points(logger):
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return [(int(r["step"]), k, float(v)) for r in rows for k, v in r.items() if k.startswith("geomon/") and v != ""]


def _tensorboard_points(logger):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("geomon/")]
    return [(event.step, tag, event.value) for tag in tags for event in events.Scalars(tag)]


def _mlflow_points(logger, directory):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_uri(directory))
    names = [name for name in client.get_run(logger.run_id).data.metrics if name.startswith("geomon/")]
    return [(m.step, name, m.value) for name in names for m in client.get_metric_history(logger.run_id, name)]


def _wandb_points(run_file, count):
    from tests.wandb_records import history

    deadline = time.monotonic() + 30
    while True:  # the service may still be flushing the file after finish() on a loaded machine
        rows = [row for row in history(run_file) if any(isinstance(v, float) for k, v in row.items() if "geomon/" in k)]
        points = [(row["trainer/global_step"], key, value) for row in rows for key, value in row.items()
                  if key.startswith("geomon/") and not key.startswith("geomon/media/")]  # fmt: skip
        if len(points) >= count or time.monotonic() > deadline:
            return points
        time.sleep(0.5)


def test_every_logger_holds_exactly_what_the_monitor_computed(four_loggers):
    """Read back with each tracker's own reader: the same steps and keys, each once, and the computed float64 value
    (TensorBoard stores float32: the computed value rounded to it). The callback used to log float32 copies."""
    import numpy as np

    computed, loggers = four_loggers["computed"], four_loggers["loggers"]
    assert sorted(computed) == [0, 2, 4] and all(computed.values())
    count = sum(len(values) for values in computed.values())
    assert _by_step(_csv_points(loggers["csv"])) == computed
    assert _by_step(_mlflow_points(loggers["mlflow"], four_loggers["directory"])) == computed
    assert _by_step(_wandb_points(four_loggers["run_file"], count)) == computed
    as_float32 = {s: {k: float(np.float32(v)) for k, v in values.items()} for s, values in computed.items()}
    assert _by_step(_tensorboard_points(loggers["tensorboard"])) == as_float32


def test_a_wandb_logger_gets_each_alert_once_with_its_title_and_level(four_loggers):
    """An episode that starts at step 0 and lasts the whole fit (three measured steps) is one W&B alert per layer,
    titled with the rule's own name and the layer, at the rule's level, as docs/guides/alerts.md says."""
    from tests.wandb_records import alerts

    deadline = time.monotonic() + 30
    while len(found := alerts(four_loggers["run_file"])) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    layers = ["model.blocks.0.attn", "model.blocks.1.attn"]
    assert [(a["title"], a["level"], a["wait_duration"]) for a in found] == [
        (f"Max attention logit (logit_forced): {layer}", "WARN", 60_000) for layer in layers
    ]
    for alert, layer in zip(found, layers, strict=True):
        assert alert["text"].startswith(f"Max attention logit in layer {layer} at step 0:")
    assert [values["geomon/alerts/logit_forced"] for values in four_loggers["computed"].values()] == [2.0] * 3
