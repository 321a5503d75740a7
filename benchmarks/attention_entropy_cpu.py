"""CPU benchmark: geomon's chunked ``attention_entropy`` against the naive, materialised computation.

Both paths compute, for every query row of ``q, k`` of shape ``[B, H, N, Dh]`` (B = 1, H = 8, Dh = 64, float32),
the attention entropy and the max logit, non-causal and causal:

* geomon: ``attention_entropy(q, k, is_causal=...)`` with its default chunking (an online softmax over chunks of
  keys, never the full ``N x N`` score matrix);
* naive: ``s = (q @ k.transpose(-1, -2)) * scale`` (causal: the upper triangle ``masked_fill``-ed with ``-inf``),
  ``p = softmax(s)``, ``entropy = -(p * log_softmax(s)).sum(-1)``, ``max_logit = s.amax(-1)``. In the causal case
  masked entries give ``0 * -inf = NaN``, so the sum is a ``nansum`` (the same cost as ``sum``).

Each measurement (one method, one N, causal or not) runs in a fresh subprocess,
``python benchmarks/attention_entropy_cpu.py --one naive 2048 causal``, which creates the inputs (``torch.randn``
writes, hence touches, every page), makes one tiny call to load the kernels and start the thread pool, reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, makes the full-size call and reports the increase of ``ru_maxrss``
(KiB on Linux, printed in MiB) as the call's peak memory. ``ru_maxrss`` is a high-water mark of the whole process:
it never goes down, so a second measurement in the same process would only show memory beyond the first one's
peak. Hence one subprocess per measurement. Two more traps are handled: (1) on Linux a child starts with the
high-water mark of the process it was forked from (it is carried over at ``exec``), so workers are started
through ``/bin/sh``, which forks them from a small process instead of this (torch-importing) driver; (2) the worker
also reports how far its baseline high-water mark lies above its current RSS (``floor slack``): memory up to that
level would not show, so a large slack is flagged in the notes. The first full-size call is also the warm-up;
the time is then the median of several ``time.perf_counter`` repetitions (more for small N), with
``torch.set_num_threads(2)``. The allocator is left at glibc's defaults, as a training job would have it: score-
sized blocks above glibc's mmap threshold (at most 32 MiB) are fresh ``mmap``s, page-faulted on every call, while
smaller ones are reused from the heap. geomon's chunk temporaries are small enough for the heap, so its peak
depends on heap reuse and fragmentation and varies between runs by a few tens of MiB (with
``MALLOC_MMAP_THRESHOLD_=1048576`` it is steady, but the calls get slower from the page faults).

Before a row is reported, the outputs of the two measured calls (saved by the workers) are compared: the largest
absolute difference of the entropies (and of the max logits) is printed, so that the two columns time the same
work; a disagreement above ``1e-3`` makes the script fail before it writes the results. Where the naive score
matrices would need more than ~6 GiB the naive path is skipped, and geomon is checked against the naive formula
on a subset of query rows instead. N = 8192 runs only when its projected time fits the time budget (``--budget``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/attention_entropy_cpu.py            # the real run, ~3 minutes on 2 cores
    .venv/bin/python benchmarks/attention_entropy_cpu.py --quick    # smoke test: N = 256, 512, 2 repetitions

The table is printed and written as markdown to ``benchmarks/results/cpu-attention-entropy-<YYYY-MM-DD>.md``
(``--out`` overrides the path; ``--quick`` writes to the temporary directory unless ``--out`` is given, so that a
smoke test never overwrites real results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model, loadavg

THREADS = 2
B, H, DH = 1, 8, 64
SIZES = (256, 512, 1024, 2048, 4096, 8192)
QUICK_SIZES = (256, 512)
SEED = 0
#: The naive path holds about this many N x N float32 tensors at its peak (scores, probabilities, log-probabilities
#: and their product; measured: ~3.3x non-causal, ~3.5x causal at N = 4096); it is skipped above NAIVE_LIMIT bytes.
NAIVE_PEAK_FACTOR = 4
NAIVE_LIMIT = 6 * 2**30
TOLERANCE = 1e-3
#: Timed repetitions: enough for about TARGET_S seconds of timed work, between MIN_REPS and MAX_REPS.
TARGET_S, MIN_REPS, MAX_REPS = 0.5, 3, 20
STARTUP_S = 2.5  # a worker's interpreter and torch start-up, for the budget projection
#: geomon's time per call from N to 2N (4x the work): 2.9x to 5.4x measured here from 4096 to 8192; conservative
GROWTH = 5.0
MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


def _scores_bytes(n: int) -> int:
    return B * H * n * n * 4


def _naive_fits(n: int) -> bool:
    return NAIVE_PEAK_FACTOR * _scores_bytes(n) <= NAIVE_LIMIT


# --------------------------------------------------------------------------------------------------- worker side


def _inputs(n: int):
    import torch

    gen = torch.Generator().manual_seed(SEED)
    q = torch.randn(B, H, n, DH, generator=gen)  # randn writes every element: the pages are touched
    k = torch.randn(B, H, n, DH, generator=gen)
    return q, k


def _naive(q, k, causal: bool):
    import torch

    scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        n_q, n_k = s.shape[-2:]
        s = s.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(s, dim=-1)
    plogp = p * torch.log_softmax(s, dim=-1)
    entropy = -(plogp.nansum(-1) if causal else plogp.sum(-1))  # causal: masked entries are 0 * -inf = NaN
    return entropy, s.amax(-1)


def _method(name: str):
    if name == "naive":
        return _naive
    from geomon.functional import attention_entropy

    return lambda q, k, causal: attention_entropy(q, k, is_causal=causal)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _worker(method: str, n: int, causal: bool, reps: int | None, save: str | None) -> None:
    import torch

    torch.set_num_threads(THREADS)
    fn = _method(method)
    q, k = _inputs(n)
    tiny_q, tiny_k = _inputs(64)
    fn(tiny_q, tiny_k, causal)  # loads the kernels and starts the thread pool before the baseline reading
    del tiny_q, tiny_k
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slack = before - _rss_kib()
    t0 = time.perf_counter()
    out = fn(q, k, causal)
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    if reps is None:
        reps = max(MIN_REPS, min(MAX_REPS, math.ceil(TARGET_S / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(q, k, causal)
        times.append(time.perf_counter() - t0)
    if save:
        torch.save({"entropy": out[0], "max_logit": out[1]}, save)
    result = {
        "ms": 1e3 * statistics.median(times),
        "first_ms": 1e3 * first,
        "reps": reps,
        "peak_mib": peak / 1024,
        "slack_mib": slack / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if method == "geomon":
        result["chunks"] = _geomon_chunks(n, causal)
    print("RESULT " + json.dumps(result), flush=True)


def _geomon_chunks(n: int, causal: bool) -> list[int]:
    """Keys per chunk of geomon's default chunking, one entry per chunk, read off the batched matmuls of a call on
    ``meta`` tensors (no data, no compute), so that the table shows what the code does rather than a copy of its
    rule."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from geomon.functional import attention_entropy

    class _Matmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.widths: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
                self.widths.append(int(out.shape[-1]))
            return out

    q = torch.empty(B, H, n, DH, device="meta")
    with _Matmuls() as log:
        attention_entropy(q, q, is_causal=causal)
    return log.widths


# --------------------------------------------------------------------------------------------------- driver side


def _run_worker(method: str, n: int, causal: bool, reps: int | None, save: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method, str(n), "causal" if causal else "full"]
    cmd += ["--save", str(save)] + (["--reps", str(reps)] if reps else [])
    # Through /bin/sh, which forks the worker: the worker then starts from the small shell's high-water mark, not
    # from this process's (exec carries the forking process's ru_maxrss over to the child).
    proc = subprocess.run(["/bin/sh", "-c", '"$0" "$@"; exit $?', *cmd], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"error": f"worker exited with {proc.returncode}: {tail[0][:200]}"}


def _compare(geomon_file: Path, naive_file: Path | None, n: int, causal: bool) -> tuple[float, float, str]:
    """Max abs differences (entropy, max logit) of the two measured outputs; without a naive output, geomon's
    output against the naive formula on every 64th query row (the naive N x N matrices would not fit)."""
    import torch

    g = torch.load(geomon_file)
    if naive_file is not None:
        r = torch.load(naive_file)
        note = ""
    else:
        q, k = _inputs(n)
        rows = torch.arange(0, n, 64)
        s = (q[:, :, rows] @ k.transpose(-1, -2)) / math.sqrt(DH)
        if causal:
            s = s.masked_fill(torch.arange(n)[None, :] > rows[:, None], -math.inf)
        p = torch.softmax(s, dim=-1)
        r = {"entropy": -(p * torch.log_softmax(s, dim=-1)).nansum(-1), "max_logit": s.amax(-1)}
        g = {key: value[:, :, rows] for key, value in g.items()}
        note = f" on rows 0, 64, ..., {n - 64}"
    d_entropy = (g["entropy"] - r["entropy"]).abs().max().item()
    d_logit = (g["max_logit"] - r["max_logit"]).abs().max().item()
    return d_entropy, d_logit, note


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _table(rows: list[dict]) -> list[str]:
    head = [
        "N",
        "causal",
        "naive S MiB",
        "geomon ms",
        "naive ms",
        "time g/n",
        "geomon peak MiB",
        "naive peak MiB",
        "mem g/n",
        "max abs ΔH",
        "max abs Δmax_logit",
        "geomon chunk",
        "reps g/n",
    ]
    body = []
    for r in rows:
        g, v = r["geomon"], r["naive"]
        body.append(
            [
                str(r["n"]),
                "yes" if r["causal"] else "no",
                _fmt(_scores_bytes(r["n"]) / MIB, 0),
                _fmt(g.get("ms")),
                _fmt(v.get("ms")),
                _fmt(g["ms"] / v["ms"], 2) if "ms" in g and "ms" in v else "-",
                _fmt(g.get("peak_mib")),
                _fmt(v.get("peak_mib")),
                _fmt(g["peak_mib"] / v["peak_mib"], 2) if "peak_mib" in g and v.get("peak_mib") else "-",
                f"{r['d_entropy']:.1e}" if r.get("d_entropy") is not None else "-",
                f"{r['d_logit']:.1e}" if r.get("d_logit") is not None else "-",
                f"{g['chunks'][0]} x {len(g['chunks'])}" if g.get("chunks") else "-",
                f"{g.get('reps', '-')}/{v.get('reps', '-')}",
            ]
        )
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return [line(head), rule, *(line(b) for b in body)]


def _drive(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    date = datetime.date.today().isoformat()
    sizes = QUICK_SIZES if args.quick else SIZES
    reps = 2 if args.quick else None
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.gettempdir()) / f"cpu-attention-entropy-{date}-quick.md"
    else:
        out = RESULTS / f"cpu-attention-entropy-{date}.md"
    load_start = loadavg()
    rows, notes, failed = [], [], False
    per_call_s: dict[tuple[int, bool], float] = {}  # geomon's seconds per call, for the budget projection
    with tempfile.TemporaryDirectory(prefix="geomon-bench-") as tmp:
        for n in sizes:
            if n > 4096 and not args.quick:
                prev = [per_call_s.get((n // 2, c)) for c in (False, True)]
                if None in prev:
                    notes.append(f"N = {n} skipped: N = {n // 2} did not run")
                    continue
                projected = sum(GROWTH * t * (1 + MIN_REPS) + STARTUP_S for t in prev)
                left = args.budget - (time.perf_counter() - start)
                if projected > left:
                    notes.append(f"N = {n} skipped: projected {projected:.0f} s, {left:.0f} s left of the budget")
                    print(notes[-1], flush=True)
                    continue
            for causal in (False, True):
                tag = f"N={n} {'causal' if causal else 'full'}"
                gfile, nfile = Path(tmp, f"g-{n}-{causal}.pt"), Path(tmp, f"n-{n}-{causal}.pt")
                g = _run_worker("geomon", n, causal, reps, gfile)
                if _naive_fits(n):
                    v = _run_worker("naive", n, causal, reps, nfile)
                else:
                    need = NAIVE_PEAK_FACTOR * _scores_bytes(n) / 2**30
                    v = {"error": f"skipped, would need ~{need:.0f} GiB (> {NAIVE_LIMIT / 2**30:.0f} GiB)"}
                    nfile = None
                row = {"n": n, "causal": causal, "geomon": g, "naive": v}
                for name, res in (("geomon", g), ("naive", v)):
                    if "error" in res:
                        notes.append(f"{tag} {name}: {res['error']}")
                    elif res["slack_mib"] > 8:
                        notes.append(
                            f"{tag} {name}: baseline high-water mark {res['slack_mib']:.0f} MiB above the RSS; "
                            "the peak may be under-reported by up to that much"
                        )
                if "error" not in g:
                    per_call_s[(n, causal)] = g["ms"] / 1e3
                    if nfile is None or "error" not in v:
                        d_h, d_m, where = _compare(gfile, nfile, n, causal)
                        row.update(d_entropy=d_h, d_logit=d_m)
                        print(f"check {tag}: max |ΔH| = {d_h:.2e}, max |Δmax_logit| = {d_m:.2e}{where}", flush=True)
                        if where:
                            notes.append(f"{tag}: geomon checked against the naive formula{where}")
                        if not (d_h <= TOLERANCE and d_m <= TOLERANCE):
                            failed = True
                gms, vms = g.get("ms"), v.get("ms")
                print(f"  {tag}: geomon {_fmt(gms)} ms, naive {_fmt(vms)} ms", flush=True)
                rows.append(row)
    elapsed = time.perf_counter() - start
    table = _table(rows)
    print()
    print("\n".join(table))
    for note in notes:
        print(f"note: {note}")
    if failed:
        print(f"FAILED: geomon and naive disagree by more than {TOLERANCE}; results not written", file=sys.stderr)
        return 1
    threads = {r[m]["threads"] for r in rows for m in ("geomon", "naive") if "threads" in r[m]}
    header = [
        "# attention_entropy on CPU: geomon (chunked online softmax) vs naive (materialised N x N)",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; torch.get_num_threads() = "
        f"{', '.join(map(str, sorted(threads))) or torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{shlex.join([sys.executable, *sys.argv])}`",
        f"- load average (1, 5, 15 min) at start: {load_start}; at end: {loadavg()}; total run {elapsed:.0f} s",
        f"- shapes: q, k [B, H, N, Dh] = [{B}, {H}, N, {DH}], float32, torch.randn (seed {SEED}); "
        f"torch.set_num_threads({THREADS})",
        "- time: median of `reps` calls after one warm-up call (ms); peak: increase of ru_maxrss during the "
        "warm-up call, in a fresh subprocess per measurement (MiB); naive S: B·H·N·N·4 bytes of one score matrix; "
        "ratios are geomon / naive; geomon chunk: its default keys per chunk x number of chunks; "
        "ΔH, Δmax_logit: geomon vs naive outputs of the measured calls",
        "",
    ]
    text = "\n".join([*header, *table, "", *(f"- {note}" for note in notes)]).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: N = 256, 512 and 2 repetitions")
    parser.add_argument("--out", help="markdown output (default: benchmarks/results/cpu-attention-entropy-DATE.md)")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds; N = 8192 runs only if it fits")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "MODE"), help="worker: geomon|naive N causal|full")
    parser.add_argument("--reps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, n, mode = args.one
        if method not in ("geomon", "naive") or mode not in ("causal", "full"):
            parser.error("--one takes METHOD in {geomon, naive}, N, MODE in {causal, full}")
        _worker(method, int(n), mode == "causal", args.reps, args.save)
        return 0
    return _drive(args)


if __name__ == "__main__":
    sys.exit(main())
