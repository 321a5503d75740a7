"""The benchmark scripts run (tiny shapes, CPU): a GPU session can run them with one command."""

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _on_path(folder):
    """`folder` first on sys.path while a benchmark script is imported, then sys.path as it was."""
    saved = list(sys.path)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path[:] = saved


def test_bench_gpu_fast_mode_writes_one_file_with_the_kernel_and_trainer_overhead_tables(tmp_path):
    """`make bench-gpu`'s script in fast mode (kernels --smoke in Triton's interpreter, the Trainer overhead and the
    softmax reading --quick):
    one results file with the device, versions, date and every part's tables, so that it cannot rot."""
    pytest.importorskip("triton")
    out = tmp_path / "bench.md"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # the script sets it
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--fast", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.startswith("# geomon GPU benchmarks: ")
    for field in ("- device: ", "- versions: torch ", "; triton ", "; CUDA ", "- date: ", "; commit ", "--fast"):
        assert field in text, field
    kernels = text.index("## Kernel benchmarks")
    overhead = text.index("## Overhead through a Lightning Trainer")
    assert kernels < overhead and "FAILED" not in text
    sections = ("### Attention entropy + max logit", "### Masks and key ranges", "### Class statistics")
    for section in (*sections, "### Classifier argmax"):
        assert kernels < text.index(section) < overhead  # the kernel report's headings, one level down
    assert text[kernels:overhead].count("\n| ") >= 8  # header rows plus one measured row per case
    rules = text[text.index("### Masks and key ranges") : text.index("### Class statistics")]
    cases = (
        "| no mask |",
        "| key padding",
        "| causal + key padding",
        "| packed sequences",
        "| causal window",
        "| ALiBi",
    )
    for case in cases:
        assert re.search(re.escape(case) + r".*? \| \d+\.\d{3} \|", rules), case  # a time measured for each case
    # the overhead table: both configurations, a whole-run ratio with its interval, weights bit-identical
    ratio = r"\d+\.\d{4} \[\d+\.\d{4}, \d+\.\d{4}\]"
    for name in ("default GeomonCallback()", "every probe, every step"):
        row = rf"^\| {re.escape(name)} \| (50 / 50|1 / 1) \| 15 \| 60 \| .* \| {ratio} (\| {ratio} )?\| 0\.0e\+00 \|"
        assert re.search(row, text[overhead:], re.MULTILINE), text[overhead:]
    # the softmax-reading part, after the overhead: its table with one measured row
    softmax_read = text.index("## Attention written by hand, read at its softmax")
    assert overhead < softmax_read and re.search(r"softmax_read_cost.py .*--quick", text[softmax_read:])
    assert re.search(r"^\| 2, 2, 32, 64 \|( \d+\.\d{2} \|){6}$", text[softmax_read:], re.MULTILINE)
    assert f"wrote {out}" in proc.stdout


def test_chunk_memory_smoke_mode_measures_every_shape_in_a_fresh_worker(tmp_path):
    out = tmp_path / "memory.md"
    script = ROOT / "benchmarks" / "chunk_memory_cpu.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "MiB |" in line]
    assert len(rows) == 3 and all(re.search(r"\| -?\d+ \| \d+\.\d \|$", row) for row in rows), rows


def _trainer_overhead():
    # sys.path is put back at once: spawned children of later tests inherit it, and a benchmarks/ entry there once
    # shadowed an installed package of the same name as a script
    with _on_path(ROOT / "benchmarks"):
        import trainer_overhead

    return trainer_overhead


def test_whole_run_ratio_weights_each_kind_of_step_by_its_share_of_the_schedule():
    bench = _trainer_overhead()
    # plain steps 100 ms; a period of 50 geomon steps: 1 measured (200 ms), 11 fill (120 ms), 38 idle (100 ms)
    pairs = [{"plain": [100.0, 100.0], "idle": [100.0, 100.0]}, {"plain": [100.0], "fill": [120.0], "idle": [100.0]},
             {"plain": [100.0, 100.0], "measured": [200.0], "fill": [120.0, 120.0]}]  # fmt: skip
    shares = {"measured": 1 / 50, "fill": 11 / 50, "idle": 38 / 50}
    assert bench.whole_run_ratio(pairs, shares) == pytest.approx((200 + 11 * 120 + 38 * 100) / 50 / 100)
    # however many measured steps the blocks happened to hold
    assert bench.whole_run_ratio(pairs + pairs[2:] * 5, shares) == pytest.approx(1.064)
    assert bench.whole_run_ratio(pairs[:2], shares) is None  # no measured step: no estimate
    low, high = bench.interval(pairs * 4, shares)
    assert low == pytest.approx(1.064) and high == pytest.approx(1.064)  # no spread: a point
    # drift between pairs cancels: each kind is compared with its own pair's plain steps, wherever it fell
    drifting = [{"plain": [100.0 + 10 * i], "idle": [100.0 + 10 * i]} for i in range(6)]
    drifting[5]["measured"] = [150.0 + 60]  # the measured step fell in the slowest pair (plain 150): 1.4x that pair
    ratio = bench.whole_run_ratio(drifting, {"measured": 0.5, "idle": 0.5})
    assert ratio == pytest.approx(1 + 0.5 * 60 / 125)  # plain mean 125; unpaired means would give 1.34
    noisy = [{"plain": [100.0 + 5 * (i % 3)], "measured": [150.0 + 7 * (i % 5)]} for i in range(40)]
    low, high = bench.interval(noisy, {"measured": 1.0})
    assert low < bench.whole_run_ratio(noisy, {"measured": 1.0}) < high and high - low < 0.1


def test_shares_of_a_schedule_follow_from_the_plan_whatever_period_was_timed():
    """A callback timed at every 25 steps gives the shares of every 50: 1 measured, the steps within the probes' lead
    fill, the rest idle; a lead longer than the period makes every off-schedule step a fill step."""
    from types import SimpleNamespace

    bench = _trainer_overhead()

    def callback(lead: int, period: int) -> SimpleNamespace:
        plan = SimpleNamespace(fill_probes=lambda k: ["probe"] if 0 < k < lead else [])
        return SimpleNamespace(monitor=SimpleNamespace(plan=plan, every_n_steps=period))

    timed = callback(lead=12, period=25)  # 11 fill steps, as at GPT-2-small's shape with batch 1
    assert bench.shares(timed, 50) == pytest.approx({"measured": 1 / 50, "fill": 11 / 50, "idle": 38 / 50})
    assert bench.shares(timed) == pytest.approx({"measured": 1 / 25, "fill": 11 / 25, "idle": 13 / 25})
    assert bench.shares(callback(lead=80, period=25), 50) == pytest.approx({"measured": 1 / 50, "fill": 49 / 50})
    assert bench.shares(callback(lead=1, period=25), 1) == {"measured": 1.0}
    with pytest.raises(RuntimeError, match="not attached"):
        bench.shares(SimpleNamespace(monitor=SimpleNamespace(plan=None, every_n_steps=50)))


def test_a_timed_period_shorter_than_a_windows_lead_or_without_idle_steps_is_refused():
    from types import SimpleNamespace

    bench = _trainer_overhead()

    def callback(lead: int, period: int) -> SimpleNamespace:
        probe = SimpleNamespace(name="head", lead_steps=lambda world: lead)
        plan = SimpleNamespace(fill_probes=lambda k: [probe] if 0 < k < lead else [])
        return SimpleNamespace(monitor=SimpleNamespace(plan=plan, every_n_steps=period))

    bench.check_timed_period(callback(lead=12, period=25), 50)  # 1 measured, 11 fill, 13 idle: every kind timed
    bench.check_timed_period(callback(lead=12, period=12), 12)  # no idle step in either schedule
    bench.check_timed_period(callback(lead=12, period=1), 1)  # the configuration's own period: timed as it is
    with pytest.raises(ValueError, match="shorter than the 12 steps the windows of head take to fill"):
        bench.check_timed_period(callback(lead=12, period=8), 50)
    with pytest.raises(ValueError, match="times no idle step, which the schedule of every 50 has"):
        bench.check_timed_period(callback(lead=12, period=12), 50)


def test_baton_hands_the_machine_over_in_abba_blocks_and_never_to_both_arms():
    bench = _trainer_overhead()
    import threading

    baton, order, running = bench.Baton(lambda pairs_done: 3, timeout_s=30), [], []

    def arm(index):
        while baton.next_block(index):
            running.append(index)
            assert len(running) == 1  # the other arm waits
            order.append(index)
            running.remove(index)

    threads = [threading.Thread(target=arm, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert order == [0, 1, 1, 0, 0, 1]


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


def test_trainer_overhead_measure_every_times_more_measured_steps_and_weights_for_the_own_schedule(tmp_path):
    """--measure-every 10: the geomon arm measures 6 of its 60 steps, the table says it timed every 10 for a
    schedule of every 50, and both clocks' ratios and intervals are there."""
    out = tmp_path / "overhead.md"
    script = ROOT / "benchmarks" / "trainer_overhead.py"
    command = [
        sys.executable,
        str(script),
        "--quick",
        "--configs",
        "default",
        "--measure-every",
        "10",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    ratio = r"(\d+\.\d{4}) \[(\d+\.\d{4}), (\d+\.\d{4})\]"
    head = r"^\| default GeomonCallback\(\) \| 10 / 50 \| 15 \| 60 \| [\d.]+ \| 6 / (\d+) / (\d+) \| "
    row = re.search(rf"{head}.* \| {ratio} \| {ratio} \| 0\.0e\+00 \| ([\d.]+) \| {ratio} \|$", text, re.MULTILINE)
    assert row, text
    assert int(row[1]) + int(row[2]) == 54
    for at in (3, 6, 10):  # wall clock, CPU time, idle steps as geomon's hook time
        value, low, high = (float(row[at + i]) for i in range(3))
        assert low <= value <= high
    assert 0 < float(row[9]) < 1e4  # geomon's hooks on an idle step: microseconds, measured
    assert "process CPU time" in text


def test_class_stats_benchmark_runs_and_its_arms_agree():
    """benchmarks/class_stats.py on tiny shapes: three arms timed, each median inside its interval, and the script's
    own check that the arms' class sums (and geomon's counts) are equal passed."""
    with _on_path(ROOT / "benchmarks"):
        import class_stats

    text = class_stats.main(["--classes", "50", "--dim", "8", "--tokens", "256", "--rounds", "3", "--threads", "1"])
    rows = re.findall(r"^\| (geomon|index_add_|dense temp) \| ([\d.]+) \| ([\d.]+) - ([\d.]+) \|$", text, re.MULTILINE)
    assert [r[0] for r in rows] == ["geomon", "index_add_", "dense temp"]
    for _, median, low, high in rows:
        assert float(low) <= float(median) <= float(high)
    assert "sums checked equal at the end" in text


def test_trainer_overhead_refuses_a_timed_period_the_block_divides(tmp_path):
    script = ROOT / "benchmarks" / "trainer_overhead.py"
    command = [sys.executable, str(script), "--quick", "--configs", "default", "--measure-every", "8"]
    proc = subprocess.run([*command, "--out", str(tmp_path / "x.md")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is a multiple of the block length 4" in proc.stderr


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
    with _on_path(ROOT / "benchmarks" / "alerts"):
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


def test_recheck_share_benchmark_counts_tied_rows_and_runs_a_short_training():
    """benchmarks/recheck_share.py: a tied row is within every bound and a row leading by a wide margin within none,
    so two such rows give 50% for every rounding; a two-step run prints one row per checkpoint."""
    import torch

    with _on_path(ROOT / "benchmarks"):
        import recheck_share

    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # classes 0 and 1 equal: a tie for features along x
    features = torch.tensor([[3.0, 0.0], [0.0, 3.0]])  # row 0 tied (0 vs 1), row 1 leads by 3
    shares = recheck_share.lead_and_bound_shares(features, rows, torch.zeros(3))
    assert shares == {"tf32": 0.5, "bf16": 0.5, "ieee": 0.5, "exact": 0.5}
    text = recheck_share.main(["--steps", "0", "2", "--eval-windows", "2", "--context", "16", "--d-model", "16"])
    table = re.findall(r"^\| (\d+) \| ([\w.]+) \| ([\d.]+) \| ([\d.% /]+) \| ([\d.]+)% \|", text, re.MULTILINE)
    assert [int(r[0]) for r in table] == [0, 2]
    for row in table:
        assert all(0 <= float(x.strip().rstrip("%")) <= 100 for x in row[3].split("/"))


def test_compiled_measure_cost_runs_and_prints_its_ratios():
    pytest.importorskip("torch._dynamo")
    script = ROOT / "benchmarks" / "compiled_measure_cost.py"
    proc = subprocess.run([sys.executable, str(script), "--backend", "aot_eager", "--pairs", "2", "--warmup", "0",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = r"^\| \d+\.\d ms \| \d+\.\d ms \| \d+\.\d ms \| \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\] \| \d+\.\d{3} \|$"
    assert re.search(row, proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"default schedule \(1 measured step and \d+ fill steps in 50\): adds -?\d", proc.stdout)


def test_softmax_read_cost_quick_run_prints_its_ratios(tmp_path):
    script = ROOT / "benchmarks" / "softmax_read_cost.py"
    out = tmp_path / "softmax-read.md"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = r"^\| 2, 2, 32, 64 \|( \d+\.\d{2} \|){6}$"
    assert re.search(row, proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(row, out.read_text(), re.MULTILINE)


def test_rankme_padding_prints_every_case_with_padding_pulling_rankme_down():
    """``benchmarks/rankme_padding.py`` prints its six cases (two models, three shares of padding); in each, the
    rows of padding counted pull RankMe and centred RankMe below the real tokens' (what the docs cite)."""
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rankme_padding.py")], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600, check=True)  # fmt: skip
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if re.match(r"\| (GPT-2|Llama) \|", line)]
    assert len(rows) == 6
    for _, _, every, real, every_centred, real_centred in rows:
        assert float(every) < float(real) and float(every_centred) < float(real_centred)
