"""examples/fabric.py and examples/accelerate_loop.py (fast mode) log the module names of the GPT itself, never a
wrapper's, in one process and in two, and the values of a plain loop with a Monitor on the unwrapped GPT.

The reference is this file's own loop: the same GPT, seed, optimizer and global batches, no framework, the monitor
attached to the bare model. The expected names are read off the bare model's ``named_modules()``.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from geomon import Monitor
from geomon._tiny_gpt import CausalSelfAttention, CharTokenizer, TinyGPT, load_corpus, random_batch

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, BATCH, CONTEXT, WIDTH = 4, 2, 8, 16, 32
FAST = ["--steps", str(STEPS), "--every", str(EVERY), "--global-batch", str(BATCH), "--context", str(CONTEXT),
        "--d-model", str(WIDTH)]  # fmt: skip
gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")


def _reference() -> tuple[dict[tuple[int, str], float], set[str]]:
    """The examples' training without a framework: ``{(step, key): value}`` and the GPT's attention layers."""
    text = load_corpus()
    tokens = CharTokenizer(text).encode(text)
    torch.manual_seed(0)
    model = TinyGPT(len(CharTokenizer(text)), d_model=WIDTH, n_layer=2, n_head=4, context=CONTEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = Monitor(every_n_steps=EVERY, spectral_modules=["blocks.*.attn.qkv", "head"],
                      window_rows=BATCH * CONTEXT).attach(model)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    logged = {}
    for step in range(STEPS):
        x, y = random_batch(tokens, BATCH, CONTEXT, generator)
        with monitor.step(step, labels=y):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor.is_scheduled(step):
            logged.update({(step, key): float(value) for key, value in monitor.compute(step).items()})
    attention = {name for name, module in model.named_modules() if isinstance(module, CausalSelfAttention)}
    return logged, attention


@pytest.fixture(scope="module")
def reference():
    # The examples use every core of a one-process run; the thread count changes the matmul reduction order, and
    # two AdamW steps amplify that to ~1e-5 relative (1 vs 2 threads), so the reference trains with the same count.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        return _reference()
    finally:
        torch.set_num_threads(threads)


def _check(logged, reference, rel):
    want, attention = reference
    assert attention == {"blocks.0.attn", "blocks.1.attn"}
    assert logged.keys() == want.keys()
    targets = {key.rsplit("/", 1)[1] for _, key in logged if key.startswith("geomon/attention/")}
    assert targets == attention  # the GPT's own names: no `_forward_module.`, no `module.`
    families = {key.split("/")[1] for _, key in logged}
    assert {"attention", "rankme", "nc", "spectral"} <= families
    for item, value in want.items():
        if math.isnan(value):  # nc4 of the first window: no previous window to compare with
            assert math.isnan(logged[item]), item
        else:
            assert logged[item] == pytest.approx(value, rel=rel, abs=1e-6), item


def _run(command, tmp_path, timeout=300):
    """Run ``command`` in its own session (a hung rank is killed with it); its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    child = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s (a rank hung?):\n{output[-3000:]}")
    assert child.returncode == 0, output[-3000:]
    return output


def _fabric_example():
    spec = importlib.util.spec_from_file_location("fabric_example", ROOT / "examples" / "fabric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fabric_example_one_process_logs_the_bare_model_values(tmp_path, reference, capsys):
    pytest.importorskip("lightning.fabric")
    threads = torch.get_num_threads()
    try:
        result = _fabric_example().main([*FAST, "--devices", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert "fabric.setup returned a _FabricModule around a TinyGPT" in capsys.readouterr().out
    assert result["world_size"] == 1
    _check(result["logged"], reference, rel=1e-6)


@pytest.mark.slow
@gloo
def test_fabric_example_two_ddp_processes_log_the_bare_model_values(tmp_path, reference):
    pytest.importorskip("lightning.fabric")
    # Fabric's strategy="ddp" runs the script again for rank 1: it runs as a script
    output = _run([sys.executable, "examples/fabric.py", *FAST, "--devices", "2", "--out", str(tmp_path)], tmp_path)
    assert "fabric.setup returned a _FabricModule around a DistributedDataParallel" in output
    assert "logged by rank zero of 2 processes" in output
    logged = _fabric_example().read_logged(tmp_path / "fabric" / "version_2")
    _check(logged, reference, rel=1e-4)


def _accelerate_logged(path):
    saved = json.loads(path.read_text())
    logged = {(int(step), key): value for step, values in saved["logged"].items() for key, value in values.items()}
    return saved["world_size"], logged


def test_accelerate_example_one_process_logs_the_bare_model_values(tmp_path, reference):
    pytest.importorskip("accelerate")
    out = tmp_path / "values.json"
    output = _run([sys.executable, "examples/accelerate_loop.py", *FAST, "--out", str(out)], tmp_path)
    assert "accelerator.prepare returned a TinyGPT" in output  # one CPU process: the model itself
    world, logged = _accelerate_logged(out)
    assert world == 1
    _check(logged, reference, rel=1e-6)


@pytest.mark.slow
@gloo
def test_accelerate_launch_two_processes_log_the_bare_model_values(tmp_path, reference):
    pytest.importorskip("accelerate")
    out = tmp_path / "values.json"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    output = _run([*launch, "examples/accelerate_loop.py", *FAST, "--out", str(out)], tmp_path)
    assert "accelerator.prepare returned a DistributedDataParallel" in output
    world, logged = _accelerate_logged(out)
    assert world == 2
    _check(logged, reference, rel=1e-4)
