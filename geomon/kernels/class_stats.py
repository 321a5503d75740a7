"""Per-class counts, feature sums and squared-norm sums for neural collapse, deterministic at vocabulary scale.

Math. For labels ``y_i`` in ``[0, C)``: ``n_c = #{i: y_i = c}``, ``S_c = Σ_{y_i = c} h_i`` and
``q_c = Σ_{y_i = c} |h_i|²``. Rows are put in label order by a stable sort (``argsort``, O(N) keys), each class's
rows then form one segment, and program ``(c, d-block)`` sums its segment's rows (gathered through the permutation,
so the features are never copied) into fp64. Every output element is written once by one program in a fixed
order, so the bits are the same on every run - unlike ``index_add_``, whose atomics add in a racy order and pile
up on the frequent classes of a Zipf-distributed vocabulary. The promise is per input layout: Triton specialises the
kernel on strides divisible by 16, so a contiguous tensor and a strided view of the same values can run different
compiled variants whose fp64 sums (``sq_norm_sum`` seen on an H200) differ in the last bits, ~1e-16 relative.

Cost. Bytes: the features once (``N·D`` elements in their dtype), the labels and permutation (``~20·N`` bytes), and
``8·C·D`` bytes written for the sums (the floor of any method that produces them in fp64). FLOPs: ``2·N·D`` adds.
Labels outside ``[0, C)`` are counted and left out (no out-of-bounds access, no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _class_sums_kernel(
    FEATURES, ORDER, STARTS, COUNTS, SUMS, SQ_PARTS,
    stride_fn, stride_fd, dim, n_dim_blocks,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    dim_block = tl.program_id(1)
    start = tl.load(STARTS + c)
    count = tl.load(COUNTS + c)
    cols = dim_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    total = tl.zeros([BLOCK_D], tl.float64)
    squares = tl.zeros([BLOCK_D], tl.float64)
    for offset in range(0, count, BLOCK_R):
        r = offset + tl.arange(0, BLOCK_R)
        r_ok = r < count
        rows = tl.load(ORDER + start + r, mask=r_ok, other=0)
        ptrs = FEATURES + rows[:, None].to(tl.int64) * stride_fn + cols[None, :].to(tl.int64) * stride_fd
        x = tl.load(ptrs, mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
        total += tl.sum(x, 0)
        squares += tl.sum(x * x, 0)
    tl.store(SUMS + c.to(tl.int64) * dim + cols, total, mask=col_ok)
    tl.store(SQ_PARTS + c.to(tl.int64) * n_dim_blocks + dim_block, tl.sum(squares, 0))


def class_stats_triton(
    features: Tensor, labels: Tensor, num_classes: int, *, block_r: int = 32, block_d: int = 128
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(count [C], feature_sum [C, D], sq_norm_sum [C], n_invalid [])``, all float64; no host sync."""
    n, dim = features.shape
    device = features.device
    valid = (labels >= 0) & (labels < num_classes)
    keys = torch.where(valid, labels.long(), num_classes)  # invalid labels sort last, into a bin of their own
    order = torch.argsort(keys, stable=True).to(torch.int32)
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, keys, torch.ones_like(keys))  # integer adds: exact in any order
    starts = torch.cumsum(counts, 0) - counts
    block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    n_dim_blocks = triton.cdiv(dim, block_d)
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    sq_parts = torch.zeros(num_classes, n_dim_blocks, dtype=torch.float64, device=device)
    if n and dim:
        _class_sums_kernel[(num_classes, n_dim_blocks)](
            features, order, starts.to(torch.int32), counts.to(torch.int32), sums, sq_parts,
            *features.stride(), dim, n_dim_blocks,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )  # fmt: skip
    return counts[:num_classes].double(), sums, sq_parts.sum(dim=1), counts[num_classes].double()
