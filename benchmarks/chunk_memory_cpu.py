"""Peak memory of the torch path of ``attention_entropy`` at the shapes the metric docs quote (CPU, float32).

    python benchmarks/chunk_memory_cpu.py [--repeats 3] [--out FILE]
    python benchmarks/chunk_memory_cpu.py --smoke            # tiny shapes, one run: checks the script runs

Each measurement runs in a fresh worker started through ``/bin/sh`` (a child forked from this torch-importing
process would inherit its ``ru_maxrss`` high-water mark): the worker creates ``q, k`` ``[B, H, N, Dh]``, makes a tiny
call to load the kernels, reads ``ru_maxrss``, makes the full call with the default chunking and prints how far
``ru_maxrss`` grew (glibc's allocator at its defaults, so heap reuse moves the figure between runs; hence repeats).
Shapes: the 7B shape (B = 1, H = 32, N = 4096, Dh = 128) and GPT-2 small (H = 12, N = 1024, Dh = 64) at B = 8, 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [
    ("7B shape", 1, 32, 4096, 128),
    ("GPT-2 small, B = 8", 8, 12, 1024, 64),
    ("GPT-2 small, B = 1", 1, 12, 1024, 64),
]


def worker(b: int, h: int, n: int, d: int) -> None:
    import torch

    from geomon.functional import attention_entropy

    torch.set_num_threads(2)
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    attention_entropy(q[..., :8, :], k[..., :8, :], backend="torch")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    attention_entropy(q, k, backend="torch")
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": grown, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one run each (not a measurement)")
    parser.add_argument("--worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import torch

    flags = "--smoke" if args.smoke else f"--repeats {args.repeats}"
    lines = [
        "# Torch-path peak memory of attention_entropy (CPU, float32, default chunking)",
        "",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"{platform.machine()}, 2 threads",
        f"- command: `python benchmarks/chunk_memory_cpu.py {flags}`; growth of `ru_maxrss` over the "
        "call, one fresh worker per run",
        "",
        "| shape | one float32 score matrix | peak growth per run (MiB) | seconds per run |",
        "|---|---|---|---|",
    ]
    shapes = [(name, b, h, n // 16, d // 4) for name, b, h, n, d in SHAPES] if args.smoke else SHAPES
    for name, b, h, n, d in shapes:
        runs = []
        for _ in range(1 if args.smoke else args.repeats):
            command = f"{sys.executable} {Path(__file__).resolve()} --worker {b} {h} {n} {d}"
            out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        matrix = b * h * n * n * 4 / 2**20
        peaks = ", ".join(f"{run['peak_mib']:.0f}" for run in runs)
        times = ", ".join(f"{run['seconds']:.1f}" for run in runs)
        lines.append(f"| {name} (B = {b}, H = {h}, N = {n}, Dh = {d}) | {matrix:.0f} MiB | {peaks} | {times} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
