"""Classifier decision and nearest class centre without the ``N x C`` score matrix (``nc4`` at vocabulary scale),
on the tensor cores, with the decisions of the float64 scores.

Math. ``argmax_c (h_i · w_c + b_c)`` per sample; the nearest class centre is the same search with ``w_c = 2 μ_c`` and
``b_c = -|μ_c|²`` (``|h - μ|² = |h|² - 2 h·μ + |μ|²``). Search: program ``m`` owns ``BLOCK_M`` samples and walks the
classes in tiles of ``BLOCK_C``, each tile a ``[BLOCK_M, BLOCK_C]`` product accumulated over ``D`` in fp32 on the
tensor cores (TF32 operands for fp32 features), keeping per sample the best score, its class and the second-best
score. Ties go to the lowest class index, as ``torch.argmax``: the first maximum within a tile, and a later tile must
be strictly better. A NaN score (features or rows with NaN or infinite entries) counts as ``-inf``: it never wins,
and a row with no other score gets class 0, as on the torch path. Exactness: a row whose best leads its second best
by more than twice the proven rounding bound of the fast score (``geomon.functional._class_tiles.score_error_bound``:
``~(2u + D·2^-23)·|x|·max|w|`` with ``u = 2^-10`` for TF32) has the exact argmax. The other rows - near ties, exact
ties, overflow or underflow - are searched again by a second kernel in float64 over the flagged rows only, packed
first by a stable sort on the flag (operands converted exactly, every score summed feature by feature in the same
order, so that equal class rows tie exactly): its programs return at once unless one of their rows is flagged, so
there is no host sync and no cost when nothing is close.

Cost. Search FLOPs ``2·N·C·D`` on TF32/bf16 tensor cores (the GEMM the materialised way does). Bytes: the ``N·D``
features once, the ``C·D`` rows once per sample tile (L2-resident in practice), ``16·N`` bytes out, plus
``score_error_bound``'s one pass over ``C·D`` and ``N·D`` for the norms. Memory ``O(N)`` where the materialised way
holds ``4·N·C`` bytes (8192 tokens x 50k classes = 1.6 GB). Re-check: ``2·C·D`` float64 FLOPs (scalar FMAs) per
flagged sample, in tiles of ``BLOCK_M``. How many rows are flagged depends on the margins: Gaussian ``x`` and ``w``
(C = 4096-8192, D = 256-768) leave 24-34% of rows within the TF32 bound (0.2-3% within the IEEE fp32 one) - then
the re-check, not the search, sets the cost; a trained character GPT (103 classes) leaves 3-5% of its tokens for the
classifier and 6-10% for the nearest centre (``benchmarks/recheck_share.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from geomon.functional._class_tiles import decided, score_error_bound
from geomon.kernels._variants import Variant


@triton.jit
def _tiled_argmax_kernel(
    X, W, OFFSET, BEST, BEST_INDEX, SECOND,
    stride_xn, stride_xd, stride_wc, stride_wd,
    n, n_classes, dim,
    UPCAST: tl.constexpr,
    ROUND_TO_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets
    row_ok = rows < n
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    second = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_M], tl.int32)
    for c_start in range(0, n_classes, BLOCK_C):
        tile = tl.arange(0, BLOCK_C)
        classes = (c_start + tile).to(tl.int64)
        class_ok = classes < n_classes
        scores = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for k_start in range(0, dim, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_ok = ks < dim
            x = tl.load(X + rows[:, None] * stride_xn + ks[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :])
            w = tl.load(
                W + classes[:, None] * stride_wc + ks[None, :] * stride_wd, mask=class_ok[:, None] & k_ok[None, :]
            )
            if UPCAST:  # the interpreter's bf16 products are wrong; bf16 x bf16 is exact in fp32
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if ROUND_TO_TF32:  # tests only: truncate the operands to TF32 as tensor cores may, in the interpreter
                x = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
                w = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            scores += tl.dot(x, tl.trans(w))  # TF32 for fp32 operands on sm_80+
        # classes past the end load offset -inf, so their scores are -inf (their rows load as zeros)
        scores += tl.load(OFFSET + classes, mask=class_ok, other=float("-inf"))[None, :]
        scores = tl.where(scores != scores, float("-inf"), scores)  # a NaN score (non-finite features) never wins
        tile_best = tl.max(scores, 1)
        tile_index = tl.argmax(scores, 1, tie_break_left=True)
        tile_second = tl.max(tl.where(tile[None, :] == tile_index[:, None], float("-inf"), scores), 1)
        better = tile_best > best
        second = tl.where(better, tl.maximum(best, tile_second), tl.maximum(second, tile_best))
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index + c_start, best_index)
    tl.store(BEST + rows, best, mask=row_ok)
    tl.store(SECOND + rows, second, mask=row_ok)
    tl.store(BEST_INDEX + rows, best_index.to(tl.int64), mask=row_ok)


@triton.jit
def _exact_argmax_kernel(
    X, W, OFFSET, REDO, ORDER, BEST_INDEX,
    stride_xn, stride_xd, stride_wc, stride_wd,
    n, n_classes, dim,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slots < n
    rows = tl.load(ORDER + slots, mask=row_ok, other=0).to(tl.int64)  # flagged rows first: packed into few tiles
    redo = tl.load(REDO + rows, mask=row_ok, other=0)
    if tl.max(redo, 0) == 0:  # nothing close in this tile: the fast decisions stand
        return
    best = tl.full([BLOCK_M], float("-inf"), tl.float64)
    best_index = tl.zeros([BLOCK_M], tl.int64)
    for c_start in range(0, n_classes, BLOCK_C):
        classes = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
        class_ok = classes < n_classes
        scores = tl.zeros([BLOCK_M, BLOCK_C], tl.float64)
        # one feature at a time, in order: every score is summed in the same order, so equal class rows score equal
        for k in range(0, dim):
            x = tl.load(X + rows * stride_xn + k * stride_xd, mask=row_ok, other=0.0).to(tl.float64)
            w = tl.load(W + classes * stride_wc + k * stride_wd, mask=class_ok, other=0.0).to(tl.float64)
            scores += x[:, None] * w[None, :]
        scores += tl.load(OFFSET + classes, mask=class_ok, other=float("-inf"))[None, :]
        scores = tl.where(scores != scores, float("-inf"), scores)
        tile_best = tl.max(scores, 1)
        tile_index = tl.argmax(scores, 1, tie_break_left=True).to(tl.int64) + c_start
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    tl.store(BEST_INDEX + rows, best_index, mask=row_ok & (redo != 0))


_SEARCH_TILES = {"BLOCK_M": 64, "BLOCK_C": 64}
_EXACT_TILES = {"BLOCK_M": 32, "BLOCK_C": 64}


def _operands(features: Tensor, rows: Tensor) -> str:
    """How the search's tensor-core dot rounds its operands (a key of ``OPERAND_ROUNDOFF``)."""
    if features.dtype == torch.float32:
        return "tf32"  # also covers the interpreter's exact fp32 dot and the test-only truncation
    return "exact" if rows.dtype == features.dtype else "bf16"  # rows rounded to bf16/fp16: within 2^-7


def fast_search_triton(
    features: Tensor, rows: Tensor, offset: Tensor, *, round_to_tf32: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``(best score, its class, second-best score)`` per sample from the tensor-core search (fp32 scores)."""
    n, dim = features.shape
    operand_rows = rows if rows.dtype == features.dtype else rows.to(features.dtype)
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=features.device)
    second = best.clone()
    best_index = torch.zeros(n, dtype=torch.int64, device=features.device)
    if n == 0 or rows.shape[0] == 0:
        return best, best_index, second
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and features.dtype == torch.bfloat16
    _tiled_argmax_kernel[(triton.cdiv(n, _SEARCH_TILES["BLOCK_M"]),)](
        features, operand_rows, offset.to(torch.float32).contiguous(), best, best_index, second,
        *features.stride(), *operand_rows.stride(),
        n, rows.shape[0], dim,
        UPCAST=upcast,
        ROUND_TO_TF32=round_to_tf32,
        BLOCK_K=_block_k(dim),
        **_SEARCH_TILES,
    )  # fmt: skip
    return best, best_index, second


def tiled_argmax_triton(features: Tensor, rows: Tensor, offset: Tensor, *, _round_to_tf32: bool = False) -> Tensor:
    """``argmax_c (features @ rows[c] + offset[c])`` per sample, ``[N]`` int64, ties to the lowest index: the
    decisions of the float64 scores of the given values. No host sync."""
    n, dim = features.shape
    if features.dtype != torch.float32 and rows.dtype != features.dtype:
        # rounding the rows to fp16/bf16 would leave the bound (fp16 subnormals, overflow): search both in fp32
        features = features.float()
    best, best_index, second = fast_search_triton(features, rows, offset, round_to_tf32=_round_to_tf32)
    if n == 0 or rows.shape[0] == 0:
        return best_index
    bound = score_error_bound(features, rows, offset, _operands(features, rows))
    redo = ~decided(best, second, bound)
    order = torch.argsort(redo.to(torch.int8), descending=True, stable=True)  # flagged rows first, no host sync
    _exact_argmax_kernel[(triton.cdiv(n, _EXACT_TILES["BLOCK_M"]),)](
        features, rows, offset.to(torch.float64).contiguous(), redo.to(torch.int8), order, best_index,
        *features.stride(), *rows.stride(),
        n, rows.shape[0], dim,
        **_EXACT_TILES,
    )  # fmt: skip
    return best_index


def _block_k(dim: int) -> int:
    return min(64, max(16, triton.next_power_of_2(dim)))


_TRITON_TYPES = {torch.float32: ("fp32", "tf32"), torch.float16: ("fp16", "fp16"), torch.bfloat16: ("bf16", "bf16")}
#: The feature width the per-score counts refer to (GPT-2's): one trip of the main (feature) loop covers
#: ``BLOCK_M x BLOCK_C`` scores times ``BLOCK_K / REFERENCE_DIM`` of their features.
REFERENCE_DIM = 768


def variants() -> list[Variant]:
    """What ``auto`` dispatches on a GPU: the tensor-core search per feature dtype (classifier rows in the same
    dtype, contiguous), and the float64 re-check. Unit: one sample-class score at ``D = 768``."""
    common = {"stride_xn": "i32", "stride_wc": "i32", "n": "i32", "n_classes": "i32", "dim": "i32"}
    aligned = ("stride_xn", "stride_wc", "dim")
    out = []
    for dtype, (name, dot) in _TRITON_TYPES.items():
        tiles = {**_SEARCH_TILES, "BLOCK_K": 64}
        products = tiles["BLOCK_M"] * tiles["BLOCK_C"] * tiles["BLOCK_K"]
        pointers = {"X": f"*{name}", "W": f"*{name}", "OFFSET": "*fp32", "BEST": "*fp32", "BEST_INDEX": "*i64"}
        out.append(
            Variant(
                kernel="class_argmax",
                name=f"{name} search",
                fn=_tiled_argmax_kernel,
                signature={**pointers, "SECOND": "*fp32", **common},
                constexprs={"stride_xd": 1, "stride_wd": 1, "UPCAST": False, "ROUND_TO_TF32": False, **tiles},
                num_warps=4,
                num_stages=3,
                work_per_iteration=products / REFERENCE_DIM,
                unit="score",
                budget={"spills": 0},
                flops_per_iteration=2.0 * products,
                bytes_per_iteration=float((tiles["BLOCK_M"] + tiles["BLOCK_C"]) * tiles["BLOCK_K"] * dtype.itemsize),
                divisible_by_16=aligned,
                reference=f"D = {REFERENCE_DIM}",
                dot_type=dot,
            )
        )
    products = _EXACT_TILES["BLOCK_M"] * _EXACT_TILES["BLOCK_C"]  # one feature per trip
    out.append(
        Variant(
            kernel="class_argmax",
            name="fp32 float64 re-check",
            fn=_exact_argmax_kernel,
            signature={
                "X": "*fp32",
                "W": "*fp32",
                "OFFSET": "*fp64",
                "REDO": "*i8",
                "ORDER": "*i64",
                "BEST_INDEX": "*i64",
                **common,
            },
            constexprs={"stride_xd": 1, "stride_wd": 1, **_EXACT_TILES},
            num_warps=4,
            num_stages=3,
            work_per_iteration=products / REFERENCE_DIM,
            unit="score",
            budget={"spills": 0},
            flops_per_iteration=2.0 * products,
            bytes_per_iteration=float((_EXACT_TILES["BLOCK_M"] + _EXACT_TILES["BLOCK_C"]) * 4),
            divisible_by_16=aligned,
            reference=f"D = {REFERENCE_DIM}",
        )
    )
    return out
