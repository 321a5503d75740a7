"""Static budgets of the Triton kernels, compiled for sm_90a / sm_80 on a machine without a GPU.

The tests run with ``TRITON_INTERPRET=1`` (tests/conftest.py), under which ``triton.jit`` interprets, so the
compilations run in a child process without it (``python -m geomon.kernels._sass``), one per target for all the
variants of a module. Cubins are cached on disk
(``~/.cache/geomon/kernel-report``, keyed by the kernel source), so a rerun reads them back.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from geomon.kernels import _sass
from geomon.kernels._variants import Variant

ROOT = Path(__file__).resolve().parents[2]


def _nvidia_backend_missing() -> str | None:
    try:
        _sass.tool("nvdisasm")
        _sass.tool("cuobjdump")
    except _sass.TritonNvidiaMissing as error:
        return str(error)
    return None


needs_nvidia = pytest.mark.skipif(
    _nvidia_backend_missing() is not None, reason=f"triton's nvidia backend is absent: {_nvidia_backend_missing()}"
)


@functools.cache
def _compiled(module: str, function: str, arch: int, names: tuple[str, ...]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "geomon.kernels._sass", module, function, str(arch), *names],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- loop finder
# A hand-written nvdisasm listing: a prologue, a barrier spin-wait, the main loop (7 instructions, .L_x_1 .. its
# backward BRA), an exit, the trap after EXIT, and out-of-line divergent-warp code, entered from the loop's BRA.DIV,
# that jumps back into the loop at .L_x_5 (which does not dominate that jump: the path through 0x70 avoids it).
LISTING = """
_toy:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   MOV R3, RZ ;
.L_x_0:
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*0040*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0050*/                   FFMA R5, R5, R6, R7 ;
        /*0060*/                   BRA.DIV ~URZ, `(.L_x_4) ;
        /*0070*/                   SHFL.BFLY PT, R5, R5, 0x1, 0x1f ;
.L_x_5:
        /*0080*/                   MUFU.EX2 R8, R5 ;
        /*0090*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00a0*/                   ISETP.GE.AND P1, PT, R2, R9, PT ;
        /*00b0*/              @!P1 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
.L_x_3:
        /*00d0*/                   BRA `(.L_x_3);
.L_x_4:
        /*00e0*/                   WARPSYNC.ALL ;
        /*00f0*/                   BRA `(.L_x_5) ;
"""


def test_loop_finder_on_a_listing_keeps_the_main_loop_only():
    loops = _sass.find_loops(LISTING)
    assert [(hex(loop.start), hex(loop.end), len(loop)) for loop in loops] == [("0x50", "0xb0", 7)]
    assert loops[0].count("FFMA") == 1 and loops[0].count("MUFU") == 1


def test_loop_finder_keeps_the_innermost_of_nested_loops():
    listing = """
        /*0000*/                   MOV R2, RZ ;
.L_x_0:
        /*0010*/                   MOV R3, RZ ;
.L_x_1:
        /*0020*/                   FFMA R5, R5, R6, R7 ;
        /*0030*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0040*/                   ISETP.GE.AND P1, PT, R3, R9, PT ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
        /*0060*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0070*/                   ISETP.GE.AND P2, PT, R2, R9, PT ;
        /*0080*/              @!P2 BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
"""
    assert [(hex(loop.start), len(loop)) for loop in _sass.find_loops(listing)] == [("0x20", 4)]


def test_instructions_per_unit_is_loop_lanes_warps_over_work():
    variant = Variant(kernel="toy", name="t", fn=None, signature={}, constexprs={}, num_warps=8, num_stages=1,
                      work_per_iteration=128 * 128)  # fmt: skip
    assert _sass.instructions_per_unit(variant, 512) == 512 * 32 * 8 / (128 * 128)


@triton.jit
def _toy_chain(X, OUT, n, a, b, REPEATS: tl.constexpr):
    acc = tl.load(X)
    for _ in range(n):  # a run-time trip count: one SASS loop of REPEATS dependent FFMAs
        for _r in tl.static_range(REPEATS):
            acc = acc * a + b
    tl.store(OUT, acc)


def toy_variants() -> list[Variant]:
    signature = {"X": "*fp32", "OUT": "*fp32", "n": "i32", "a": "fp32", "b": "fp32"}
    return [
        Variant(
            kernel="toy",
            name=f"chain {r}",
            fn=_toy_chain,
            signature=signature,
            constexprs={"REPEATS": r},
            num_warps=1,
            num_stages=1,
            work_per_iteration=32 * r,
            unit="element",
        )
        for r in (24, 40)  # long enough that ptxas does not unroll the loop
    ]


@needs_nvidia
def test_loop_counter_on_a_compiled_toy_kernel():
    short, long = _compiled("tests.kernels.test_sass_budgets", "toy_variants", 90, ())
    for summary, repeats in ((short, 24), (long, 40)):
        assert len(summary["loops"]) == 1, summary
        assert summary["loop_opcodes"][0]["FFMA"] == repeats
        assert repeats + 2 <= summary["loops"][0] <= repeats + 4  # + counter, compare, branch
    assert long["loops"][0] - short["loops"][0] == 16
    assert short["spill_stores"] == short["spill_loads"] == short["frame_bytes"] == 0


# ------------------------------------------------------------------------------------------------ kernel budgets
def _by_name(summaries: list[dict]) -> dict[str, dict]:
    return {summary["name"]: summary for summary in summaries}


def _entropy_variants() -> list[Variant]:
    from geomon.kernels.attention_entropy import variants

    return variants()


ENTROPY = [v.name for v in _entropy_variants()]


def test_entropy_variants_cover_what_auto_dispatches():
    names = set(ENTROPY)
    for dtype in ("bf16",):
        for head_dim in (64, 128):
            for causal in ("non-causal", "causal"):
                assert f"{dtype} d{head_dim} {causal}" in names
    assert any(n.startswith("fp32") for n in names) and any("mask" in n for n in names)
    budgets = {v.name: v.budget for v in _entropy_variants()}
    assert budgets["bf16 d64 non-causal"]["instructions_per_unit"] == 12
    assert budgets["bf16 d128 causal"]["instructions_per_unit"] == 16
    assert all(b["spills"] == 0 for b in budgets.values())


@needs_nvidia
@pytest.mark.parametrize("arch", sorted(_sass.ARCHS))
@pytest.mark.parametrize("name", ENTROPY)
def test_attention_entropy_budgets(name, arch):
    summary = _by_name(_compiled("geomon.kernels.attention_entropy", "variants", arch, ()))[name]
    assert (summary["frame_bytes"], summary["spill_stores"], summary["spill_loads"]) == (0, 0, 0), summary
    budget = summary["budget"].get("instructions_per_unit")
    if budget is not None and arch == _sass.BUDGET_ARCH:
        assert summary["instructions_per_unit"] <= budget, summary
    if summary["budget"].get("instructions_per_unit") and arch == _sass.BUDGET_ARCH:
        # the unmasked loop does one exp2 per score (plus a handful per row): MUFU count = scores per thread + rows
        variant = next(v for v in _entropy_variants() if v.name == name)
        threads = 32 * variant.num_warps
        per_thread = variant.work_per_iteration // threads
        assert per_thread <= summary["loop_opcodes"][0]["MUFU"] <= per_thread + variant.constexprs["BLOCK_M"] // 16


def _kernel_modules() -> list[str]:
    """Every module of geomon.kernels with ``variants()`` (the entropy kernel's are also checked one by one above)."""
    import importlib
    import pkgutil

    import geomon.kernels as package

    names = [info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")]
    return [
        f"geomon.kernels.{name}"
        for name in names
        if hasattr(importlib.import_module(f"geomon.kernels.{name}"), "variants")
    ]


@needs_nvidia
@pytest.mark.parametrize("arch", sorted(_sass.ARCHS))
@pytest.mark.parametrize("module", _kernel_modules())
def test_every_kernel_variant_keeps_its_budget(module, arch):
    for summary in _compiled(module, "variants", arch, ()):
        assert (summary["frame_bytes"], summary["spill_stores"], summary["spill_loads"]) == (0, 0, 0), summary
        budget = summary["budget"].get("instructions_per_unit")
        if budget is not None and arch == _sass.BUDGET_ARCH:
            assert summary["instructions_per_unit"] <= budget, summary
