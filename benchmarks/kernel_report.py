"""Static kernel report: every Triton kernel variant compiled for sm_90a and sm_80, no GPU needed.

    make kernel-report                                    # = python benchmarks/kernel_report.py
    python benchmarks/kernel_report.py --markdown out.md  # also write the table as markdown
    python benchmarks/kernel_report.py --only attention   # variants whose "kernel: name" contains the text

For each ``variants()`` entry of each module in ``geomon/kernels``: registers, spills (stack frame bytes and
STL/LDL instructions), shared memory, the SASS instructions of the hot loops (found as ``geomon.kernels._sass``
describes: innermost backward-branch regions whose target dominates the branch, barrier spin-waits left out), thread
instructions per unit of work, and a prediction against the floor. Cubins are cached under
``~/.cache/geomon/kernel-report`` (``GEOMON_KERNEL_CACHE``), keyed by the kernel source hash.

Cost model (H100 SXM; an H200 has the same SMs and clocks, faster HBM), per SM and per clock, all pipes assumed to
overlap perfectly (so the prediction is the slowest pipe, an optimistic bound):

- issue: 4 schedulers (SMSPs) x 1 warp-instruction per clock; a loop of ``I`` SASS instructions run by ``W`` warps
  costs ``I x W / 4`` clocks per trip;
- MUFU (``ex2``): 16 results per SM per clock (4 per SMSP; the CUDA programming guide's throughput table gives
  FP32:SFU = 128:16 per SM per clock for compute capability 8.x/9.0);
- tensor cores: 989.4 TFLOP/s dense bf16/fp16 = 132 SMs x 1.83 GHz x 4096 FLOP/clock; tf32 half that;
- 132 SMs at 1.83 GHz (the H100 SXM boost clock under tensor-core load; 1.98 GHz is the clock quoted for other
  work), HBM 3.35 TB/s.
Figures: NVIDIA's H100 datasheet and whitepaper, as collected at glennklockwood.com/garden/processors/h100 (132 SMs,
1.83/1.98 GHz, 989.4 TFLOP/s bf16 dense, 494.7 tf32 dense, 3.35 TB/s), and the per-SM tensor rate worked out on
forums.developer.nvidia.com/t/244727 (4096 FLOP per SM per clock).

sm_80 code is costed on the same H100 model (an A100 has half the tensor rate and 108 SMs at 1.41 GHz): its rows
compare instruction counts across targets, not A100 times.

The floor of a score is ``max(tensor clocks of its 2·Dh FLOPs, 1/16 clock for its one exp2)``; memory is left out
of both (K tiles are re-read from L2; Q and K from HBM once, under 1% of the floor at N = 4096). The fraction of the
SDPA flash forward compares with ``4·N²·Dh`` FLOPs (half with causal) at the efficiency SDPA's flash backend reached
on an H200 in ``benchmarks/results/h200-kernels-2026-12-04.md`` (B·H = 32, N = 8192): Dh 64: 30.7% non-causal,
27.8% causal; Dh 128: 35.9% and 32.3%.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run the kernel report without TRITON_INTERPRET=1: it compiles for the GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geomon.kernels import _sass
from geomon.kernels._variants import Variant

SMS = 132
CLOCK_HZ = 1.83e9
ISSUE_PER_CLOCK = 4  # warp-instructions per SM per clock (one per SMSP)
EXP2_PER_CLOCK = 16  # MUFU ex2 results per SM per clock
TENSOR_FLOP_PER_CLOCK = {"bf16": 4096.0, "fp16": 4096.0, "tf32": 2048.0}
DOT_PASSES = {"tf32": 3}  # fp32 inputs: three tf32 products (hi·hi + hi·lo + lo·hi)
HBM_BYTES_PER_S = 3.35e12
FLASH_EFFICIENCY = {(64, False): 0.307, (64, True): 0.278, (128, False): 0.359, (128, True): 0.323}


@dataclass(frozen=True)
class Row:
    variant: Variant
    arch: int
    stats: _sass.KernelStats
    loop_sass: float
    per_unit: float
    predicted_clocks: float  # per unit, per SM
    floor_clocks: float  # per unit, per SM
    flash_clocks: float | None  # per unit (score), per SM

    @property
    def fraction_of_floor(self) -> float:
        return self.floor_clocks / self.predicted_clocks

    @property
    def fraction_of_flash(self) -> float | None:
        return None if self.flash_clocks is None else self.predicted_clocks / self.flash_clocks


def all_variants(errors: list[str] | None = None) -> list[Variant]:
    """Every kernel module's ``variants()``; a module whose ``variants()`` raises is named in ``errors`` (if given,
    else the error propagates) and skipped."""
    import geomon.kernels as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"geomon.kernels.{info.name}")
            found.extend(module.variants() if hasattr(module, "variants") else [])
        except Exception as error:
            if errors is None:
                raise
            errors.append(f"geomon.kernels.{info.name}: {type(error).__name__}: {error}")
    return found


def _head_dim(variant: Variant) -> int | None:
    return variant.constexprs.get("BLOCK_D")


def predict(variant: Variant, loop_sass: float) -> tuple[float, float, float | None]:
    """``(predicted, floor, flash)`` clocks per unit of work per SM (flash: for attention variants only)."""
    units = variant.work_per_iteration
    issue = loop_sass * variant.num_warps / ISSUE_PER_CLOCK / units
    exp2 = variant.exp2_per_iteration / EXP2_PER_CLOCK / units
    tensor = 0.0
    if variant.dot_type:
        passes = DOT_PASSES.get(variant.dot_type, 1)
        tensor = passes * variant.flops_per_iteration / TENSOR_FLOP_PER_CLOCK[variant.dot_type] / units
    floor_exp2 = (1.0 / EXP2_PER_CLOCK) if variant.exp2_per_iteration else 0.0
    floor_tensor = tensor / DOT_PASSES.get(variant.dot_type, 1) if variant.dot_type else 0.0
    floor = max(floor_exp2, floor_tensor)
    if not floor:  # neither dots nor exp2: a streaming kernel, whose floor is its bytes at HBM bandwidth
        floor = variant.bytes_per_iteration / units / (HBM_BYTES_PER_S / SMS / CLOCK_HZ)
    flash = None
    head_dim = _head_dim(variant)
    if variant.kernel == "attention_entropy" and head_dim is not None:
        causal = bool(variant.constexprs.get("IS_CAUSAL"))
        efficiency = FLASH_EFFICIENCY.get((head_dim, causal))
        if efficiency is not None:  # flash does 4·Dh FLOPs per (allowed) score: QKᵀ and PV
            flash = 4 * head_dim / (efficiency * TENSOR_FLOP_PER_CLOCK["bf16"])
    return max(issue, exp2, tensor, floor), floor, flash


def analyse(variant: Variant, arch: int, scratch: Path) -> Row:
    cubin, shared = _sass.compile_variant(variant, arch)
    stats = _sass.inspect_cubin(cubin, shared, scratch)
    loop_sass = _sass.loop_instructions(variant, stats)
    predicted, floor, flash = predict(variant, loop_sass)
    return Row(
        variant, arch, stats, loop_sass, _sass.instructions_per_unit(variant, loop_sass), predicted, floor, flash
    )


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


HEADER = (
    "| kernel | variant | arch | tiles / warps / stages | registers | spills (frame B, STL, LDL) | smem KiB | "
    "hot loops (SASS instr) | instr / unit | predicted / flash fwd | floor / predicted |"
)


def markdown_row(row: Row) -> str:
    v, s = row.variant, row.stats
    tiles = "x".join(str(v.constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_D") if k in v.constexprs)
    loops = ", ".join(str(len(loop)) for loop in s.loops)
    if v.loop_shares:
        loops += " (shares " + ", ".join(f"{x:.2f}" for x in v.loop_shares) + f" at {v.reference})"
    return (
        f"| {v.kernel} | {v.name} | {_sass.ARCHS[row.arch]} | {tiles} / {v.num_warps} / {v.num_stages} | "
        f"{s.registers} | {s.frame_bytes}, {s.spill_stores}, {s.spill_loads} | {s.shared_bytes / 1024:.0f} | {loops} | "
        f"{row.per_unit:.2f} per {v.unit} | {_fmt(row.fraction_of_flash)} | {row.fraction_of_floor:.0%} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--only", default="", help="variants whose 'kernel: name' contains this text")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(_sass.ARCHS))
    args = parser.parse_args(argv)
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    print(lines[0])
    print(lines[1])
    failures = []
    with tempfile.TemporaryDirectory() as scratch:
        for variant in all_variants(failures):
            if args.only not in f"{variant.kernel}: {variant.name}":
                continue
            for arch in args.arch:
                row = analyse(variant, arch, Path(scratch))
                lines.append(markdown_row(row))
                print(lines[-1], flush=True)
                failures += [
                    f"{variant.kernel} {variant.name} {_sass.ARCHS[arch]}: over budget: {m}" for m in over_budget(row)
                ]
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {args.markdown}")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


def over_budget(row: Row) -> list[str]:
    """The budget entries of the row's variant that the compiled code exceeds."""
    budget, s = row.variant.budget, row.stats  # spills on every target, instructions on sm_90a
    out = []
    spills = s.frame_bytes + s.spill_stores + s.spill_loads
    if "spills" in budget and spills > budget["spills"]:
        out.append(f"spills: frame {s.frame_bytes} B, {s.spill_stores} STL, {s.spill_loads} LDL")
    instructions = budget.get("instructions_per_unit")
    if instructions is not None and row.arch == _sass.BUDGET_ARCH and row.per_unit > instructions:
        out.append(f"{row.per_unit:.2f} instructions per {row.variant.unit} > {budget['instructions_per_unit']}")
    return out


if __name__ == "__main__":
    sys.exit(main())
