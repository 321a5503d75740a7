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
