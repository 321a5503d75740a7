"""What each kernel module can be dispatched as, described for static compilation (no GPU, no launch).

Every kernel module exposes ``variants() -> list[Variant]``: one entry per compiled specialisation that
``backend="auto"`` can dispatch on a GPU (dtype, head dim, causal or not, mask kind, ...). The static kernel report
(``benchmarks/kernel_report.py``) compiles each for sm_90a and sm_80 with ``triton.compile`` and reads registers,
spills, shared memory and the SASS of the main loop; ``tests/kernels/test_sass_budgets.py`` pins the budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of a Triton kernel.

    ``signature`` maps every non-constexpr argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``, ...); ``constexprs`` gives every ``tl.constexpr`` argument its value. ``work_per_iteration`` is how
    many units (``unit``: ``"score"`` for one query-key product, ``"element"`` for one input element) one trip
    through the main loop handles in one program; the report computes thread instructions per unit as
    ``loop SASS instructions x 32 lanes x num_warps / work_per_iteration``. ``budget`` maps a report column
    (``"spills"``, ``"instructions_per_unit"``) to the most that CI allows for this variant.
    """

    kernel: str  # module-qualified name, e.g. "attention_entropy"
    name: str  # e.g. "bf16 d64 causal"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    work_per_iteration: int
    unit: str = "score"
    budget: dict[str, float] = field(default_factory=dict)
    # Launch shape and byte/FLOP counts for the cost model, per main-loop iteration of one program.
    flops_per_iteration: float = 0.0
    bytes_per_iteration: float = 0.0
    exp2_per_iteration: float = 0.0
    # Integer arguments a real launch sees divisible by 16 (Triton specialises on it; pointers always are, as
    # torch allocates them 16-byte aligned), so that the compiled code vectorises as it does on a GPU.
    divisible_by_16: tuple[str, ...] = ()
    # Share of main-loop trips each hot loop (innermost SASS loop, in code order) takes at the shape named in
    # ``reference``; empty: the report charges every trip at the largest loop.
    loop_shares: tuple[float, ...] = ()
    reference: str = ""
    # Tensor-core operand type of the loop's dots ("bf16", "fp16", "tf32"; "" when the loop has none).
    dot_type: str = ""
