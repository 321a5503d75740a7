"""``geomon report`` reads exactly the run it is given, refuses malformed input with the file and the line, and
counts only scalar series from W&B."""

from __future__ import annotations

import shutil
import time

import pytest

from geomon.tools.cli import main
from geomon.tools.report import ReportError, read_run
from geomon.tools.report.wandb_log import scalar_items
from tests.report_runs import L0, SERIES, STEPS, metrics_at, write_alerts, write_heads

GEOMON_KEYS = {key for key in SERIES if key.startswith("geomon/")}


def write_metrics(folder, rows=None):
    """A Lightning-style wide ``metrics.csv`` with :data:`SERIES` (or the given text lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(SERIES)
    if rows is None:
        rows = [",".join([str(s)] + [repr(SERIES[k][s]) if s in SERIES[k] else "" for k in keys]) for s in STEPS]
    (folder / "metrics.csv").write_text("\n".join([",".join(["step", *keys]), *rows]) + "\n")
    return folder / "metrics.csv"


def other_run_heads(folder):
    """A per-head file of another model (other module names)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "step,key,head,value\n0,geomon/attention/entropy_normalized/encoder.layer.7.attention,0,0.5\n"
    (folder / "geomon_heads.csv").write_text(text)
    return folder / "geomon_heads.csv"


def test_sidecars_of_neighbouring_runs_are_never_read(tmp_path):
    version = tmp_path / "run" / "version_0"
    metrics = write_metrics(version)
    write_heads(tmp_path / "run")  # beside the version directory: another version's, or another run's
    (tmp_path / "other_run" / "version_3").mkdir(parents=True)
    write_alerts(tmp_path / "other_run" / "version_3")
    (version / "nested").mkdir()
    write_heads(version / "nested")
    for given in (tmp_path, tmp_path / "run", version, metrics):
        run = read_run(given)
        assert run.files == [metrics] and run.heads == [] and run.sidecar_alerts == [], given
        assert set(run.geomon_keys()) == GEOMON_KEYS
    heads, alerts = write_heads(version), write_alerts(version)  # its own sidecars, where the callback writes them
    run = read_run(tmp_path / "run")
    assert run.files == [metrics, heads, alerts] and len(run.heads) == len(STEPS) * 2 * 4
    assert [(a.step, a.rule) for a in run.sidecar_alerts] == [(4, "entropy_collapse")]


def test_another_runs_sidecar_in_the_run_directory_is_an_error(tmp_path, capsys):
    write_metrics(tmp_path)
    heads = other_run_heads(tmp_path)
    with pytest.raises(ReportError, match="belongs to another run") as caught:
        read_run(tmp_path)
    assert str(heads) in str(caught.value)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "geomon_heads.csv" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("header", "line", "message"),
    [
        (None, "4,1.0,2.0", r"metrics.csv, line 3: 3 cells, but the header has 16 columns"),
        ("step,a,a", "0,1,2", r"metrics.csv, line 1: the header repeats column 'a'"),
        ("step,,b", "0,1,2", r"metrics.csv, line 1: the header has an empty column name"),
        ("step,a,b", "0,1,x", r"metrics.csv, line 2: b 'x' is not a number"),
        ("step,a,b", "0.5,1,2", r"metrics.csv, line 2: step '0.5' is not an integer"),
    ],
)
def test_malformed_csv_is_an_error_naming_the_file_and_line(tmp_path, capsys, header, line, message):
    if header is None:  # a good file with one truncated row in the middle
        good = write_metrics(tmp_path).read_text().splitlines()[1:]
        write_metrics(tmp_path, [good[0], line, *good[1:]])
    else:
        (tmp_path / "metrics.csv").write_text(f"{header}\n{line}\n")
    with pytest.raises(ReportError, match=message):
        read_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geomon: error: ") and str(tmp_path / "metrics.csv") in err


def test_malformed_sidecar_and_a_sidecar_given_as_the_run(tmp_path):
    write_metrics(tmp_path)
    heads = write_heads(tmp_path)
    heads.write_text(heads.read_text() + f"6,geomon/attention/entropy_normalized/{L0},1\n")  # a row cut short
    with pytest.raises(ReportError, match=r"geomon_heads.csv, line 34: 3 cells, but the header has 4"):
        read_run(tmp_path)
    with pytest.raises(ReportError, match="sidecar, not a run's metrics"):
        read_run(heads)


def test_wandb_reader_counts_scalar_series_only(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    np = pytest.importorskip("numpy")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="geomon-report-media")
    image = wandb.Image(np.zeros((8, 8, 3), dtype=np.uint8))
    for step in STEPS:  # scalars, plus media of every kind under keys of the geomon scheme and of a new namespace
        table = wandb.Table(columns=["step", "layer", "head", "value"], data=[[step, 0, 0, 0.5]])
        run.log({"trainer/global_step": step, **metrics_at(step), "geomon/media/heatmap": image,
                 "geomon-overview/per_head": table, "geomon/media/hist": wandb.Histogram([1, 2, 3]),
                 "nested": {"value": float(step)}})  # fmt: skip
    run.finish()
    deadline = time.monotonic() + 30
    while True:  # the W&B service may still be flushing the run file when finish() returns
        data = read_run(tmp_path)
        if len(data.series(f"geomon/attention/entropy/{L0}")[0]) >= len(STEPS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(data.keys()) == set(SERIES) | {"trainer/global_step", "nested/value"}
    assert set(data.geomon_keys()) == GEOMON_KEYS  # as many series as the same run's CSV has
    csv_run = read_run(write_metrics(tmp_path / "csv"))
    assert len(data.geomon_keys()) == len(csv_run.geomon_keys())
    shutil.rmtree(tmp_path / "csv")


def test_scalar_items_leave_out_every_entry_of_a_logged_object():
    row = [
        (("loss",), 1.5),
        (("geomon/media/heatmap", "_type"), "image-file"),
        (("geomon/media/heatmap", "width"), 300),
        (("geomon/media/heatmap", "height"), 170),
        (("geomon-overview/table", "_type"), "table-file"),
        (("geomon-overview/table", "nrows"), 12),
        (("geomon-overview/table", "deep", "count"), 3),  # below an object, however deep
        (("flag",), True),
        (("a", "b"), 2),
    ]
    assert scalar_items(row) == [(("loss",), 1.5), (("a", "b"), 2)]


def test_a_hugging_face_trainer_wandb_run_is_read_on_its_training_steps(tmp_path, monkeypatch):
    """The Hugging Face Trainer's W&B rows carry ``train/global_step``; geomon, its dashboard and the loss each log
    a row per measured step, so W&B's ``_step`` runs ahead of the training step and must not be read as it."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="geomon-report-hf")
    for step in STEPS:
        run.log({"train/global_step": step, **metrics_at(step)})
        run.log({"train/global_step": step, "train/loss": 1.0 / (1 + step)})  # the Trainer's own row
        run.log({"train/global_step": step, "geomon-overview/worst": 0.5})  # the dashboard's row
    run.finish()
    key = f"geomon/attention/entropy/{L0}"
    deadline = time.monotonic() + 30
    while True:  # the W&B service may still be flushing the run file when finish() returns
        data = read_run(tmp_path)
        if len(data.series(key)[0]) >= len(STEPS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    steps, values = data.series(key)
    assert list(steps) == list(STEPS)
    assert list(values) == pytest.approx([metrics_at(step)[key] for step in STEPS])


def test_a_per_head_non_finite_alert_is_the_runs_own_and_drawn_on_every_figure(tmp_path):
    """A per-head event names ``<key>/head<h>``, never a scalar key: the sidecar holding only such events is still
    the run's own. And ``non_finite`` names the first offending key in name order (often ``alpha_req``) while a
    diverged run is non-finite everywhere: its step is drawn on every figure, not on the RankMe figure alone."""
    from geomon.tools.report.figures import plan_figures

    write_metrics(tmp_path)
    key = f"geomon/attention/entropy/{L0}/head2"
    (tmp_path / "geomon_alerts.csv").write_text(
        f"step,rule,key,kind,level,text\n2,non_finite,{key},fired,ERROR,a head went NaN\n"
        "6,non_finite,geomon/alpha_req/ln_f,fired,ERROR,everything is NaN\n"
    )
    run = read_run(tmp_path)  # not refused as another run's sidecar
    assert [(a.step, a.rule) for a in run.sidecar_alerts] == [(2, "non_finite"), (6, "non_finite")]
    for plan in plan_figures(run):
        if plan.name != "head_entropy_heatmap.png":
            assert 6 in plan.draw.args[-1], plan.name  # the alert steps each figure draws


def test_a_sidecar_of_per_head_events_only_is_the_runs_own(tmp_path):
    write_metrics(tmp_path)
    (tmp_path / "geomon_alerts.csv").write_text(
        f"step,rule,key,kind,level,text\n2,non_finite,geomon/attention/entropy/{L0}/head2,fired,ERROR,NaN head\n"
    )
    assert [(a.step, a.key) for a in read_run(tmp_path).sidecar_alerts] == [(2, f"geomon/attention/entropy/{L0}/head2")]
