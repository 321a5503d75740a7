"""The benchmark scripts run (tiny shapes, CPU): a GPU session can run them with one command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke_run_writes_every_section(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--smoke", "--reps", "1", "--out", str(out)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    text = out.read_text()
    for section in ("## Attention entropy + max logit", "## Class statistics", "## Classifier argmax"):
        assert section in text
    assert text.count("\n| ") >= 8  # header rows plus one measured row per case


def test_overhead_benchmark_quick_run_prints_ratios_and_writes_results(tmp_path):
    out = tmp_path / "overhead.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    configurations = ("default: Monitor()", "every probe, every step", "every probe, every step, query_rows=16")
    ratio = r"median ratio \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\], mean ratio \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\]"
    for name in configurations:
        assert re.search(rf"^{re.escape(name)}: {ratio} \(", proc.stdout, re.MULTILINE), proc.stdout
        # geomon never changes training: the monitored and the plain model end bit-identical on the CPU
        assert re.search(rf"^\| {re.escape(name)} +\|.*\| +0\.0e\+00 \|$", out.read_text(), re.MULTILINE)
    text = out.read_text()
    assert text.startswith("# geomon overhead on a whole training step: CPU")
    for field in ("- machine: ", "cores, torch.get_num_threads() = 1", "- torch ", "- date: ", "median ratio [95% CI]"):
        assert field in text
    assert f"wrote {out}" in proc.stdout


def test_alert_benchmark_fast_mode_records_and_replays(tmp_path):
    """benchmarks/alerts: a few dozen steps of two scenarios are recorded and replayed into the table."""
    records = tmp_path / "records"
    script = ROOT / "benchmarks" / "alerts"
    run = [sys.executable, str(script / "run.py"), "--fast", "--only", "logit_growth", "logit_growth_qk_norm"]
    subprocess.run([*run, "--out", str(records)], check=True, capture_output=True, timeout=300)
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(script / "replay.py"), "--records", str(records), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.read_text()
    assert "| logit_growth | unstable | 0.03 | 40 |" in text and "| logit_growth_qk_norm | healthy |" in text
    assert "precision" in proc.stdout


def test_loss_spike_definition():
    sys.path.insert(0, str(ROOT / "benchmarks" / "alerts"))
    from scenarios import loss_spike

    assert loss_spike([3.0 - 0.001 * t for t in range(500)]) is None  # a falling loss never spikes
    # flat at 2.0, then 3.0 from step 100: the 20-step mean after k high steps is 2 + k / 20, above 1.2 x 2.0 = 2.4
    # first at k = 9, i.e. at step 108
    assert loss_spike([2.0] * 100 + [3.0] * 50) == 108
    assert loss_spike([2.0] * 100 + [2.3] * 50) is None  # 15% up: below the 1.2 factor
    assert loss_spike([2.0, 1.9, float("nan")]) == 2


def test_window_fill_benchmark_quick_run_prints_the_fill_step_ratio(tmp_path):
    pytest.importorskip("torchvision")
    out = tmp_path / "window_fill.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "window_fill.py"), "--quick", "--threads", "1", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # quick: D = 32, a window of 128 rows = 16 steps of 8: 15 fill steps before each measured step, first value at 50
    pattern = r"^fill-step ratio \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\], mean ratio \d+\.\d{3} \(15 fill, 1 measured, "
    assert re.search(pattern + r"43 idle steps; first RankMe at step 50; weights bit-identical: True\)", proc.stdout)
    text = out.read_text()
    assert text.startswith("# geomon window fill") and "- machine: " in text and "| yes |" in text
