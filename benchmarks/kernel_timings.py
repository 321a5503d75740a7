"""GPU benchmarks of geomon's Triton kernels, measured side by side in one run, with a markdown results file.

    python benchmarks/kernel_timings.py                  # on a CUDA machine: the full grid, results/<device>-<date>.md
    TRITON_INTERPRET=1 python benchmarks/kernel_timings.py --smoke   # tiny shapes on the CPU: checks the script runs

1. Attention entropy + max logit (bf16, causal and not, Dh = 64 and 128, N = 1k..32k, B·H = 32..128): the fused
   kernel vs the torch chunked path vs the naive materialised softmax vs the attention forward of the same Q/K/V
   through SDPA's flash backend; time, peak memory, and the kernel's share of its tensor-core/exp floor; plus query
   subsampling to 256 rows per head.
2. Masks and key ranges (bf16, Dh = 64, N = 8192, B·H = 32): key padding read per key against the same mask
   written out per query (read per score) and the torch path; a flash-style call (causal + key padding, 256 sampled
   queries); packed sequences of 512 tokens against the same sequences as a batch and the torch path; a 1024-key
   sliding window; Bloom-style ALiBi (a per-key bias) beside a causal additive ``[1, 1, N, N]`` mask, read in place
   (the torch path before); each beside the attention forward the model would run (SDPA with the mask; flash on the
   sequences as a batch; SDPA with mask + ALiBi summed, as Bloom's eager attention forms them).
3. Class statistics (C = 1k and 50k, D = 768 and 4096, uniform and Zipf labels): the sort + segmented kernel vs
   ``index_add_`` (fp32 and fp64) and the memory-bandwidth floor.
4. Classifier argmax / nearest class centre without the N x C matrix vs a materialised matmul + argmax.
Times are medians from ``triton.testing.do_bench`` on CUDA (``time.perf_counter`` on the CPU).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from geomon.capture._patterns import AlignedRule, ModuleMasks
from geomon.functional import attention_entropy
from geomon.functional._class_tiles import tiled_argmax

# Dense bf16 tensor-core FLOP/s, exp2 (MUFU) op/s and HBM bytes/s of the GPUs we quote floors for. MUFU: 16 ex2
# results per SM per clock (4 per SM sub-partition; the CUDA guide's throughput table: FP32 128 vs 16 per SM per
# clock on 8.x/9.0) at the clock the tensor rates are quoted for (H100 SXM / H200: 1.83 GHz, PCIe: 1.62 GHz).
# (It used to count 4 x 16 per SM per clock, 4x too many, which made the exp2 floor 4x too short.)
PEAKS = {
    "H100 80GB HBM3": (989e12, 132 * 16 * 1.83e9, 3.35e12),
    "H100 PCIe": (756e12, 114 * 16 * 1.62e9, 2.0e12),
    "H200": (989e12, 132 * 16 * 1.83e9, 4.8e12),
}


def _peaks(name: str) -> tuple[float, float, float] | None:
    return next((value for key, value in PEAKS.items() if key in name), None)


def _time_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=max(20, reps * 5), return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _peak_mib(fn: Callable[[], object], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(fn: Callable[[], object], device: str, reps: int) -> tuple[str, str]:
    try:
        ms = _time_ms(fn, device, reps)
        mib = _peak_mib(fn, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", "OOM"
    return f"{ms:.3f}", "-" if mib is None else f"{mib:.0f}"


def _naive(q, k, is_causal):
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if is_causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return -(F.softmax(s, -1) * F.log_softmax(s, -1)).nan_to_num().sum(-1), s.amax(-1)


def _flash(q, k, v, is_causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def bench_attention(device: str, smoke: bool, reps: int, peaks) -> list[str]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grid = [(4, 64, 32)] if smoke else [(bh, n, dh) for dh in (64, 128) for n, bh in _attention_sizes()]
    lines = [
        "| B·H | N | Dh | causal | fused ms | torch chunked ms | naive ms | SDPA flash ms | fused / flash | "
        "fused, 256 rows/head ms | subsampled / flash | fused MiB | chunked MiB | naive MiB | % of floor |",
        "|" + "---|" * 15,
    ]
    for bh, n, dh in grid:
        for is_causal in (False, True):
            q, k, v = [torch.randn(1, bh, n, dh, device=device, dtype=dtype) for _ in range(3)]
            index = torch.linspace(0, n - 1, min(256, n), device=device).long()
            entropy = partial(attention_entropy, q, k, is_causal=is_causal)
            fused = _measure(partial(entropy, backend="triton"), device, reps)
            chunked = _measure(partial(entropy, backend="torch"), device, reps)
            naive = _measure(partial(_naive, q, k, is_causal), device, reps)
            flash = ("-", "-") if device != "cuda" else _measure(partial(_flash, q, k, v, is_causal), device, reps)
            sub = _measure(partial(entropy, query_index=index, backend="triton"), device, reps)
            floor = "-"
            if peaks is not None and fused[0] != "OOM":
                pairs = bh * n * n * (0.5 if is_causal else 1.0)
                floor_ms = max(2 * pairs * dh / peaks[0], pairs / peaks[1]) * 1e3
                floor = f"{100 * floor_ms / float(fused[0]):.0f}%"
            lines.append(
                f"| {bh} | {n} | {dh} | {is_causal} | {fused[0]} | {chunked[0]} | {naive[0]} | {flash[0]} | "
                f"{_ratio(fused[0], flash[0])} | {sub[0]} | {_ratio(sub[0], flash[0])} | {fused[1]} | "
                f"{chunked[1]} | {naive[1]} | {floor} |"
            )
            print(lines[-1], flush=True)
            del q, k, v
    return lines


def bench_attention_rules(device: str, smoke: bool, reps: int) -> list[str]:
    """The fused kernel on masks and per-row key ranges, beside what it replaced and the model's own forward."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, h, n, dh, run = (1, 2, 64, 16, 16) if smoke else (2, 16, 8192, 64, 512)
    q, k, v = [torch.randn(b, h, n, dh, device=device, dtype=dtype) for _ in range(3)]
    keys = torch.ones(b, 1, 1, n, dtype=torch.bool, device=device)
    keys[:, ..., 3 * n // 4 :] = False  # a quarter of the keys padded (right padding)
    per_query = keys.expand(b, 1, n, n).contiguous()  # the same mask with a row per query: read per score
    index = torch.linspace(0, n - 1, min(256, n), device=device).long()
    packed = AlignedRule(n, n, True, None, torch.arange(n, device=device) // run)
    window = AlignedRule(n, n, True, n // 8, None)
    causal_additive = torch.zeros(1, 1, n, n, dtype=dtype, device=device)
    causal_additive.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), torch.finfo(dtype).min)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)], device=device)
    alibi = (slopes[:, None] * torch.arange(n, device=device)).to(dtype).view(1, h, 1, n)
    alibi_rule = ModuleMasks([alibi], n)
    as_batch = [x.reshape(b, h, n // run, run, dh).transpose(1, 2).reshape(b * n // run, h, run, dh) for x in (q, k, v)]

    def fused(*args, **kwargs):
        return partial(attention_entropy, *args, backend="triton", **kwargs)

    def chunked(*args, **kwargs):
        return partial(attention_entropy, *args, backend="torch", **kwargs)

    sdpa = partial(F.scaled_dot_product_attention, q, k, v)
    cases = [  # (case, fused, the way it was read before, torch chunked, forward reference, reference name)
        ("no mask", fused(q, k), None, chunked(q, k), _flash_call(q, k, v, False, device), "SDPA flash"),
        ("key padding [B, 1, 1, N]", fused(q, k, attn_mask=keys), fused(q, k, attn_mask=per_query),
         chunked(q, k, attn_mask=keys), partial(sdpa, attn_mask=keys), "SDPA, mask"),
        ("causal + key padding, 256 queries", fused(q, k, _pattern=AlignedRule(n, n, True, None, None),
         attn_mask=keys, query_index=index), None, chunked(q, k, _pattern=AlignedRule(n, n, True, None, None),
         attn_mask=keys, query_index=index), partial(sdpa, attn_mask=keys & per_query.tril()), "SDPA, mask"),
        (f"packed sequences of {run}, causal", fused(q, k, _pattern=packed), fused(*as_batch[:2], is_causal=True),
         chunked(q, k, _pattern=packed), _flash_call(*as_batch, True, device), "SDPA flash, as a batch"),
        (f"causal window {n // 8}", fused(q, k, _pattern=window), fused(q, k, is_causal=True),
         chunked(q, k, _pattern=window), _flash_call(q, k, v, True, device), "SDPA flash, causal"),
        ("ALiBi + causal additive mask (Bloom)", fused(q, k, attn_mask=causal_additive, _pattern=alibi_rule,
         _masked_at=-1e4), None, chunked(q, k, attn_mask=causal_additive, _pattern=alibi_rule, _masked_at=-1e4),
         partial(sdpa, attn_mask=causal_additive + alibi), "SDPA, mask + ALiBi"),
    ]  # fmt: skip
    lines = [
        f'B = {b}, H = {h}, N = {n}, Dh = {dh}, {str(dtype).removeprefix("torch.")}. "before": key padding written '
        "out per query (read per score); packed: the same sequences as a batch; window: the full causal row.",
        "",
        "| case | fused ms | before ms | torch chunked ms | forward ms (reference) | fused / forward | fused MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, fast, before, slow, forward, forward_name in cases:
        measured = _measure(fast, device, reps)
        before_ms = "-" if before is None else _measure(before, device, reps)[0]
        forward_ms = "-" if device != "cuda" else _measure(forward, device, reps)[0]
        lines.append(
            f"| {case} | {measured[0]} | {before_ms} | {_measure(slow, device, reps)[0]} | {forward_ms} "
            f"({forward_name}) | {_ratio(measured[0], forward_ms)} | {measured[1]} |"
        )
        print(lines[-1], flush=True)
    return lines


def _flash_call(q, k, v, is_causal, device):
    return partial(_flash, q, k, v, is_causal) if device == "cuda" else partial(F.scaled_dot_product_attention, q, k, v)


def _attention_sizes() -> list[tuple[int, int]]:
    return [(1024, 128), (2048, 128), (4096, 64), (8192, 32), (16384, 32), (32768, 32)]


def _ratio(a: str, b: str) -> str:
    try:
        return f"{float(a) / float(b):.3f}"
    except ValueError:
        return "-"


def _zipf(n: int, c: int, device: str) -> torch.Tensor:
    p = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True).to(device)


def bench_class_stats(device: str, smoke: bool, reps: int, peaks) -> list[str]:
    from geomon.kernels.class_stats import class_stats_triton

    sizes = [(64, 10, 16)] if smoke else [(8192, c, d) for c in (1000, 50257) for d in (768, 4096)]
    lines = [
        "| N | C | D | labels | kernel ms | index_add_ fp32 ms | index_add_ fp64 ms | kernel / index_add_ fp32 | "
        "% of bandwidth floor |",
        "|" + "---|" * 9,
    ]
    for n, c, d in sizes:
        for kind in ("uniform", "zipf"):
            labels = torch.randint(0, c, (n,), device=device) if kind == "uniform" else _zipf(n, c, device)
            x = torch.randn(n, d, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            kernel = _measure(partial(class_stats_triton, x, labels, c), device, reps)
            fp32 = _measure(partial(_index_add, x, labels, c, torch.float32), device, reps)
            fp64 = _measure(partial(_index_add, x, labels, c, torch.float64), device, reps)
            floor = "-"
            if peaks is not None and kernel[0] != "OOM":
                bytes_moved = n * d * x.element_size() + 8 * c * d + 24 * n
                floor = f"{100 * bytes_moved / peaks[2] * 1e3 / float(kernel[0]):.0f}%"
            lines.append(
                f"| {n} | {c} | {d} | {kind} | {kernel[0]} | {fp32[0]} | {fp64[0]} | "
                f"{_ratio(kernel[0], fp32[0])} | {floor} |"
            )
            print(lines[-1], flush=True)
    return lines


def _index_add(x, labels, c, dtype):
    """The torch way: per-class sums with index_add_ (atomics on CUDA), in the given accumulation dtype."""
    x = x.to(dtype)
    sums = torch.zeros(c, x.shape[1], dtype=dtype, device=x.device).index_add_(0, labels, x)
    sq = torch.zeros(c, dtype=dtype, device=x.device).index_add_(0, labels, (x * x).sum(1))
    return sums, sq, torch.bincount(labels, minlength=c)


def _materialised_argmax(x, w, offset):
    return (x @ w.T + offset).argmax(1)


def bench_argmax(device: str, smoke: bool, reps: int) -> list[str]:
    sizes = [(64, 70, 16)] if smoke else [(8192, c, d) for c in (1000, 50257) for d in (768, 4096)]
    lines = ["| N | C | D | fused ms | matmul + argmax ms | ratio | fused MiB | materialised MiB |", "|" + "---|" * 8]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for n, c, d in sizes:
        x, w = torch.randn(n, d, device=device, dtype=dtype), torch.randn(c, d, device=device, dtype=dtype)
        offset = torch.zeros(c, device=device)
        fused = _measure(partial(tiled_argmax, x, w, offset, backend="triton"), device, reps)
        naive = _measure(partial(_materialised_argmax, x, w, offset), device, reps)
        lines.append(
            f"| {n} | {c} | {d} | {fused[0]} | {naive[0]} | {_ratio(fused[0], naive[0])} | {fused[1]} | {naive[1]} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark geomon's Triton kernels")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script runs (CPU is fine)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("the full benchmark needs a CUDA GPU; use --smoke (with TRITON_INTERPRET=1) on the CPU")
    import triton

    peaks = _peaks(name) if device == "cuda" else None
    today = datetime.date.today().isoformat()
    header = [
        f"# geomon kernel benchmarks: {name}",
        "",
        f"- date: {today}; torch {torch.__version__}; triton {triton.__version__}; CUDA {torch.version.cuda}",
        f"- command: `python benchmarks/kernel_timings.py{' --smoke' if args.smoke else ''}`; times are medians in ms",
        f"- floors use {peaks} (bf16 FLOP/s, exp2/s, bytes/s)" if peaks else "- no peak figures for this device",
        "",
    ]
    sections = ["## Attention entropy + max logit", "", *bench_attention(device, args.smoke, args.reps, peaks)]
    sections += ["", "## Masks and key ranges", "", *bench_attention_rules(device, args.smoke, args.reps)]
    sections += ["", "## Class statistics", "", *bench_class_stats(device, args.smoke, args.reps, peaks)]
    sections += ["", "## Classifier argmax without the N x C matrix", "", *bench_argmax(device, args.smoke, args.reps)]
    slug = name.replace(" ", "-").replace("/", "-")
    out = args.out or Path(__file__).parent / "results" / f"{slug}-{today}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + sections) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
