"""Per-class feature sums and squared-norm sums for neural collapse, added into the metric state in place.

Math. For labels ``y_i`` in ``[0, C)``: ``S_c += Σ_{y_i = c} h_i`` and ``q_c += Σ_{y_i = c} |h_i|²``. Rows are put in
label order by a stable sort (O(N) keys); each run of equal labels is one *segment* (at most ``min(N, C + 1)`` of
them, found without a host sync). Program ``(segment, d-block)`` sums its segment's rows (gathered through the
permutation, so the features are never copied) in fp64 and adds the total into ``S_c`` of the state: one read and
one write of each touched element, by exactly one program, in a fixed order - so the bits are the same on every run,
unlike ``index_add_``, whose atomics add in a racy order and pile up on the frequent classes of a Zipf-distributed
vocabulary. The squared norms leave one partial per ``(segment, d-block)`` (``N x D/BLOCK_D`` values, never ``C x D``),
summed in a fixed order and added to ``q_c``: each class receives one value. The promise is per input layout: Triton
specialises the kernel on strides divisible by 16, so a contiguous tensor and a strided view of the same values can
run different compiled variants whose fp64 sums differ in the last bits, ~1e-16 relative.

Cost. Bytes: the features once (``N·D`` elements in their dtype), the labels, permutation and segments (``~40·N``
bytes), and ``16·K·D`` bytes to read and write the state rows of the ``K <= min(N, C)`` classes present in the batch
(a class absent from the batch is not touched: no ``C x D`` temporary, no ``C x D`` pass). FLOPs: ``3·N·D``.
Labels outside ``[0, C)`` form a segment of their own that is left out (no out-of-bounds access, no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from geomon.kernels._variants import Variant


@triton.jit
def _class_sums_kernel(
    FEATURES, ORDER, SEG_START, SEG_COUNT, SEG_CLASS, SUMS, SQ_PARTS,
    stride_fn, stride_fd, stride_sc, stride_sd, dim, n_classes, n_dim_blocks,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    segment = tl.program_id(0)
    dim_block = tl.program_id(1)
    count = tl.load(SEG_COUNT + segment)
    cls = tl.load(SEG_CLASS + segment)
    if (count == 0) | (cls >= n_classes):  # an unused segment slot, or the invalid labels' segment
        return
    start = tl.load(SEG_START + segment)
    cols = dim_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    col_offsets = cols[None, :].to(tl.int64) * stride_fd
    total = tl.zeros([BLOCK_D], tl.float64)
    squares = tl.zeros([BLOCK_D], tl.float64)
    for offset in range(0, count, BLOCK_R):
        r = offset + tl.arange(0, BLOCK_R)
        r_ok = r < count
        rows = tl.load(ORDER + start + r, mask=r_ok, other=0)
        ptrs = FEATURES + rows[:, None].to(tl.int64) * stride_fn + col_offsets
        x = tl.load(ptrs, mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
        total += tl.sum(x, 0)
        squares += tl.sum(x * x, 0)
    state = SUMS + cls.to(tl.int64) * stride_sc + cols.to(tl.int64) * stride_sd
    tl.store(state, tl.load(state, mask=col_ok) + total, mask=col_ok)
    tl.store(SQ_PARTS + segment.to(tl.int64) * n_dim_blocks + dim_block, tl.sum(squares, 0))


def _label_segments(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(order, start, count, class)`` of the runs of equal labels in stable label order, ``N`` slots each (slots
    past the last run have count 0); invalid labels form the run of class ``num_classes``. No host sync."""
    n = labels.shape[0]
    keys = torch.where((labels >= 0) & (labels < num_classes), labels.long(), num_classes)
    sorted_keys, order = torch.sort(keys, stable=True)
    opens = torch.ones(n, dtype=torch.bool, device=labels.device)
    opens[1:] = sorted_keys[1:] != sorted_keys[:-1]
    segment = torch.cumsum(opens, 0) - 1
    count = torch.zeros(n, dtype=torch.int64, device=labels.device).index_add_(0, segment, torch.ones_like(segment))
    start = torch.cumsum(count, 0) - count
    cls = sorted_keys[start.clamp(max=n - 1)]  # gathered, not scattered: deterministic
    return order.to(torch.int32), start.to(torch.int32), count.to(torch.int32), cls.to(torch.int32)


def add_class_sums_triton(
    feature_sum: Tensor, sq_norm_sum: Tensor, features: Tensor, labels: Tensor, *, block_r: int = 32, block_d: int = 128
) -> None:
    """``feature_sum [C, D] += Σ_{y=c} h`` and ``sq_norm_sum [C] += Σ_{y=c} |h|²`` in place (float64 states);
    labels outside ``[0, C)`` are left out. No host sync, no ``C x D`` temporary."""
    n, dim = features.shape
    num_classes = feature_sum.shape[0]
    if feature_sum.dtype != torch.float64 or sq_norm_sum.dtype != torch.float64:
        raise ValueError("the class-sum states must be float64")
    if n == 0 or dim == 0:
        return
    order, start, count, cls = _label_segments(labels, num_classes)
    block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    n_dim_blocks = triton.cdiv(dim, block_d)
    sq_parts = torch.zeros(n, n_dim_blocks, dtype=torch.float64, device=features.device)
    _class_sums_kernel[(n, n_dim_blocks)](
        features, order, start, count, cls, feature_sum, sq_parts,
        *features.stride(), *feature_sum.stride(), dim, num_classes, n_dim_blocks,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )  # fmt: skip
    # one value per present class (its segment is unique); unused slots and the invalid segment add +0.0 to class 0
    present = cls < num_classes
    sq_norm_sum.index_add_(0, torch.where(present, cls, 0).long(), sq_parts.sum(dim=1))


def class_stats_triton(
    features: Tensor, labels: Tensor, num_classes: int, *, block_r: int = 32, block_d: int = 128
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(count [C], feature_sum [C, D], sq_norm_sum [C], n_invalid [])`` of one batch, all float64 (fresh zero
    states accumulated by :func:`add_class_sums_triton`); no host sync."""
    device = features.device
    valid = (labels >= 0) & (labels < num_classes)
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    count.index_add_(0, labels.clamp(0, num_classes - 1).long(), valid.double())  # integer-valued: exact in any order
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=device)
    sq = torch.zeros(num_classes, dtype=torch.float64, device=device)
    add_class_sums_triton(sums, sq, features, labels, block_r=block_r, block_d=block_d)
    return count, sums, sq, (~valid).sum().double()


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def variants() -> list[Variant]:
    """The specialisations ``auto`` dispatches on a GPU: one per feature dtype, contiguous rows (the probe's
    ``reshape(-1, D)`` of the head input), the launcher's default tiles. Unit: one feature element."""
    out = []
    for dtype, name in _TRITON_TYPES.items():
        block_r, block_d = 32, 128
        signature = {
            "FEATURES": f"*{name}", "ORDER": "*i32", "SEG_START": "*i32", "SEG_COUNT": "*i32", "SEG_CLASS": "*i32",
            "SUMS": "*fp64", "SQ_PARTS": "*fp64", "stride_fn": "i32", "stride_sc": "i32", "dim": "i32",
            "n_classes": "i32", "n_dim_blocks": "i32",
        }  # fmt: skip
        out.append(
            Variant(
                kernel="class_stats",
                name=f"{name} sums",
                fn=_class_sums_kernel,
                signature=signature,
                constexprs={"stride_fd": 1, "stride_sd": 1, "BLOCK_R": block_r, "BLOCK_D": block_d},
                num_warps=4,
                num_stages=3,
                work_per_iteration=block_r * block_d,
                unit="element",
                budget={"spills": 0},
                flops_per_iteration=3.0 * block_r * block_d,
                bytes_per_iteration=float(block_r * block_d * dtype.itemsize + 4 * block_r),
                divisible_by_16=("stride_fn", "stride_sc", "dim"),
            )
        )
    return out
