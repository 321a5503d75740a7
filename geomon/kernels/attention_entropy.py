"""Fused attention entropy and max logit: one pass over Q and K, never more than a tile of scores.

Math. For query row ``i`` with allowed keys ``j``, ``s_ij = scale · q_i·k_j (+ additive mask)``. Per row the kernel
keeps, in base-2 units (``s₂ = s · log₂e``, so that ``exp2`` replaces ``exp``), the running max ``m``,
``l = Σ 2^(s₂-m)`` and ``t = Σ 2^(s₂-m)(s₂-m)``; merging a tile with new max ``m'`` rescales ``l`` and ``t`` by
``2^(m-m')`` and shifts ``t`` by ``l·(m-m')``. At the end ``H = ln l - ln2 · t / l`` (nats) and
``max_logit = ln2 · m``. Semantics are those of :func:`geomon.functional.attention_entropy`: SDPA masks (boolean:
True = may attend; float: added, with ``-inf`` and the dtype's most negative value marking a blocked key), top-left
causal alignment, grouped-query heads (query head ``h`` reads key head ``h // (H / Hk)``, K is never copied),
arbitrary strides, NaN for rows with no allowed key, optional query subsampling (``query_index``).

Cost per (batch, head): ``2 · Nsel · Nk · Dh`` FLOPs on tensor cores for ``QKᵀ`` (about half of that with
``is_causal``, whose tiles above the diagonal are skipped) plus ~6 exp2/FMA per score; bytes: Q rows read once, K
read once per query tile (``ceil(Nsel / BLOCK_M)`` times, from L2 in practice), the mask tile if any, and
``3 · 4 · Nsel`` bytes written. Attention itself does twice the matmul FLOPs (``QKᵀ`` and ``PV``), which is why this
pass can cost about half an attention forward, and a small fraction of it with query subsampling.

Numerics. Products are accumulated in fp32 (fp16/bf16 products are exact in fp32; fp32 inputs use IEEE fp32
``dot``, not TF32), the softmax statistics are fp32. Under ``TRITON_INTERPRET=1`` bf16 tiles are upcast before the
dot, because the interpreter's bf16 dot is wrong; on a GPU they go to the tensor cores as they are.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _attention_entropy_kernel(
    Q, K, MASK, QIDX, ENTROPY, MAX_LOGIT, N_KEYS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    heads, n_q, n_sel, n_k, head_dim, group, scale_log2e, mask_min,
    MASK_KIND: tl.constexpr,  # 0: none, 1: boolean (as uint8), 2: additive float
    IS_CAUSAL: tl.constexpr,
    HAS_QUERY_INDEX: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 -> fp32 before the dot: only under the interpreter, whose bf16 dot is wrong
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: strides times indices can exceed 2**31
    pid_m = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    kv_head = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_sel
    if HAS_QUERY_INDEX:
        pos = tl.load(QIDX + rows, mask=row_ok, other=0).to(tl.int64)
        live = row_ok & (pos >= 0) & (pos < n_q)  # an out-of-range index reads nothing: a row with no key
        pos = tl.where(live, pos, 0)
    else:
        pos = rows.to(tl.int64)
        live = row_ok
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_ptrs = Q + b * stride_qb + h * stride_qh + pos[:, None] * stride_qn + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=live[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    norm = tl.zeros([BLOCK_M], tl.float32)
    tilted = tl.zeros([BLOCK_M], tl.float32)
    n_keys = tl.zeros([BLOCK_M], tl.int32)
    stop = n_k
    if IS_CAUSAL:  # keys past the last query position of this tile are never allowed: skip their tiles
        stop = tl.minimum(n_k, tl.max(tl.where(live, pos, 0)) + 1)
    for start in range(0, stop, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < n_k
        k_ptrs = K + b * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2e
        allowed = live[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (cols[None, :] <= pos[:, None])
        if MASK_KIND != 0:
            m_ptrs = MASK + b * stride_mb + h * stride_mh + pos[:, None] * stride_mq + cols[None, :] * stride_mk
            if MASK_KIND == 1:
                allowed = allowed & (tl.load(m_ptrs, mask=allowed, other=0) != 0)
            else:
                bias = tl.load(m_ptrs, mask=allowed, other=float("-inf")).to(tl.float32)
                allowed = allowed & (bias > mask_min)
                s = s + bias * 1.4426950408889634
        s = tl.where(allowed, s, float("-inf"))
        n_keys += tl.sum(allowed.to(tl.int32), 1)
        new_max = tl.maximum(running_max, tl.max(s, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        centred = s - shift[:, None]
        weights = tl.exp2(centred)
        decay = tl.exp2(running_max - shift)
        carried = tl.where(norm > 0, norm * (running_max - shift), 0.0)
        tilted = decay * (tilted + carried) + tl.sum(tl.where(allowed, weights * centred, 0.0), 1)
        norm = decay * norm + tl.sum(weights, 1)
        running_max = new_max

    entropy = tl.log(norm) - 0.6931471805599453 * tilted / norm
    entropy = tl.minimum(tl.maximum(entropy, 0.0), tl.log(tl.maximum(n_keys, 1).to(tl.float32)))
    no_key = n_keys == 0
    entropy = tl.where(no_key, float("nan"), entropy)
    max_logit = tl.where(no_key, float("nan"), running_max * 0.6931471805599453)
    out = pid_bh * n_sel + rows.to(tl.int64)
    tl.store(ENTROPY + out, entropy, mask=row_ok)
    tl.store(MAX_LOGIT + out, max_logit, mask=row_ok)
    tl.store(N_KEYS + out, n_keys, mask=row_ok)


def _mask_operand(attn_mask: Tensor | None, shape: tuple[int, int, int, int], like: Tensor):
    """``(tensor, strides, kind, min)`` for the kernel: broadcast dims get stride 0, nothing is copied."""
    if attn_mask is None:
        return like, (0, 0, 0, 0), 0, 0.0
    mask = attn_mask.detach().reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape)).expand(shape)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), 1, 0.0
    return mask, mask.stride(), 2, float(torch.finfo(mask.dtype).min)


def attention_rows_triton(
    q: Tensor,
    k: Tensor,
    scale: float,
    is_causal: bool,
    attn_mask: Tensor | None,
    query_index: Tensor | None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(entropy, max_logit, n_keys)`` ``[B, H, Nsel]`` (fp32, fp32, int64); inputs already validated."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    n_sel = n_q if query_index is None else query_index.numel()
    entropy = torch.empty(batch, heads, n_sel, dtype=torch.float32, device=q.device)
    max_logit = torch.empty_like(entropy)
    n_keys = torch.empty(batch, heads, n_sel, dtype=torch.int32, device=q.device)
    if entropy.numel() == 0:
        return entropy, max_logit, n_keys.long()
    mask, mask_strides, mask_kind, mask_min = _mask_operand(attn_mask, (batch, heads, n_q, n_k), q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = block_m or (64 if block_d <= 128 else 32)
    block_n = block_n or (64 if block_d <= 128 else 32)
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.bfloat16
    qidx = q if query_index is None else query_index.to(torch.int32).contiguous()
    grid = (batch * heads, triton.cdiv(n_sel, block_m))
    _attention_entropy_kernel[grid](
        q, k, mask, qidx, entropy, max_logit, n_keys,
        *q.stride(), *k.stride(), *mask_strides,
        heads, n_q, n_sel, n_k, head_dim, heads // kv_heads, scale * LOG2E, mask_min,
        MASK_KIND=mask_kind,
        IS_CAUSAL=is_causal,
        HAS_QUERY_INDEX=query_index is not None,
        IEEE_FP32=q.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 else 8,
    )  # fmt: skip
    return entropy, max_logit, n_keys.long()
