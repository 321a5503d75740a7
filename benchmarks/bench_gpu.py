"""`make bench-gpu`: the kernel benchmarks, the Trainer overhead benchmark and the cost of reading attention written
by hand at its softmax, written to ONE results file.

    python benchmarks/bench_gpu.py                 # on a CUDA machine: benchmarks/results/<device>-<date>.md
    python benchmarks/bench_gpu.py --tests         # ... with the GPU test run's summary line first
    python benchmarks/bench_gpu.py --fast          # anywhere (CPU: kernels in TRITON_INTERPRET=1), a few seconds,
                                                   # to a temporary file unless --out is given

Each part runs as its own process (``benchmarks/kernel_timings.py``, ``benchmarks/trainer_overhead.py``,
``benchmarks/softmax_read_cost.py``; Triton's interpreter mode must be chosen before triton is imported, and a crash
in one part leaves the others' results). The results file starts with the device, the torch / triton / CUDA
versions, the date and the commit, then holds each part's markdown as that part wrote it (its headings one level
down) and the command that produced it; a part that failed is recorded with its exit status and the tail of its
output, and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _machine import cpu_model, loadavg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu_model()}"


def slug(name: str) -> str:
    """A file-name form of a device name: ``NVIDIA H200`` -> ``nvidia-h200``."""
    kept = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in kept.split("-") if part)


def _versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    python = platform.python_version()
    return f"torch {torch.__version__}; triton {triton_version}; CUDA {torch.version.cuda}; Python {python}"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return (out.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def demote(markdown: str) -> list[str]:
    """A part's markdown with every heading one level down, so that the parts nest under the file's title."""
    return [("#" + line) if line.startswith("#") else line for line in markdown.rstrip("\n").split("\n")]


def run_part(
    title: str, command: list[str], out: Path, env: dict[str, str], timeout_s: float
) -> tuple[list[str], bool]:
    """Run one benchmark script that writes markdown to ``out``; its section, and whether it succeeded."""
    shown = shlex.join(["python", *(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c
                                    for c in command[1:])]).replace(str(out.parent), "$TMPDIR")  # fmt: skip
    print(f"== {title}: {shown}", flush=True)
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        status, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as error:
        status, output = "timeout", f"timed out after {timeout_s:.0f} s\n{error.stdout or ''}"
    section = [f"## {title}", "", f"- command: `{shown}`"]
    if status == 0 and out.exists():
        return [*section, "", *demote(out.read_text())], True
    tail = "\n".join(str(output).strip().splitlines()[-30:])
    print(f"{title} failed ({status}):\n{tail}", flush=True)
    return [*section, f"- FAILED (exit status {status}); the end of its output:", "", "```", tail, "```"], False


def test_summary(env: dict[str, str], timeout_s: float) -> list[str]:
    """The GPU test run's summary line (``make test-gpu``'s tests)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "tests/functional",
               "tests/metrics"]  # fmt: skip
    print("== GPU tests: " + shlex.join(command[1:]), flush=True)
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        lines = proc.stdout.strip().splitlines()
        summary = lines[-1] if lines else f"no output (exit status {proc.returncode})"
    except subprocess.TimeoutExpired:
        summary = f"timed out after {timeout_s:.0f} s"
    return ["## GPU tests", "", f"- command: `python {shlex.join(command[1:])}`", f"- result: {summary}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fast", action="store_true", help="tiny shapes (kernels --smoke, overhead --quick)")
    parser.add_argument("--tests", action="store_true", help="run the GPU tests first and record their summary")
    parser.add_argument("--overhead-minutes", type=float, default=5.0, help="cap per overhead configuration")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds each part may take")
    parser.add_argument("--out", type=Path, help="the results file (default: benchmarks/results/<device>-<date>.md)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.fast:
        parser.error("the full benchmarks need a CUDA GPU; use --fast to check that the scripts run on the CPU")
    date = datetime.date.today().isoformat()
    name = device_name()
    if args.out is not None:
        out = args.out
    elif args.fast:
        out = Path(tempfile.gettempdir()) / f"{slug(name)}-{date}-fast.md"
    else:
        out = RESULTS / f"{slug(name)}-{date}.md"
    env = dict(os.environ)
    if not cuda:
        env["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on the CPU
    sections, ok = [], True
    with tempfile.TemporaryDirectory(prefix="geomon-bench-gpu-") as scratch:
        if args.tests:
            sections += ["", *test_summary(env, args.timeout)]
        kernels_md = Path(scratch) / "kernels.md"
        kernels = [sys.executable, str(HERE / "kernel_timings.py"), "--out", str(kernels_md)]
        kernels += ["--smoke", "--reps", "1"] if args.fast else []
        part, good = run_part("Kernel benchmarks", kernels, kernels_md, env, args.timeout)
        sections, ok = [*sections, "", *part], ok and good
        overhead_md = Path(scratch) / "overhead.md"
        overhead = [sys.executable, str(HERE / "trainer_overhead.py"), "--out", str(overhead_md)]
        if args.fast:
            overhead += ["--quick"]
        else:
            overhead += ["--device", "cuda" if cuda else "cpu", "--max-minutes", f"{args.overhead_minutes:g}"]
        part, good = run_part("Overhead through a Lightning Trainer", overhead, overhead_md, env, args.timeout)
        sections, ok = [*sections, "", *part], ok and good
        softmax_md = Path(scratch) / "softmax_read.md"
        softmax_read = [sys.executable, str(HERE / "softmax_read_cost.py"), "--out", str(softmax_md)]
        softmax_read += ["--quick"] if args.fast else ["--device", "cuda" if cuda else "cpu"]
        part, good = run_part("Attention written by hand, read at its softmax", softmax_read, softmax_md, env,
                              args.timeout)  # fmt: skip
        sections, ok = [*sections, "", *part], ok and good
    header = [
        f"# geomon GPU benchmarks: {name}",
        "",
        f"- device: {name}" + (f"; host {cpu_model()}, {os.cpu_count()} cores" if cuda else ""),
        f"- versions: {_versions()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; commit {_commit()}",
        f"- command: `{shlex.join(['python', 'benchmarks/bench_gpu.py', *(sys.argv[1:] if argv is None else argv)])}`"
        + (" (fast mode: tiny shapes, a smoke test, not a measurement)" if args.fast else ""),
        f"- load average at the end: {loadavg()}",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*header, *sections]) + "\n")
    print(f"\nwrote {out}" + ("" if ok else " (a part FAILED: see the file)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
