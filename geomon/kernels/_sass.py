"""Compile a :class:`~geomon.kernels._variants.Variant` for a GPU target on a machine without a GPU, and read its SASS.

``compile_variant(variant, arch)`` runs ``triton.compile`` for ``sm_90a`` (``arch=90``) or ``sm_80`` and caches the
cubin on disk, keyed by a hash of the kernel's source (Triton's ``cache_key``, which covers the functions it calls),
the signature, the constexprs, the launch options, the target and the Triton version; ``inspect_cubin`` reads
registers and the stack frame that spills go to (``cuobjdump -res-usage``: ``STACK`` + ``LOCAL``; ptxas reports
spills in ``STACK``) and the SASS (``nvdisasm``).

How the main loop is found. ``nvdisasm -c`` prints one instruction per line with its byte address and the branch
targets as labels. Every branch whose target lies at or before the branch itself, and whose target dominates it
(no path from the kernel's entry reaches the branch without passing the target), closes a loop: the instructions
from the target to the branch, inclusive. Out-of-line code that jumps back (ptxas's fallback for divergent warps,
placed after the kernel's main code and reached through ``BRA.DIV``) fails the dominance test. Loops whose body
waits on a barrier (``SYNCS``...``TRYWAIT``, the spin-wait ptxas emits around an ``mbarrier``) are waits, and the
lone ``BRA`` to itself after ``EXIT`` is a trap; both are dropped. Of the rest, the innermost ones (those that
contain no other loop) are the hot loops, in code order. Their instruction count, times 32 lanes and ``num_warps``,
divided by the units of work one trip does, is the thread instructions per unit the budgets bound (a variant's
``loop_shares`` weight several hot loops, e.g. the unmasked and the masked key loop of the entropy kernel).

Compiling must happen in a process where ``TRITON_INTERPRET`` is not set (the interpreter replaces ``triton.jit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from geomon.kernels._variants import Variant

ARCHS = {90: "sm_90a", 80: "sm_80"}
#: The target the instruction budgets hold for (H100/H200); spill budgets hold on every target. On sm_80 the
#: tensor-core instructions themselves (``mma.sync`` plus ``ldmatrix``, ~3 per score at Dh 128) scale with the head
#: dimension, so the same budget would measure the instruction set rather than the kernel.
BUDGET_ARCH = 90
_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_TARGET = re.compile(r"`\((\.L\w+)\)")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


class TritonNvidiaMissing(RuntimeError):
    """Triton's NVIDIA backend (ptxas, cuobjdump, nvdisasm) is not installed here."""


@dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # e.g. "@!P1 BRA `(.L_x_0)"

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")


@dataclass(frozen=True)
class Loop:
    start: int  # byte address of the first instruction (the branch target)
    end: int  # byte address of the backward branch
    instructions: tuple[Instruction, ...]

    def __len__(self) -> int:
        return len(self.instructions)

    def count(self, opcode_prefix: str) -> int:
        return sum(1 for ins in self.instructions if ins.opcode.startswith(opcode_prefix))


@dataclass(frozen=True)
class KernelStats:
    registers: int
    frame_bytes: int  # per-thread stack frame plus local memory (-res-usage STACK + LOCAL): where spills live
    spill_stores: int  # STL instructions in the SASS
    spill_loads: int  # LDL instructions in the SASS
    shared_bytes: int  # dynamic shared memory the launch requests (Triton's metadata) plus static
    loops: tuple[Loop, ...]  # the hot loops, in code order


def tool(name: str) -> Path:
    """Path of a CUDA binary tool that Triton's NVIDIA backend ships (``cuobjdump``, ``nvdisasm``)."""
    try:
        import triton.backends.nvidia as nvidia
    except ImportError as error:  # pragma: no cover - depends on the install
        raise TritonNvidiaMissing(f"triton's nvidia backend is not importable: {error}") from error
    path = Path(nvidia.__file__).parent / "bin" / name
    if not path.exists():
        raise TritonNvidiaMissing(f"{name} is not shipped with triton here ({path})")
    return path


def parse_sass(text: str) -> list[Instruction]:
    """Instructions of ``nvdisasm -c`` output, with each label ``.L_x_N`` resolved to an ``Instruction`` address."""
    instructions = []
    for line in text.splitlines():
        match = _INSTRUCTION.search(line)
        if match:
            instructions.append(Instruction(int(match.group(1), 16), match.group(2).strip()))
    return instructions


def label_addresses(text: str) -> dict[str, int]:
    """Each label's address: that of the first instruction after it."""
    addresses: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.search(line)
        if match:
            for name in pending:
                addresses[name] = int(match.group(1), 16)
            pending = []
    return addresses


def _successors(instructions: list[Instruction], labels: dict[str, int]) -> list[list[int]]:
    """Indices each instruction may pass control to: the next one unless it is an unconditional ``BRA`` or
    ``EXIT``, and its branch target."""
    index_of = {ins.address: i for i, ins in enumerate(instructions)}
    successors = []
    for i, ins in enumerate(instructions):
        after = []
        unconditional = not ins.text.startswith("@") and ins.opcode in ("BRA", "EXIT", "RET", "JMP")
        if "," in ins.text.split("`")[0]:  # BRA.DIV ~URZ, ... / BRA.U !UP0, ...: a condition operand
            unconditional = False
        if not unconditional and i + 1 < len(instructions):
            after.append(i + 1)
        target = _TARGET.search(ins.text)
        if target and labels.get(target.group(1)) in index_of:
            after.append(index_of[labels[target.group(1)]])
        successors.append(after)
    return successors


def _reachable_avoiding(successors: list[list[int]], avoid: int) -> set[int]:
    seen, stack = {0}, [0]
    while stack:
        for nxt in successors[stack.pop()]:
            if nxt != avoid and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def find_loops(text: str) -> list[Loop]:
    """The innermost loops of ``nvdisasm -c`` output that are not barrier waits, in code order.

    A loop is a backward branch whose target dominates it (every path from the kernel's entry to the branch runs
    through the target); a backward jump from out-of-line code (the divergent-warp fallback ptxas places after
    the main code, reached from ``BRA.DIV`` before the loop) back into the code it left is not one."""
    instructions = parse_sass(text)
    labels = label_addresses(text)
    successors = _successors(instructions, labels)
    index_of = {ins.address: i for i, ins in enumerate(instructions)}
    regions = []
    for position, ins in enumerate(instructions):
        target = _TARGET.search(ins.text)
        start = labels.get(target.group(1)) if target and ins.opcode.startswith("BRA") else None
        if start is None or start > ins.address:
            continue
        body = tuple(i for i in instructions if start <= i.address <= ins.address)
        waits = any(i.opcode.startswith("SYNCS") and "TRYWAIT" in i.opcode for i in body)
        if len(body) == 1 or waits:  # a lone branch to itself is the trap ptxas puts after EXIT
            continue
        if position in _reachable_avoiding(successors, index_of[start]):
            continue  # entered around its head: not a loop
        regions.append(Loop(start, ins.address, body))
    innermost = [
        loop
        for loop in regions
        if not any(o is not loop and loop.start <= o.start and o.end <= loop.end for o in regions)
    ]
    return sorted(innermost, key=lambda loop: loop.start)


def _cache_dir() -> Path:
    root = os.environ.get("GEOMON_KERNEL_CACHE") or Path.home() / ".cache" / "geomon" / "kernel-report"
    return Path(root)


def _attrs(variant: Variant) -> dict:
    from triton.backends.nvidia.compiler import CUDABackend

    names = list(variant.signature)
    aligned = [n for n, t in variant.signature.items() if t.startswith("*")] + list(variant.divisible_by_16)
    indices = {
        name: variant.fn.arg_names.index(name) for name in aligned if name in names and name in variant.fn.arg_names
    }
    return {(i,): CUDABackend.parse_attr("D") for i in indices.values()}


def _cache_key(variant: Variant, arch: int) -> str:
    import triton

    key = json.dumps(
        [
            variant.fn.cache_key,
            sorted(variant.signature.items()),
            sorted((k, repr(v)) for k, v in variant.constexprs.items()),
            sorted(variant.divisible_by_16),
            variant.num_warps,
            variant.num_stages,
            arch,
            triton.__version__,
        ]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def compile_variant(variant: Variant, arch: int) -> tuple[bytes, int]:
    """``(cubin, dynamic shared bytes)`` of the variant for ``sm_90a`` (``arch=90``) or ``sm_80``, cached on disk."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile kernels in a process without TRITON_INTERPRET=1 (the interpreter replaces jit)")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    tool("nvdisasm")
    entry = _cache_dir() / _cache_key(variant, arch)
    if (entry / "kernel.cubin").exists() and (entry / "meta.json").exists():
        return (entry / "kernel.cubin").read_bytes(), json.loads((entry / "meta.json").read_text())["shared"]
    import triton
    from triton.backends.compiler import GPUTarget

    signature = dict(variant.signature)
    signature.update({name: "constexpr" for name in variant.constexprs})
    source = triton.compiler.ASTSource(
        fn=variant.fn, signature=signature, constexprs=dict(variant.constexprs), attrs=_attrs(variant)
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    cubin, shared = compiled.asm["cubin"], int(compiled.metadata.shared)
    entry.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"shared": shared, "variant": f"{variant.kernel}: {variant.name}"})
    for name, data in (("kernel.cubin", cubin), ("meta.json", meta.encode())):  # atomic: parallel test workers
        partial = entry / f"{name}.{os.getpid()}.tmp"
        partial.write_bytes(data)
        partial.replace(entry / name)
    return cubin, shared


def disassemble(cubin: bytes, scratch: Path) -> tuple[str, str]:
    """``(cuobjdump -res-usage output, nvdisasm -c output)`` of a cubin."""
    path = scratch / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
    sass = subprocess.run([tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True)
    return usage.stdout, sass.stdout


def inspect_cubin(cubin: bytes, dynamic_shared: int, scratch: Path) -> KernelStats:
    usage, sass = disassemble(cubin, scratch)
    match = _RES_USAGE.search(usage)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{usage}")
    registers, stack, static_shared, local = (int(g) for g in match.groups())
    instructions = parse_sass(sass)
    return KernelStats(
        registers=registers,
        frame_bytes=stack + local,
        spill_stores=sum(1 for i in instructions if i.opcode.startswith("STL")),
        spill_loads=sum(1 for i in instructions if i.opcode.startswith("LDL")),
        shared_bytes=dynamic_shared + static_shared,
        loops=tuple(find_loops(sass)),
    )


def loop_instructions(variant: Variant, stats: KernelStats) -> float:
    """SASS instructions of one main-loop trip: the hot loops weighted by ``variant.loop_shares`` (the largest if
    none are given)."""
    if not stats.loops:
        raise RuntimeError(f"{variant.kernel} {variant.name}: no loop found in the SASS")
    if not variant.loop_shares:
        return float(max(len(loop) for loop in stats.loops))
    if len(variant.loop_shares) != len(stats.loops):
        raise RuntimeError(
            f"{variant.kernel} {variant.name}: {len(stats.loops)} hot loops in the SASS, "
            f"{len(variant.loop_shares)} loop_shares given"
        )
    return sum(share * len(loop) for share, loop in zip(variant.loop_shares, stats.loops, strict=True))


def instructions_per_unit(variant: Variant, loop_sass: float) -> float:
    """Thread instructions per unit of work: loop SASS instructions x 32 lanes x warps / units per trip."""
    return loop_sass * 32 * variant.num_warps / variant.work_per_iteration


def summary(variant: Variant, arch: int, scratch: Path) -> dict:
    """What the budget tests and the report read of one compiled variant, as plain data."""
    cubin, shared = compile_variant(variant, arch)
    stats = inspect_cubin(cubin, shared, scratch)
    loop_sass = loop_instructions(variant, stats)
    return {
        "kernel": variant.kernel,
        "name": variant.name,
        "arch": arch,
        "registers": stats.registers,
        "frame_bytes": stats.frame_bytes,
        "spill_stores": stats.spill_stores,
        "spill_loads": stats.spill_loads,
        "shared_bytes": stats.shared_bytes,
        "loops": [len(loop) for loop in stats.loops],
        "loop_opcodes": [
            {op: sum(1 for i in loop.instructions if i.opcode.split(".")[0] == op) for op in ("FFMA", "MUFU", "BRA")}
            for loop in stats.loops
        ],
        "instructions_per_unit": instructions_per_unit(variant, loop_sass),
        "budget": dict(variant.budget),
    }


def main(argv: list[str]) -> None:
    """``python -m geomon.kernels._sass MODULE FUNCTION ARCH [NAME ...]``: JSON summaries of the variants that
    ``MODULE.FUNCTION()`` returns (those named, or all) for one target; run without ``TRITON_INTERPRET``."""
    import importlib
    import tempfile

    module, function, arch, *names = argv
    variants = getattr(importlib.import_module(module), function)()
    chosen = [v for v in variants if not names or v.name in names]
    if names and len(chosen) != len(set(names)):
        raise SystemExit(f"unknown variants {sorted(set(names) - {v.name for v in chosen})} in {module}.{function}")
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps([summary(v, int(arch), Path(scratch)) for v in chosen]))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
