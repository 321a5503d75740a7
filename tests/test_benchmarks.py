"""The benchmark scripts run (tiny shapes, CPU): a GPU session can run them with one command."""

import os
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
