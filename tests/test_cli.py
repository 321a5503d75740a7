"""The ``geomon`` command: report output, one-line errors with exit status 2, demo forwarding, ``python -m``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from geomon.tools import cli
from tests.report_runs import EXPECTED_FIGURES, log_all, write_alerts, write_heads

lightning = pytest.importorskip("lightning.pytorch")
pytest.importorskip("matplotlib")


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_report_prints_where_it_wrote(tmp_path, capsys, monkeypatch):
    import geomon.tools.report

    seen = []
    build = geomon.tools.report.build_report
    monkeypatch.setattr(geomon.tools.report, "build_report", lambda *a, **k: seen.append(k["steps"]) or build(*a, **k))
    logger = lightning.loggers.CSVLogger(tmp_path, name="run")
    log_all(logger)
    write_heads(logger.log_dir)
    write_alerts(logger.log_dir)
    out = tmp_path / "report"
    assert cli.main(["report", str(tmp_path), "--out", str(out), "--steps", "2,6"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed
    assert all(name in printed for name in EXPECTED_FIGURES)
    assert {path.name for path in out.glob("*.png")} == EXPECTED_FIGURES
    assert seen == [[2, 6]]


def test_missing_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    line = _error_line(capsys)
    assert "nowhere" in line and "does not exist" in line


def test_directory_without_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no metrics.csv" in _error_line(capsys)


def test_two_runs_are_ambiguous(tmp_path, capsys):
    for _ in range(2):
        log_all(lightning.loggers.CSVLogger(tmp_path, name="run"))
    assert cli.main(["report", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "2 runs" in line and "version_0" in line and "version_1" in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x00\x01\x02\xff\xfe binary", "not a CSV"),
        (b"step,geomon/rankme/z\n0,1.5\n2,abc\n", "line 3"),
        (b"epoch,geomon/rankme/z\n0,1.5\n", "no 'step' column"),
        (b"", "empty"),
    ],
)
def test_corrupt_metrics_csv(tmp_path, capsys, content, expected):
    (tmp_path / "metrics.csv").write_bytes(content)
    assert cli.main(["report", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert expected in line and "metrics.csv" in line


def test_corrupt_event_and_wandb_files(tmp_path, capsys):
    events = tmp_path / "tb" / "events.out.tfevents.1.host"
    events.parent.mkdir()
    events.write_bytes(bytes(range(256)) * 4)
    assert cli.main(["report", str(events.parent)]) == 2
    assert "not a TensorBoard event file" in _error_line(capsys)
    run_file = tmp_path / "wandb" / "offline-run-x" / "run-x.wandb"
    run_file.parent.mkdir(parents=True)
    run_file.write_bytes(b"garbage, not a transaction log")
    assert cli.main(["report", str(run_file.parent)]) == 2
    assert "not a readable W&B run file" in _error_line(capsys)


def test_run_without_geomon_keys_lists_what_it_found(tmp_path, capsys):
    logger = lightning.loggers.CSVLogger(tmp_path, name="run")
    keys = [f"metric_{i:02d}" for i in range(12)]
    logger.log_metrics(dict.fromkeys(keys, 1.0), step=0)
    logger.save()
    assert cli.main(["report", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "no geomon/... values" in line
    assert all(key in line for key in keys[:10]) and "metric_11" not in line and "12 keys" in line


def test_bad_steps_argument_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(tmp_path), "--steps", "1,two"])
    assert exit_info.value.code == 2
    assert "comma-separated integer steps" in capsys.readouterr().err


def test_demo_forwards_its_arguments(monkeypatch):
    from geomon.tools import demo

    calls = []
    monkeypatch.setattr(demo, "main", lambda argv=None: calls.append(argv) or {"geomon/rankme/ln_f": 1.0})
    assert cli.main(["demo", "--steps", "3", "--help"]) == 0
    assert calls == [["--steps", "3", "--help"]]


def test_python_dash_m_geomon(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "geomon", "report", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("geomon: error:") and "missing" in done.stderr
