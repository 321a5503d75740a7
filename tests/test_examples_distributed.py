"""examples/ddp.py runs as 2 Lightning DDP processes on a CPU (gloo) and logs, from rank zero, the values that one
process logs on the same global batches."""

import importlib.util
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("lightning.pytorch")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--every", "2", "--global-batch", "8", "--context", "16", "--d-model", "32"]


def _example():
    spec = importlib.util.spec_from_file_location("ddp_example", ROOT / "examples" / "ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ddp_example_logs_the_one_process_values(tmp_path):
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    # two processes: Lightning runs the script again for rank 1, so it runs as a script, in its own session (a hung
    # rank is killed with it)
    command = [sys.executable, str(ROOT / "examples" / "ddp.py"), *FAST, "--out", str(tmp_path / "two")]
    child = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        pytest.fail(f"the 2-process example did not finish within 240 s (a rank hung?):\n{output[-3000:]}")
    assert child.returncode == 0, output[-3000:]
    assert output.count("values logged by rank zero of 2 processes") == 1  # rank 1 logs and prints nothing

    example = _example()
    threads = torch.get_num_threads()
    try:
        single = example.main([*FAST, "--devices", "1", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    double = example.read_logged(tmp_path / "two" / "ddp" / "version_0")
    assert single["world_size"] == 1
    one = single["logged"]

    assert one.keys() == double.keys()
    assert {step for step, _ in one} == {0, 2}
    families = {key.split("/")[1] for _, key in one}
    assert {"attention", "rankme", "nc", "spectral", "alerts"} <= families
    for (step, key), value in one.items():
        if key.startswith("geomon/nc/nc4/") and step == 0:  # no previous window to compare with yet
            assert math.isnan(value) and math.isnan(double[step, key])
            continue
        assert math.isfinite(value), (step, key)
        assert double[step, key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    # the printed table is the logged values
    assert "rankme/model.ln_f" in output and "spectral/sigma/model.head" in output
