"""``geomon report``: readers return exactly what real loggers wrote; the report draws and embeds the figures."""

from __future__ import annotations

import base64
import time
from html.parser import HTMLParser

import numpy as np
import pytest

from geomon.tools.report import build_report, read_run
from geomon.tools.report.heatmap import head_matrix, heatmap_steps
from geomon.tools.report.phases import COMPRESSION_SEEKING, ENTROPY_SEEKING, WARMUP
from tests.report_runs import (
    EXPECTED_FIGURES,
    HEADS,
    L0,
    L1,
    SERIES,
    STEPS,
    head_value,
    log_all,
    metrics_at,
    write_alerts,
    write_heads,
)

lightning = pytest.importorskip("lightning.pytorch")
matplotlib_image = pytest.importorskip("matplotlib.image")


def _assert_series(run, keys=SERIES):
    for key in keys:
        assert run.series(key) == (sorted(SERIES[key]), [SERIES[key][s] for s in sorted(SERIES[key])]), key


@pytest.fixture
def csv_run(tmp_path):
    logger = lightning.loggers.CSVLogger(tmp_path, name="run")
    log_all(logger)
    write_heads(logger.log_dir)
    write_alerts(logger.log_dir)
    return tmp_path


def test_csv_logger_run_reads_back_exactly_from_the_top_directory(csv_run):
    run = read_run(csv_run)  # the version directory is found below run/
    assert run.source == "csv"
    _assert_series(run)
    assert set(run.keys()) >= set(SERIES)
    assert len(run.heads) == len(STEPS) * 2 * HEADS
    assert (6, f"geomon/attention/entropy_normalized/{L1}", 3, 0.03125) in run.heads
    assert [(a.step, a.rule, a.level) for a in run.alerts()] == [(4, "entropy_collapse", "WARN"), (6, "max_logit", "")]
    assert run.alert_steps() == [4, 6]
    assert run.step_range() == (0, 6)


def test_metrics_csv_file_and_demo_long_csv(tmp_path, csv_run):
    (metrics,) = csv_run.glob("run/version_*/metrics.csv")
    assert read_run(metrics).series("train_loss") == (STEPS, [4.0, 3.5, 3.25, 3.0])
    long = tmp_path / "demo" / "metrics.csv"
    long.parent.mkdir()
    rows = [f"{s},{k},{v!r}" for s in STEPS for k, v in metrics_at(s).items()]
    long.write_text("step,key,value\n" + "\n".join(rows) + "\n")
    run = read_run(long.parent)
    assert run.source == "csv-long"
    _assert_series(run)


def test_tensorboard_run_reads_back_exactly(tmp_path):
    pytest.importorskip("tensorboard")
    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    log_all(logger)
    write_heads(logger.log_dir)
    run = read_run(tmp_path)
    assert run.source == "tensorboard"
    _assert_series(run)
    assert len(run.heads) == len(STEPS) * 2 * HEADS
    resumed = lightning.loggers.TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)
    resumed.log_metrics({"geomon/rankme/ln_f": 12.0}, step=8)  # a second event file in the same directory
    resumed.finalize("success")
    run = read_run(tmp_path / "tb" / "version_0")
    assert len(run.files) == 3  # two event files and the heads sidecar
    assert run.series("geomon/rankme/ln_f") == ([0, 4, 6, 8], [30.0, 25.0, 27.5, 12.0])


def test_wandb_offline_run_reads_back_exactly(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="geomon-report-test")
    for step in STEPS:  # W&B's own _step counts rows 0..3; the global step is what the report must use
        run.log({"trainer/global_step": step, **metrics_at(step)})
    write_heads(run.dir)  # the run's files/ directory, where the callback puts sidecars
    run.finish()
    deadline = time.monotonic() + 30
    while True:  # the W&B service may still be flushing the run file when finish() returns on a loaded machine
        data = read_run(tmp_path)
        if len(data.series(f"geomon/attention/entropy/{L0}")[0]) >= len(STEPS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert data.source == "wandb"
    _assert_series(data)
    assert len(data.heads) == len(STEPS) * 2 * HEADS


class _Tables(HTMLParser):
    """Rows of every table in a page, as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_report_writes_the_page_and_every_figure(csv_run, tmp_path):
    report = build_report(csv_run, tmp_path / "out")
    assert {path.name for path in report.figures} == EXPECTED_FIGURES
    assert {path.name for path in (tmp_path / "out").iterdir()} == EXPECTED_FIGURES | {"index.html"}
    html = report.html.read_text()
    for path in report.figures:
        image = matplotlib_image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, path.name
        assert path.stat().st_size > 10_000, path.name
        assert f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" in html, path.name
    assert html.count("data:image/png;base64,") == len(EXPECTED_FIGURES)
    assert str(csv_run) in html and "steps 0 to 6" in html
    parser = _Tables()
    parser.feed(html)
    rows = {row[0]: row for row in parser.rows}
    # last values: entropy, normalised entropy, max logit, last step, lowest head at the last heads step
    lowest = [min(head_value(6, layer, h) for h in range(HEADS)) for layer in (0, 1)]
    assert [float(cell) for cell in rows[L0][1:]] == pytest.approx([1.25, 0.625, 80, 6, lowest[0]], rel=1e-3)
    assert [float(cell) for cell in rows[L1][1:]] == pytest.approx([1.125, 0.0625, 7, 6, lowest[1]], rel=1e-3)
    assert [float(cell) for cell in rows["ln_f"][1:]] == [27.5, 0.8125]
    alert_rows = [row for row in parser.rows if row[0] in ("4", "6")]
    assert [row[:2] for row in alert_rows] == [["4", "entropy_collapse"], ["6", "max_logit"]]


def test_default_output_directory_and_only_figures_with_data(tmp_path):
    logger = lightning.loggers.CSVLogger(tmp_path, name="run")
    for step in STEPS:
        logger.log_metrics({f"geomon/attention/entropy/{L0}": 1.0 + step, "loss": 1.0}, step=step)
    logger.save()
    report = build_report(logger.log_dir)
    assert report.out == tmp_path / "run" / "version_0" / "geomon-report"
    assert [path.name for path in report.figures] == ["attention_entropy.png"]
    assert "Alerts (0)" in report.html.read_text()


def test_time_series_figures_are_labelled_and_show_the_alerts_about_them(csv_run):
    from matplotlib.colors import to_hex

    from geomon.tools.report.figures import plan_figures

    run = read_run(csv_run)
    names = [plan.name for plan in plan_figures(run)]
    assert "attention_entropy.png" in names and "neural_collapse.png" in names and "spectral_sigma.png" in names
    for plan in plan_figures(run):
        figure = plan.draw()
        axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
        assert axes[-1].get_xlabel() == ("head" if "heatmap" in plan.name else "step"), plan.name
        if plan.name == "head_entropy_heatmap.png":  # panels share the layer axis; colour bar labelled
            assert [ax.get_title() for ax in axes] == ["step 0", "step 4", "step 6"]
            assert axes[0].get_ylabel() and figure.get_suptitle()
            assert next(ax.get_ylabel() for ax in figure.axes if ax not in axes).startswith("normalised entropy")
            continue
        assert axes and all(ax.get_ylabel() for ax in axes), plan.name
        assert any(ax.get_title() for ax in axes), plan.name
        # the run's alerts: entropy collapse at 4 (a sidecar row keyed by its layer), max logit at 6 (a count):
        # both about attention, so on the attention figures and on none of the others
        about_attention = plan.name.startswith("attention_") or plan.name == "entropy_bound.png"
        for ax in axes:
            red = [line.get_xdata()[0] for line in ax.get_lines() if to_hex(line.get_color()) == to_hex("red")]
            assert sorted(red) == ([4, 6] if about_attention else []), plan.name
            assert ax.get_legend() is not None or not about_attention, plan.name
        if plan.name == "attention_entropy.png":  # one colour per layer
            colors = {to_hex(line.get_color()) for line in axes[0].get_lines()[:2]}
            assert len(colors) == 2


def test_heatmap_panels_and_matrix(csv_run):
    run = read_run(csv_run)
    assert heatmap_steps(run) == [(0, None), (4, None), (6, None)]
    assert heatmap_steps(run, [1, 6, 7]) == [(0, 1), (6, None)]  # nearest logged step, earlier on a tie
    modules, matrix = head_matrix(run, 6)
    assert modules == [L0, L1]
    expected = [[head_value(6, layer, head) for head in range(HEADS)] for layer in range(2)]
    np.testing.assert_array_equal(matrix, expected)


def test_phases_are_shaded_on_the_rankme_figure_from_the_covariance_rankme(tmp_path):
    from geomon.tools.report.figures import plan_figures
    from geomon.tools.report.plots import rank_figure
    from geomon.tools.report.run import RunData
    from tests.test_phases import GRIDS, paper_curves

    steps = GRIDS["few early points"].tolist()
    cov, alpha = paper_curves(steps, 400, 20000)
    uncentred = [100.0 - 0.0005 * s for s in steps]  # falls throughout: phases read from it would be none
    scalars = [(s, "geomon/rankme_cov/z", r) for s, r in zip(steps, cov, strict=True)]
    scalars += [(s, "geomon/alpha_req/z", a) for s, a in zip(steps, alpha, strict=True)]
    scalars += [(s, "geomon/rankme/z", r) for s, r in zip(steps, uncentred, strict=True)]
    run = RunData(tmp_path, "csv", scalars=scalars)
    figure = rank_figure(run, "z", [])
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert labels[:3] == [WARMUP, ENTROPY_SEEKING, COMPRESSION_SEEKING]
    assert len(figure.axes[0].patches) == 3
    assert [ax.get_ylabel() for ax in figure.axes] == ["RankMe (covariance)", "RankMe", "alpha-ReQ α"]
    assert "phases from covariance RankMe" in figure.axes[0].get_title()
    assert figure.axes[0].get_xscale() == "symlog"  # five decades of steps
    (plan,) = [plan for plan in plan_figures(run) if plan.name == "rankme_alpha_z.png"]
    assert "read from the covariance RankMe" in plan.caption

    # without the covariance RankMe the uncentred one is read, and the report says so
    only_uncentred = RunData(
        tmp_path, "csv", scalars=[(s, "geomon/rankme/z", r) for s, r in zip(steps, cov, strict=True)]
    )
    figure = rank_figure(only_uncentred, "z", [])
    assert len(figure.axes[0].patches) == 3
    assert "phases from uncentred RankMe: no rankme_cov" in figure.axes[0].get_title()
    (plan,) = plan_figures(only_uncentred)
    assert "logged no covariance RankMe" in plan.caption


def test_probe_rows_hold_the_covariance_rankme(tmp_path):
    from geomon.tools.report.html import probe_rows
    from geomon.tools.report.run import RunData

    scalars = [(0, "geomon/rankme/z", 5.0), (0, "geomon/rankme_cov/z", 3.0), (1, "geomon/rankme_cov/w", 2.5)]
    header, rows = probe_rows(RunData(tmp_path, "csv", scalars=scalars))
    assert header == ["probe", "RankMe", "RankMe (covariance)"]
    assert [row[0] for row in rows] == ["w", "z"]
    assert rows == [["w", "–", "2.5"], ["z", "5", "3"]]  # "–": not logged for that probe
