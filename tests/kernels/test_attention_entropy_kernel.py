"""The fused attention-entropy kernel against the torch reference path, on shapes that hit every branch."""

import math

import pytest
import torch
import triton
import triton.language as tl

from geomon.functional import attention_entropy
from geomon.kernels import attention_entropy as kernel_module
from geomon.kernels.attention_entropy import attention_rows_triton
from tests.kernels.conftest import DEVICE, INTERPRETED

BLOCK = 16  # small tiles so that tile edges are reachable with small (interpreter-friendly) shapes


def _reference(q, k, **kwargs):
    return attention_entropy(q.double(), k.double(), backend="torch", return_n_keys=True, **kwargs)


def _kernel(q, k, *, scale=None, is_causal=False, attn_mask=None, query_index=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return attention_rows_triton(q, k, scale, is_causal, attn_mask, query_index, block_m=BLOCK, block_n=BLOCK)


def _check(q, k, atol=1e-4, **kwargs):
    entropy, max_logit, n_keys = _kernel(q, k, **kwargs)
    ref_entropy, ref_max, ref_n = _reference(q, k, **kwargs)
    assert torch.equal(n_keys.cpu(), ref_n.cpu())
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy.cpu(), atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(max_logit.double().cpu(), ref_max.cpu(), atol=atol, rtol=1e-5, equal_nan=True)


def _qk(b, h, hk, nq, nk, dh, dtype=torch.float32, spread=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, nq, dh, generator=g) * spread).to(DEVICE, dtype)
    k = torch.randn(b, hk, nk, dh, generator=g).to(DEVICE, dtype)
    return q, k


def test_the_kernel_really_runs_interpreted_on_the_cpu():
    if DEVICE == "cpu":
        assert INTERPRETED
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(kernel_module._attention_entropy_kernel, InterpretedFunction)


@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3])
@pytest.mark.parametrize("is_causal", [False, True])
def test_tile_edges(n, is_causal):
    q, k = _qk(1, 2, 2, n, n, 16, seed=n)
    _check(q, k, is_causal=is_causal)


@pytest.mark.parametrize(("nq", "nk"), [(5, 37), (37, 5), (17, 16)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_unequal_query_and_key_lengths(nq, nk, is_causal):
    _check(*_qk(2, 2, 1, nq, nk, 8), is_causal=is_causal)


@pytest.mark.parametrize("head_dim", [8, 24, 32, 64, 128])
def test_head_dims_including_non_powers_of_two(head_dim):
    _check(*_qk(1, 2, 2, 9, 20, head_dim), scale=0.3)


def test_grouped_query_attention_reads_the_right_key_head():
    _check(*_qk(2, 8, 2, 11, 19, 16), is_causal=True)


def test_boolean_float_and_padding_masks_with_broadcasts():
    b, h, nq, nk = 2, 4, 13, 21
    q, k = _qk(b, h, 2, nq, nk, 16)
    g = torch.Generator().manual_seed(3)
    full = (torch.rand(b, h, nq, nk, generator=g) > 0.5).to(DEVICE)
    full[1, 2, 4] = False  # a row with no allowed key: NaN
    _check(q, k, attn_mask=full)
    padding = torch.ones(b, 1, 1, nk, dtype=torch.bool, device=DEVICE)
    padding[0, ..., 15:] = False
    _check(q, k, attn_mask=padding)
    bias = torch.randn(nq, nk, generator=g).to(DEVICE)  # 2-D additive bias, broadcast over batch and heads
    _check(q, k, attn_mask=bias)
    for blocked in (-math.inf, torch.finfo(torch.float32).min):
        additive = torch.zeros(b, 1, nq, nk, device=DEVICE)
        additive[..., 17:] = blocked
        additive[0, :, 3, :] = blocked
        _check(q, k, attn_mask=additive)


@pytest.mark.parametrize("shape", [(13, 1), (2, 1, 13, 1), (2, 4, 1, 1)])
def test_masks_broadcast_along_the_keys_agree_with_the_torch_path(shape):
    # one entry for every key of a row: all Nk keys counted on both paths (the torch path used to count one per chunk)
    q, k = _qk(2, 4, 2, 13, 2 * BLOCK + 3, 16)
    blocked = torch.rand(shape, generator=torch.Generator().manual_seed(4)) < 0.3
    blocked.view(-1)[0] = False
    for mask in (~blocked, torch.randn(shape).masked_fill(blocked, -math.inf)):
        _check(q, k, attn_mask=mask.to(DEVICE))
        assert set(_reference(q, k, attn_mask=mask.to(DEVICE))[2].unique().tolist()) <= {0, 2 * BLOCK + 3}


def test_non_contiguous_inputs_are_read_through_their_strides():
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 23, 3, 4, 16, generator=g).to(DEVICE)  # [B, N, 3, H, Dh] as a fused projection gives
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(q, k, is_causal=True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_query_subsampling(is_causal):
    q, k = _qk(1, 2, 2, 40, 40, 16)
    index = torch.tensor([0, 3, 17, 39, 16, 15], device=DEVICE)
    _check(q, k, is_causal=is_causal, query_index=index)
    mask = (torch.rand(1, 2, 40, 40, generator=torch.Generator().manual_seed(1)) > 0.3).to(DEVICE)
    _check(q, k, attn_mask=mask, query_index=index)


def test_empty_and_keyless_inputs():
    q, k = _qk(1, 2, 2, 0, 5, 16)
    assert _kernel(q, k)[0].shape == (1, 2, 0)
    q, k = _qk(1, 2, 2, 4, 0, 16)
    entropy, max_logit, n_keys = _kernel(q, k)
    assert bool(entropy.isnan().all()) and bool(max_logit.isnan().all()) and int(n_keys.sum()) == 0


def test_uniform_and_one_hot_rows():
    k = torch.randn(1, 1, 40, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    entropy, _, _ = _kernel(torch.zeros(1, 1, 3, 16, device=DEVICE), k)
    torch.testing.assert_close(entropy.cpu(), torch.full((1, 1, 3), math.log(40)), atol=1e-5, rtol=0)
    eye = torch.eye(16, device=DEVICE).reshape(1, 1, 16, 16)
    entropy, max_logit, _ = _kernel(eye, eye * 100, scale=1.0)
    assert float(entropy.abs().max()) < 1e-6
    torch.testing.assert_close(max_logit.cpu(), torch.full((1, 1, 16), 100.0))


def test_public_function_dispatches_to_the_kernel(monkeypatch):
    calls = []
    original = kernel_module.attention_rows_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "attention_rows_triton", spy)
    q, k = _qk(1, 2, 1, 70, 70, 32)  # default 64-wide tiles: 2 query tiles, 2 key tiles
    entropy, max_logit = attention_entropy(q, k, is_causal=True, backend="triton")
    ref_entropy, ref_max = attention_entropy(q, k, is_causal=True, backend="torch")
    assert calls == [1]
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(max_logit, ref_max, atol=1e-4, rtol=1e-5)
    expected_auto = "triton" if DEVICE == "cuda" else "torch"  # auto never interprets CPU tensors
    attention_entropy(q, k, backend="auto")
    assert len(calls) == (2 if expected_auto == "triton" else 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_fp32_accuracy(dtype):
    # the reference sees the same rounded inputs in float64; products of fp16/bf16 values are exact in fp32
    n = 40 if INTERPRETED else 300
    _check(*_qk(2, 4, 2, n, n, 64, dtype=dtype), atol=1e-4, is_causal=True)


def test_triton_backend_refuses_what_it_cannot_run():
    q, k = _qk(1, 1, 1, 4, 4, 8)
    with pytest.raises(RuntimeError, match="float64 inputs are computed by the torch path only"):
        attention_entropy(q.double(), k.double(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_entropy(q, k, backend="cuda")


def test_out_of_range_query_rows_read_as_rows_with_no_key_on_both_paths():
    q, k = _qk(1, 2, 2, 20, 20, 16)
    index = torch.tensor([3, 25, -1, 7], device=DEVICE)  # the update path never syncs to check indices
    for backend in ("torch", "triton"):
        from geomon.functional.attention_entropy import _attention_rows

        entropy, _, n_keys = _attention_rows(q, k, is_causal=True, query_index=index, backend=backend)
        assert n_keys[..., 1:3].eq(0).all() and entropy[..., 1:3].isnan().all()
        ref, _ = attention_entropy(q, k, is_causal=True, query_index=index[[0, 3]], backend="torch")
        torch.testing.assert_close(entropy[..., [0, 3]], ref, atol=1e-4, rtol=0)


def test_mixed_dtypes_run_on_the_torch_path():
    q, k = _qk(1, 2, 2, 9, 9, 16)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        attention_entropy(q.half(), k, backend="triton")
    entropy, _ = attention_entropy(q.half(), k, backend="auto")
    assert entropy.isfinite().all()


# --- the unmasked / masked key loops: boundaries, against an explicit float64 softmax ---------------------------
def _explicit(
    q, k, scale, is_causal=False, attn_mask=None, query_index=None, causal_offset=0, window=None, segments=None
):
    """Entropy, max logit and key count per row from the full float64 score matrix and torch's softmax (query ``i``
    at key position ``i + causal_offset`` for the causal rule, the window ``|position - j| < window`` and packed
    ``segments`` ``[Nk]``: only keys with the position's own id; a position outside the keys has none)."""
    q64, k64 = q.double().cpu(), k.double().cpu().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = scale * q64 @ k64.transpose(-1, -2)
    n_q, n_k = scores.shape[-2:]
    allowed = torch.ones_like(scores, dtype=torch.bool)
    position = torch.arange(n_q)[:, None] + causal_offset
    key = torch.arange(n_k)[None, :]
    if is_causal:
        allowed = allowed & (key <= position)
    if window is not None:
        allowed = allowed & ((position - key).abs() < window)
    if segments is not None:
        inside = (position >= 0) & (position < n_k)
        own = segments.cpu()[position.clamp(0, n_k - 1)]
        allowed = allowed & inside & (own == segments.cpu()[key])
    if attn_mask is not None:
        mask = attn_mask.cpu()
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.double()
            allowed = allowed & (mask > torch.finfo(mask.dtype).min)
    if query_index is not None:
        scores, allowed = scores[..., query_index.cpu(), :], allowed.expand_as(scores)[..., query_index.cpu(), :]
    scores = scores.masked_fill(~allowed, -math.inf)
    n_keys = allowed.sum(-1)
    p = torch.softmax(scores, -1)
    entropy = -(p * torch.log_softmax(scores, -1)).where(allowed, 0.0).sum(-1)
    keyless = n_keys == 0
    return entropy.masked_fill(keyless, math.nan), scores.amax(-1).masked_fill(keyless, math.nan), n_keys


def _runs(segments):
    """``[2, N]`` int32 by a plain loop: the first position of each position's run of equal ids, one past its last."""
    ids = segments.tolist()
    first = [next(j for j in range(i, -1, -1) if j == 0 or ids[j - 1] != ids[i]) for i in range(len(ids))]
    end = [next(j for j in range(i + 1, len(ids) + 1) if j == len(ids) or ids[j] != ids[i]) for i in range(len(ids))]
    return torch.tensor([first, end], dtype=torch.int32, device=DEVICE)


def _against_explicit(q, k, *, scale=0.5, block_m=BLOCK, block_n=BLOCK, atol=2e-5, **kwargs):
    segments = kwargs.get("segments")
    entropy, max_logit, n_keys = attention_rows_triton(
        q, k, scale, kwargs.get("is_causal", False), kwargs.get("attn_mask"), kwargs.get("query_index"),
        block_m=block_m, block_n=block_n, causal_offset=kwargs.get("causal_offset", 0), window=kwargs.get("window"),
        key_bounds=None if segments is None else _runs(segments),
    )  # fmt: skip
    ref_entropy, ref_max, ref_n = _explicit(q, k, scale, **kwargs)
    assert torch.equal(n_keys.cpu(), ref_n)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, atol=atol, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(max_logit.double().cpu(), ref_max, atol=atol, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("n_k", [BLOCK - 3, 2 * BLOCK, 2 * BLOCK + 5, 3 * BLOCK - 1])
def test_unmasked_loop_then_a_partial_key_tile(n_k):
    _against_explicit(*_qk(1, 2, 1, 2 * BLOCK + 1, n_k, 16, seed=n_k))


@pytest.mark.parametrize(("n_q", "n_k"), [(2 * BLOCK + 3, 3 * BLOCK + 7), (3 * BLOCK + 7, 2 * BLOCK - 1), (40, 40)])
@pytest.mark.parametrize(("block_m", "block_n"), [(BLOCK, BLOCK), (2 * BLOCK, BLOCK), (BLOCK, 2 * BLOCK)])
def test_causal_tiles_below_on_and_past_the_diagonal(n_q, n_k, block_m, block_n):
    # top-left alignment: row i attends keys 0..i; rows past n_k attend every key, through the unmasked loop
    _against_explicit(*_qk(1, 2, 2, n_q, n_k, 16, seed=n_q), is_causal=True, block_m=block_m, block_n=block_n)


def test_causal_query_index_rows_spread_over_the_sequence():
    q, k = _qk(1, 2, 1, 70, 60, 16, seed=4)
    index = torch.tensor([69, 0, 15, 16, 17, 31, 32, 47, 48, 59, 60, 33], device=DEVICE)  # unsorted, past n_k too
    _against_explicit(q, k, is_causal=True, query_index=index)
    _against_explicit(q, k, is_causal=True, query_index=index[[0, 9, 10]])  # every row past the last key


def test_rows_with_every_key_blocked_are_nan_on_the_masked_loop():
    b, h, n_q, n_k = 1, 2, 20, 37
    q, k = _qk(b, h, h, n_q, n_k, 16, seed=6)
    mask = (torch.rand(b, h, n_q, n_k, generator=torch.Generator().manual_seed(2)) > 0.4).to(DEVICE)
    mask[0, 0, 3] = False
    mask[0, 1, 17] = False
    _against_explicit(q, k, attn_mask=mask)
    additive = torch.zeros(b, h, n_q, n_k, device=DEVICE).masked_fill(~mask, -math.inf)
    _against_explicit(q, k, attn_mask=additive)


@pytest.mark.parametrize("is_causal", [False, True])
def test_negative_and_zero_scales_take_the_row_minimum_or_a_flat_row(is_causal):
    q, k = _qk(1, 2, 2, 2 * BLOCK + 1, 2 * BLOCK + 3, 16, seed=9)
    _against_explicit(q, k, scale=-0.7, is_causal=is_causal)
    _against_explicit(q, k, scale=0.0, is_causal=is_causal)
    # a zero scale under masks: flat over the allowed keys (boolean), the additive mask alone (additive)
    allowed = torch.rand(1, 1, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(9)) > 0.4
    allowed[..., 0, :] = False  # a row with no key
    for mask in (allowed, torch.randn(allowed.shape).masked_fill(~allowed, -math.inf)):
        _against_explicit(q, k, scale=0.0, is_causal=is_causal, attn_mask=mask.to(DEVICE))
    # a NaN query row stays NaN at a zero scale (NaN · 0), for scales that are 0 only in float32 too
    q[0, 1, 5, 0] = math.nan
    for scale in (0.0, -0.0, 1e-46):
        _against_explicit(q, k, scale=scale, is_causal=is_causal)
        _against_explicit(q, k, scale=scale, is_causal=is_causal, attn_mask=allowed.to(DEVICE))


def test_head_dim_below_the_padded_tile_masks_the_key_loads():
    _against_explicit(*_qk(1, 2, 2, 33, 2 * BLOCK, 24, seed=2), is_causal=True)  # Dh 24 in a 32-wide tile


def test_default_tiles_run_both_loops():
    q, k = _qk(1, 1, 1, 150, 140, 64, seed=3)  # 128-wide default tiles: one full key tile and a partial one
    entropy, max_logit, n_keys = attention_rows_triton(q, k, 0.125, True, None, None)
    ref_entropy, ref_max, ref_n = _explicit(q, k, 0.125, is_causal=True)
    assert torch.equal(n_keys.cpu(), ref_n)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(max_logit.double().cpu(), ref_max, atol=2e-5, rtol=1e-6)


def test_fp32_dots_use_tf32x3_only_where_tensor_cores_take_tf32():
    from geomon.kernels.attention_entropy import _dot_precision, _tensor_cores_take_tf32

    assert _dot_precision(torch.float32, interpreted=False, tf32=True) == "tf32x3"
    assert _dot_precision(torch.float32, interpreted=False, tf32=False) == "ieee"  # pre-Ampere GPUs
    assert _dot_precision(torch.float32, interpreted=True) == "ieee"
    assert _dot_precision(torch.bfloat16, interpreted=False) == "ieee"  # no precision choice for 16-bit products
    assert not _tensor_cores_take_tf32(torch.device("cpu"), interpreted=False)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16])
def test_masked_at_blocks_the_capture_padding_value_without_rewriting_the_mask(mask_dtype):
    # the capture's padding rule: additive entries <= -1e4 block their key; the mask is read as the model built it
    b, h, nq, nk = 2, 2, 19, 37
    q, k = _qk(b, h, 2, nq, nk, 16)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(b, 1, nq, nk, generator=g) * 3
    bias[0, :, :, 30:] = -1e4  # left as HF writes padding
    bias[1, :, :, :5] = -2e4
    bias[1, :, 7, :] = -1e4  # a row with no key left: NaN
    bias[0, :, 2, 3] = -9990.0  # just above the threshold: an allowed key with a very small weight
    bias = bias.to(DEVICE, mask_dtype)
    before = bias.clone()
    entropy, max_logit, n_keys = attention_rows_triton(
        q, k, 1 / math.sqrt(16), False, bias, None, block_m=BLOCK, block_n=BLOCK, masked_at=-1e4
    )
    assert torch.equal(bias, before)
    explicit = bias.double().cpu().masked_fill(bias.double().cpu() <= -1e4, -math.inf)  # independent of masked_at
    ref_entropy, ref_max, ref_n = _reference(q.cpu(), k.cpu(), attn_mask=explicit)
    assert torch.equal(n_keys.cpu(), ref_n)
    assert int(n_keys[0, 0, 2]) == 30 and int(n_keys[1, 0, 7]) == 0
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(max_logit.double().cpu(), ref_max, atol=1e-4, rtol=1e-5, equal_nan=True)
    # and the public path sends such a call to the kernel (it used to fall back to the torch path)
    public = attention_entropy(q, k, attn_mask=bias, backend="triton", return_n_keys=True, _masked_at=-1e4)
    assert torch.equal(public[2].cpu(), ref_n)


def test_bfloat16_masks_holding_minus_1e4_block_their_keys_as_on_the_torch_path():
    # (1 - mask) * -10000 in bf16 is -9984: blocked on the torch path (compared in bf16), so on the kernel too
    q, k = _qk(1, 3, 3, 6, 40, 16, dtype=torch.bfloat16)
    tokens = torch.ones(1, 1, 1, 40, device=DEVICE)
    tokens[..., 30:] = 0
    mask = ((1 - tokens) * -10000.0).to(torch.bfloat16)
    _, _, n_keys = attention_rows_triton(q, k, 0.25, False, mask, None, block_m=BLOCK, block_n=BLOCK, masked_at=-1e4)
    torch_rows = attention_entropy(q, k, attn_mask=mask, backend="torch", return_n_keys=True, _masked_at=-1e4)
    assert n_keys.cpu().unique().tolist() == [30]
    assert torch.equal(n_keys.cpu(), torch_rows[2].cpu())


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("scale", [0.5, -0.7, 40.0])
def test_masked_loop_rows_whose_leading_key_tiles_are_all_blocked(kind, scale):
    # left padding: whole key tiles blocked before a row's first allowed key (the running max is still -inf there),
    # a keyless row, and scores far enough below the row max (scale 40) that their weights underflow to exactly 0
    b, h, n_q, n_k = 2, 2, 3 * BLOCK + 5, 4 * BLOCK + 3
    q, k = _qk(b, h, 1, n_q, n_k, 16, seed=11)
    allowed = torch.ones(b, h, n_q, n_k, dtype=torch.bool)
    allowed[0, :, :, : 2 * BLOCK + 3] = False  # the first two key tiles and then some
    allowed[1, 0, :, : 3 * BLOCK] = False
    allowed[1, 1, 5] = False  # no key at all
    allowed[1, 1, 6, :-1] = False  # only the very last key
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -math.inf)
    _against_explicit(q, k, scale=scale, attn_mask=mask.to(DEVICE), atol=5e-5)
    index = torch.tensor([n_q - 1, 0, 5, 6, BLOCK, 2 * BLOCK + 1], device=DEVICE)
    _against_explicit(q, k, scale=scale, attn_mask=mask.to(DEVICE), query_index=index, atol=5e-5)


def test_additive_values_far_below_the_logits_stay_allowed_keys():
    # finite entries above the blocking value are keys, however negative: counted, and a row holding only such keys
    # has them as its logits (-1e30 and a finite -3e38, which times log2(e) would round to -inf)
    q, k = _qk(1, 1, 1, 4, 2 * BLOCK + 2, 16, seed=12)
    bias = torch.zeros(1, 1, 4, 2 * BLOCK + 2)
    bias[0, 0, 0, 1:] = -1e30  # one ordinary key among very negative ones
    bias[0, 0, 1] = -1e30  # only very negative keys: uniform over them, max logit about -1e30
    bias[0, 0, 2, 3:] = -3.0e38
    bias[0, 0, 3, ::2] = -math.inf
    entropy, max_logit, n_keys = attention_rows_triton(
        q, k, 0.5, False, bias.to(DEVICE), None, block_m=BLOCK, block_n=BLOCK
    )
    assert n_keys.flatten().tolist() == [2 * BLOCK + 2, 2 * BLOCK + 2, 2 * BLOCK + 2, BLOCK + 1]
    ref_entropy, ref_max, _ = _explicit(q, k, 0.5, attn_mask=bias.to(DEVICE))
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, atol=5e-5, rtol=0)
    torch.testing.assert_close(max_logit.double().cpu(), ref_max, rtol=1e-6, atol=5e-5)
    assert float(entropy[0, 0, 1]) == pytest.approx(math.log(2 * BLOCK + 2), abs=1e-5)


# --- key ranges: flash attention's bottom-right causal rule, sliding windows, masks combined with either -------------
@pytest.mark.parametrize(
    ("n_q", "n_k"), [(BLOCK + 3, 4 * BLOCK + 5), (3 * BLOCK + 2, 3 * BLOCK + 2), (4 * BLOCK, 2 * BLOCK + 1)]
)
@pytest.mark.parametrize(("block_m", "block_n"), [(BLOCK, BLOCK), (2 * BLOCK, BLOCK)])
def test_bottom_right_causal_alignment(n_q, n_k, block_m, block_n):
    # query i stands at key position i + Nk - Nq: with Nq > Nk the first rows see no key at all (NaN, 0 keys)
    q, k = _qk(1, 2, 1, n_q, n_k, 16, seed=n_q + n_k)
    offset = n_k - n_q
    _against_explicit(q, k, is_causal=True, causal_offset=offset, block_m=block_m, block_n=block_n)
    index = torch.tensor([n_q - 1, 0, n_q // 2, BLOCK, BLOCK - 1], device=DEVICE)
    _against_explicit(q, k, is_causal=True, causal_offset=offset, query_index=index)


@pytest.mark.parametrize("window", [1, 3, BLOCK, BLOCK + 5, 3 * BLOCK])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sliding_windows_cut_both_ends_of_each_row(window, is_causal):
    # tiles before the window, inside it in full (unmasked loop) and across its edges (masked loop, both sides)
    n = 5 * BLOCK + 3
    q, k = _qk(1, 2, 2, n, n, 16, seed=window)
    _against_explicit(q, k, is_causal=is_causal, window=window)
    _against_explicit(q, k, is_causal=is_causal, window=window, block_m=2 * BLOCK, block_n=BLOCK)
    index = torch.tensor([n - 1, 0, 2 * BLOCK + 1, 4 * BLOCK, 7], device=DEVICE)
    _against_explicit(q, k, is_causal=is_causal, window=window, query_index=index)
    _against_explicit(q, k, is_causal=is_causal, window=window, causal_offset=-BLOCK)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize(("window", "offset"), [(None, 0), (None, 9), (2 * BLOCK, 0), (BLOCK + 1, 5)])
def test_masks_combine_with_the_causal_rule_and_windows(kind, window, offset):
    # flash-style calls: a [B, 1, 1, Nk] key padding (left and right padded sequences) with the causal rule
    b, h, n_q = 2, 2, 3 * BLOCK + 1
    n_k = n_q + offset
    q, k = _qk(b, h, 1, n_q, n_k, 16, seed=offset + 1)
    tokens = torch.ones(b, 1, 1, n_k, dtype=torch.bool)
    tokens[0, ..., : BLOCK + 2] = False  # left padding
    tokens[1, ..., 2 * BLOCK :] = False  # right padding
    mask = tokens if kind == "bool" else torch.zeros(tokens.shape).masked_fill(~tokens, -math.inf)
    _against_explicit(q, k, attn_mask=mask.to(DEVICE), is_causal=True, causal_offset=offset, window=window)
    index = torch.tensor([n_q - 1, 0, BLOCK + 1, 2 * BLOCK], device=DEVICE)
    kwargs = {"attn_mask": mask.to(DEVICE), "causal_offset": offset, "window": window, "query_index": index}
    _against_explicit(q, k, is_causal=True, **kwargs)
    _against_explicit(q, k, is_causal=False, **kwargs)


# --- packed sequences: each key position's own run of keys, with the causal rule, windows and masks ----------------
def _segments(n, lengths):
    """Ids for runs of the given lengths, repeated until ``n`` positions are covered."""
    ids, run = [], 0
    while len(ids) < n:
        ids += [run] * lengths[run % len(lengths)]
        run += 1
    return torch.tensor(ids[:n])


@pytest.mark.parametrize("lengths", [[1], [3, BLOCK + 5, 1, 2 * BLOCK], [4 * BLOCK + 1], [BLOCK, BLOCK - 1, 7]])
@pytest.mark.parametrize("is_causal", [False, True])
def test_packed_sequences_keep_each_row_inside_its_own_sequence(lengths, is_causal):
    # runs shorter than a tile, across tile edges and longer than several tiles (full tiles on the unmasked loop)
    n = 5 * BLOCK + 3
    q, k = _qk(2, 2, 1, n, n, 16, seed=len(lengths))
    segments = _segments(n, lengths)
    _against_explicit(q, k, is_causal=is_causal, segments=segments)
    _against_explicit(q, k, is_causal=is_causal, segments=segments, block_m=2 * BLOCK, block_n=BLOCK)
    index = torch.tensor([n - 1, 0, 2 * BLOCK + 1, 4 * BLOCK, 7, BLOCK - 1], device=DEVICE)
    _against_explicit(q, k, is_causal=is_causal, segments=segments, query_index=index)
    _against_explicit(q, k, is_causal=is_causal, segments=segments, window=BLOCK + 2)
    # positions before the first key or past the last (no sequence there): rows with no key
    _against_explicit(q, k, is_causal=is_causal, segments=segments, causal_offset=-BLOCK)
    _against_explicit(q, k, is_causal=is_causal, segments=segments, causal_offset=BLOCK + 1)


@pytest.mark.parametrize("kind", ["bool", "additive", "per-query"])
def test_packed_sequences_combine_with_masks(kind):
    # a key mask (read per key), a boolean and an additive mask with a row per query (read per score)
    n = 4 * BLOCK + 5
    q, k = _qk(3, 2, 2, n, n, 16, seed=21)
    segments = _segments(n, [BLOCK + 3, 2, 2 * BLOCK])
    if kind == "per-query":
        mask = (torch.rand(3, 1, n, n, generator=torch.Generator().manual_seed(3)) > 0.3).to(DEVICE)
    else:
        mask = _key_mask(kind, 3, n)
    for is_causal in (False, True):
        _against_explicit(q, k, attn_mask=mask, is_causal=is_causal, segments=segments, atol=5e-5)
        index = torch.tensor([n - 1, 0, BLOCK + 2, BLOCK + 3, 3 * BLOCK], device=DEVICE)
        _against_explicit(q, k, attn_mask=mask, is_causal=is_causal, segments=segments, query_index=index, atol=5e-5)


def test_segment_bounds_are_the_runs_of_equal_ids():
    from geomon.capture._patterns import _segment_bounds

    for ids in ([0], [1, 1, 1, 2, 2, 3], [0, 1, 2, 3], [5] * 9, [1, 1, 2, 2, 1, 1, 0], _segments(70, [3, 1, 20])):
        ids = torch.as_tensor(ids)
        assert torch.equal(_segment_bounds(ids.to(DEVICE)).cpu(), _runs(ids).cpu())


@triton.jit
def _row_range_probe(POS, LIVE, BOUNDS, START, END, n, n_k, window, IS_CAUSAL: tl.constexpr,
                     HAS_BOUNDS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    i = tl.arange(0, BLOCK)
    ok = i < n
    position = tl.load(POS + i, mask=ok, other=0)
    live = tl.load(LIVE + i, mask=ok, other=0) != 0
    key_start, key_end = kernel_module._row_range(position, live, n_k, window, BOUNDS, IS_CAUSAL, HAS_BOUNDS)
    tl.store(START + i, key_start, mask=ok)
    tl.store(END + i, key_end, mask=ok)


@pytest.mark.parametrize("window", [1, 16, 64, 1000])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_row_ranges_stay_inside_the_keys(window, is_causal, packed):
    # every row's [key_start, key_end) lies in [0, Nk] (the key count is read at both ends, also for dead rows and
    # positions far past the keys) and holds exactly its allowed keys when the row is live
    n_k, positions = 100, torch.arange(-150, 250, 3)
    live = torch.rand(positions.numel(), generator=torch.Generator().manual_seed(window)) < 0.7
    segments = _segments(n_k, [7, 30, 1, 62])
    start, end = torch.empty_like(positions, dtype=torch.int32), torch.empty_like(positions, dtype=torch.int32)
    _row_range_probe[(1,)](
        positions.to(DEVICE, torch.int32), live.to(DEVICE, torch.int32), _runs(segments), start.to(DEVICE),
        end.to(DEVICE), positions.numel(), n_k, window, IS_CAUSAL=is_causal, HAS_BOUNDS=packed,
        BLOCK=triton.next_power_of_2(positions.numel()),
    )  # fmt: skip
    start, end = start.cpu(), end.cpu()
    assert (start >= 0).all() and (start <= end).all() and (end <= n_k).all()
    for p, alive, a, b in zip(positions.tolist(), live.tolist(), start.tolist(), end.tolist(), strict=True):
        keys = [j for j in range(n_k) if abs(p - j) < window and (j <= p or not is_causal)]
        if packed:
            keys = [j for j in keys if 0 <= p < n_k and segments[j] == segments[p]]
        assert (b - a, list(range(a, b))) == ((len(keys), keys) if alive else (0, []))


# --- key masks ([B, 1, 1, Nk], the same row for every query): read once per key, in the unmasked loop too ----------
def _key_mask(kind, b, n_k):
    """Left padding (whole tiles blocked), scattered blocked keys inside full tiles, a batch with no key (bool) or
    with only finite keys far below the logits (additive: -5e37; the kernel holds entries below -5.9e37 there)."""
    tokens = torch.ones(b, 1, 1, n_k, dtype=torch.bool)
    tokens[0, ..., : 2 * BLOCK + 3] = False
    tokens[1, ..., ::3] = False
    tokens[1, ..., -1] = False
    if kind == "bool":
        tokens[2] = False
        return tokens.to(DEVICE)
    bias = (torch.randn(b, 1, 1, n_k, generator=torch.Generator().manual_seed(7)) * 3).masked_fill(~tokens, -math.inf)
    bias[2] = -5.0e37
    bias[2, ..., 5] = -1e30
    return bias.to(DEVICE)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("scale", [0.5, -0.7, 40.0])
@pytest.mark.parametrize("is_causal", [False, True])
def test_key_masks_on_the_unmasked_and_the_masked_loop(kind, scale, is_causal):
    b, h, n_q, n_k = 3, 2, 3 * BLOCK + 5, 4 * BLOCK + 3
    q, k = _qk(b, h, 1, n_q, n_k, 16, seed=13)
    mask = _key_mask(kind, b, n_k)
    assert mask.expand(b, h, n_q, n_k).stride(2) == 0
    _against_explicit(q, k, scale=scale, attn_mask=mask, is_causal=is_causal, atol=5e-5)
    _against_explicit(q, k, scale=scale, attn_mask=mask, is_causal=is_causal, block_m=2 * BLOCK, atol=5e-5)
    index = torch.tensor([n_q - 1, 0, 5, BLOCK, 2 * BLOCK + 1], device=DEVICE)
    _against_explicit(q, k, scale=scale, attn_mask=mask, is_causal=is_causal, query_index=index, atol=5e-5)
    # the same mask written out per query takes the per-score path and gives the same rows
    per_query = mask.expand(b, 1, n_q, n_k).contiguous()
    _against_explicit(q, k, scale=scale, attn_mask=per_query, is_causal=is_causal, atol=5e-5)


def test_key_masks_leave_out_of_range_query_rows_keyless():
    # rows that are not live still pass through the unmasked loop of a key mask: their count is zeroed at the end
    q, k = _qk(2, 2, 2, 3 * BLOCK, 3 * BLOCK, 16, seed=14)
    mask = torch.ones(2, 1, 1, 3 * BLOCK, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 4:] = False
    index = torch.tensor([3, 3 * BLOCK, -1, 2 * BLOCK], device=DEVICE)
    for is_causal in (False, True):
        entropy, max_logit, n_keys = attention_rows_triton(
            q, k, 0.5, is_causal, mask, index, block_m=BLOCK, block_n=BLOCK
        )
        assert n_keys[..., 1:3].eq(0).all() and entropy[..., 1:3].isnan().all() and max_logit[..., 1:3].isnan().all()
        live = index[[0, 3]]
        ref_entropy, ref_max, ref_n = _explicit(q, k, 0.5, is_causal=is_causal, attn_mask=mask, query_index=live)
        assert torch.equal(n_keys[..., [0, 3]].cpu(), ref_n)
        torch.testing.assert_close(entropy[..., [0, 3]].double().cpu(), ref_entropy, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(max_logit[..., [0, 3]].double().cpu(), ref_max, atol=2e-5, rtol=1e-5)


def test_key_padding_on_the_default_tiles():
    # the launcher's own tiles (128 wide for a key mask, as unmasked): several full key tiles, then a partial one
    q, k = _qk(2, 2, 1, 150, 300, 64, seed=15)
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool, device=DEVICE)
    mask[0, ..., 200:] = False
    mask[1, ..., :131] = False
    for is_causal in (False, True):
        entropy, max_logit, n_keys = attention_rows_triton(
            q, k, 0.125, is_causal, mask, None, causal_offset=150 if is_causal else 0
        )
        offset = 150 if is_causal else 0
        ref_entropy, ref_max, ref_n = _explicit(q, k, 0.125, is_causal=is_causal, attn_mask=mask, causal_offset=offset)
        assert torch.equal(n_keys.cpu(), ref_n)
        torch.testing.assert_close(entropy.double().cpu(), ref_entropy, atol=2e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(max_logit.double().cpu(), ref_max, atol=2e-5, rtol=1e-6, equal_nan=True)


def test_the_launcher_reads_a_mask_per_key_only_when_it_is_the_same_for_every_query(monkeypatch):
    launches = []
    kernel = kernel_module._attention_entropy_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["MASK_KIND"], kwargs["BLOCK_M"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernel_module, "_attention_entropy_kernel", Spy())
    q, k = _qk(2, 2, 2, 5, 9, 16)
    padding = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=DEVICE)
    additive = torch.zeros(1, 9, device=DEVICE)
    masks = [padding, padding.expand(2, 2, 5, 9), additive, padding.expand(2, 1, 5, 9).contiguous(), None]
    for mask in masks:
        attention_rows_triton(q, k, 0.5, False, mask, None)
    attention_rows_triton(q[:, :, :1], k, 0.5, False, torch.ones(1, 1, 9, dtype=torch.bool, device=DEVICE), None)
    masked = kernel_module.tile_config(torch.float32, 16, False, masked=True).block_m
    unmasked = kernel_module.tile_config(torch.float32, 16, False).block_m
    # per key (3), per score (1), none (0); one query reads any mask per key
    assert launches == [(3, unmasked), (3, unmasked), (3, unmasked), (1, masked), (0, unmasked), (3, unmasked)]


def test_nan_entries_of_an_additive_mask_block_their_key():
    # NaN compares false against the blocking threshold: its key is blocked, on the kernel's per-score and per-key
    # reads and on the torch path alike (the reference: NaN never exceeds the dtype's minimum either)
    b, n_q, n_k = 2, 2 * BLOCK + 3, 3 * BLOCK + 1
    q, k = _qk(b, 2, 1, n_q, n_k, 16, seed=31)
    g = torch.Generator().manual_seed(31)
    per_query = torch.randn(b, 1, n_q, n_k, generator=g).masked_fill(
        torch.rand(b, 1, n_q, n_k, generator=g) < 0.3, math.nan
    )
    per_key = torch.randn(b, 1, 1, n_k, generator=g)
    per_key[..., 1::3] = math.nan
    for mask in (per_query.to(DEVICE), per_key.to(DEVICE)):
        _against_explicit(q, k, attn_mask=mask, atol=5e-5)
        entropy, max_logit, n_keys = attention_entropy(
            q, k, scale=0.5, attn_mask=mask, backend="torch", return_n_keys=True
        )
        ref_entropy, ref_max, ref_n = _explicit(q, k, 0.5, attn_mask=mask)
        assert torch.equal(n_keys.cpu(), ref_n) and (ref_n < n_k).all()
        torch.testing.assert_close(entropy.double().cpu(), ref_entropy, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(max_logit.double().cpu(), ref_max, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["none", "bool", "additive", "key bool", "key additive"])
def test_nan_scores_read_nan_as_on_the_torch_path(kind):
    # a NaN query row (batch 0) and a NaN key every row may attend to (batch 1): those rows read NaN entropy and max
    # logit, never a clamped finite value, on both loops; batch 2's rows are untouched
    b, n_q, n_k, bad_key = 3, 2 * BLOCK + 3, 3 * BLOCK + 1, 2 * BLOCK + 5
    q, k = _qk(b, 2, 1, n_q, n_k, 16, seed=32)
    q[0, 0, 3, 0] = math.nan
    k[1, :, bad_key, 0] = math.nan
    g = torch.Generator().manual_seed(32)
    if kind.startswith("key"):
        mask = _key_mask(kind.split()[1], b, n_k)  # bad_key is allowed in batches 0 and 1
    elif kind == "bool":
        mask = (torch.rand(b, 1, n_q, n_k, generator=g) > 0.3).index_fill(-1, torch.tensor([bad_key]), True)
    elif kind == "additive":
        mask = torch.randn(b, 1, n_q, n_k, generator=g)
    else:
        mask = None
    mask = None if mask is None else mask.to(DEVICE)
    ref_entropy = _explicit(q, k, 0.5, attn_mask=mask)[0]
    assert ref_entropy[0, 0, 3].isnan() and ref_entropy[1].isnan().all() and ref_entropy[0, :, 4:].isfinite().all()
    for block_m in (BLOCK, 2 * BLOCK):
        _against_explicit(q, k, attn_mask=mask, block_m=block_m, atol=5e-5)
        rows = attention_entropy(q, k, scale=0.5, attn_mask=mask, backend="torch", return_n_keys=True)
        for got, expected in zip(rows, _explicit(q, k, 0.5, attn_mask=mask), strict=True):
            torch.testing.assert_close(got.double().cpu(), expected.double(), atol=5e-5, rtol=1e-5, equal_nan=True)
    finite_k = torch.nan_to_num(k)
    _against_explicit(q, finite_k, attn_mask=mask, is_causal=True, atol=5e-5)  # the NaN row on the causal loops


def test_a_nan_score_at_a_blocked_key_as_documented():
    # the torch path and the kernel's boolean masks select a blocked score away; an additive or key mask is added to
    # it (as eager attention and SDPA's math path add theirs), so a NaN there reads the row NaN in the kernel
    n_q, n_k = BLOCK + 3, 2 * BLOCK + 1
    q, k = _qk(1, 2, 1, n_q, n_k, 16, seed=33)
    k[..., 5, 0] = math.nan
    open_keys = torch.ones(n_k, dtype=torch.bool)
    open_keys[5] = False
    masks = {
        "bool per query": open_keys.expand(1, 1, n_q, n_k).contiguous(),
        "additive per query": torch.zeros(1, 1, n_q, n_k).masked_fill(~open_keys, -math.inf),
        "bool key mask": open_keys.view(1, 1, 1, n_k),
        "additive key mask": torch.zeros(1, 1, 1, n_k).masked_fill(~open_keys, -math.inf),
    }
    expected = _explicit(q, torch.nan_to_num(k), 0.5, attn_mask=masks["bool per query"].to(DEVICE))[0]
    assert expected.isfinite().all()
    for name, mask in masks.items():
        mask = mask.to(DEVICE)
        torch_rows = attention_entropy(q, k, scale=0.5, attn_mask=mask, backend="torch")[0]
        torch.testing.assert_close(torch_rows.double().cpu(), expected, atol=2e-5, rtol=1e-5)
        kernel_rows = attention_rows_triton(q, k, 0.5, False, mask, None, block_m=BLOCK, block_n=BLOCK)[0].cpu()
        if name.startswith("bool per query"):
            torch.testing.assert_close(kernel_rows.double(), expected, atol=2e-5, rtol=1e-5)
        else:
            assert kernel_rows.isnan().all(), name


def test_key_mask_entries_below_the_floor_are_held_at_it():
    # documented: an allowed additive entry below -5.9e37 counts as -5.9e37 (base-2 float32 headroom); only a row
    # whose every key is that low shows it, in its max logit - its entropy is that of near-equal logits as in fp64
    q, k = _qk(1, 1, 1, 3, 20, 16, seed=16)
    bias = torch.full((1, 1, 1, 20), -3.0e38, device=DEVICE)
    entropy, max_logit, n_keys = attention_rows_triton(q, k, 0.5, False, bias, None, block_m=BLOCK, block_n=BLOCK)
    assert n_keys.flatten().tolist() == [20, 20, 20]
    torch.testing.assert_close(entropy.cpu(), torch.full((1, 1, 3), math.log(20)), atol=1e-5, rtol=0)
    torch.testing.assert_close(max_logit.cpu(), torch.full((1, 1, 3), kernel_module.KEY_FLOOR * math.log(2)))


def test_a_plus_inf_mask_entry_reads_as_on_the_torch_path():
    # finite q and k, +inf in an additive mask at an allowed key: NaN entropy and +inf max logit in that row, as the
    # torch path (and the attention_entropy docs) read it; the other rows match the float64 torch reference
    q, k = _qk(1, 2, 1, BLOCK + 3, BLOCK + 5, 16, seed=41)
    mask = torch.zeros(1, 1, BLOCK + 3, BLOCK + 5)
    mask[0, 0, 2, BLOCK + 1] = math.inf
    mask = mask.to(DEVICE)
    entropy, max_logit, _ = _kernel(q, k, attn_mask=mask)
    torch_entropy, torch_max = attention_entropy(q, k, attn_mask=mask, backend="torch")
    for e, m in ((entropy, max_logit), (torch_entropy, torch_max)):
        assert e[0, :, 2].isnan().all() and (m[0, :, 2] == math.inf).all()
    _check(q, k, attn_mask=mask)
