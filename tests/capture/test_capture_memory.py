"""Capture memory at N = 8192: no mask of size N x N is built by geomon on the paths that used to build one.

Each case hands an adapter the tensors a model would pass at a sequence length of 8192 with left padding (the
model's own mask, if it has one, is made before measuring), runs geomon's capture (adapter, padding rule) and the
attention probe's metric update under ``torch.profiler`` with ``profile_memory=True``, and asserts that no single
allocation reached ``N·N/4`` bytes (one byte per element: a boolean ``N x N/4`` mask would be flagged). The metric's
score chunks are bounded by its chunk size (64 sampled query rows here: ``64 x 8192`` scores per head). The same
run shows no value read back to the host (``aten::_local_scalar_dense``), which on CUDA would be a sync."""

import pytest
import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from geomon.capture import hf, torch_mha
from geomon.capture._session import Session
from geomon.probes.attention import AttentionProbe

N, HEADS, DH, PAD = 8192, 2, 4, 1000
LIMIT = N * N // 4  # bytes


def _allocations(prof) -> list[int]:
    """The size of every allocation the profiler recorded (frees, recorded as negative sizes, left out)."""
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.alloc_size > 0:
            sizes.append(node.extra_fields.alloc_size)
    return sizes


def _left_tokens(batch: int) -> torch.Tensor:
    tokens = torch.ones(batch, N, dtype=torch.bool)
    tokens[0, :PAD] = False  # the first sequence is left-padded, the others are full
    return tokens


def _flash_2d():
    """Hugging Face's flash-style call: a [B, Nk] padding mask (1 = token), causal, through the interface wrapper."""
    module = nn.Module()
    module.is_causal = True
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, HEADS, N, DH, generator=gen), torch.randn(2, HEADS, N, DH, generator=gen)
    call = {"attention_mask": _left_tokens(2).long(), "scaling": None}
    return module, lambda session: hf._report(session, module, q, k, call, True)


def _eager_4d():
    """Hugging Face eager: the model's own additive [B, 1, N, N] mask (float16, the dtype's minimum)."""
    module = nn.Module()
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, HEADS, N, DH, generator=gen), torch.randn(1, HEADS, N, DH, generator=gen)
    mask = torch.zeros(1, 1, N, N, dtype=torch.float16)
    mask[..., :PAD] = torch.finfo(torch.float16).min  # left padding: no row attends the first PAD keys
    call = {"attention_mask": mask, "scaling": None}
    return module, lambda session: hf._report(session, module, q, k, call, False)


def _mha_key_padding():
    """``nn.MultiheadAttention`` called with a ``key_padding_mask`` (need_weights: Q/K recomputed by geomon)."""
    mha = nn.MultiheadAttention(HEADS * DH, HEADS, batch_first=True)
    x = torch.randn(2, N, HEADS * DH, generator=torch.Generator().manual_seed(2))
    kwargs = {"key_padding_mask": ~_left_tokens(2)}  # True = padding

    def run(session):
        session.guarded("", lambda: session.report_found("", torch_mha.mha_fallback(mha, (x, x, x), kwargs, None)))

    return mha, run


def _nested():
    """``nn.TransformerEncoderLayer``'s fused path on a nested tensor (two sequences, one PAD tokens shorter)."""
    layer = nn.TransformerEncoderLayer(HEADS * DH, HEADS, 16, batch_first=True).eval()
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(N - PAD, HEADS * DH, generator=gen), torch.randn(N, HEADS * DH, generator=gen)]
    src = torch.nested.nested_tensor(parts)

    def run(session):
        found = torch_mha.encoder_layer_fallback(layer, (src,), {}, None)
        session.guarded("", lambda: session.report_found("", found))

    return layer, run


def _bloom():
    """Bloom's attention module: ALiBi ``[B·H, 1, N]`` and the model's additive ``[B, 1, N, N]`` mask (Q/K recomputed
    by geomon from the module's input)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor

    from geomon.capture import hf_alibi

    config = transformers.BloomConfig(hidden_size=HEADS * DH, n_head=HEADS, n_layer=1)
    module = BloomAttention(config, layer_idx=0).eval()
    x = torch.randn(1, N, HEADS * DH, generator=torch.Generator().manual_seed(4))
    tokens = _left_tokens(1)
    alibi = build_alibi_tensor(tokens.long(), HEADS, torch.float32)
    mask = torch.zeros(1, 1, N, N)
    mask[..., :PAD] = torch.finfo(torch.float32).min

    def run(session):
        found = hf_alibi.bloom_fallback(module, (x, x, alibi, mask), {}, None)
        session.guarded("", lambda: session.report_found("", found))

    return module, run


def _mpt():
    """MPT's attention module: its position bias ``[H, 1, N]`` and the model's boolean ``[B, 1, N, N]`` mask (True =
    masked)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

    from geomon.capture import hf_alibi

    config = transformers.MptConfig(d_model=HEADS * DH, n_heads=HEADS, n_layers=1, max_seq_len=N)
    module = MptAttention(config, layer_idx=0).eval()
    x = torch.randn(1, N, HEADS * DH, generator=torch.Generator().manual_seed(5))
    bias = build_mpt_alibi_tensor(HEADS, N)
    mask = torch.zeros(1, 1, N, N, dtype=torch.bool)
    mask[..., :PAD] = True

    def run(session):
        found = hf_alibi.mpt_fallback(module, (x,), {"position_bias": bias, "attention_mask": mask}, None)
        session.guarded("", lambda: session.report_found("", found))

    return module, run


def _x_transformers():
    """An x-transformers ``Attend`` (causal, non-flash, with the zero key it adds itself) called with a ``[B, N]``
    padding mask and the model's own ``[H, N, N]`` position bias (float16 here, to keep the test's own memory down)."""
    attend = pytest.importorskip("x_transformers.attend")
    from geomon.capture import xtransformers

    module = attend.Attend(causal=True, add_zero_kv=True)
    xtransformers._LAYER_TYPE[module] = "a"  # a self-attention layer, as an Encoder / Decoder would record it
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, HEADS, N, DH, generator=gen), torch.randn(1, HEADS, N, DH, generator=gen)
    bias = -torch.arange(N, dtype=torch.float16).expand(HEADS, N, N).contiguous() / N  # made before measuring
    kwargs = {"mask": _left_tokens(1), "attn_bias": bias}

    def run(session):
        found = xtransformers.attend_fallback(module, (q, k, k), kwargs, None)
        session.guarded("", lambda: session.report_found("", found))

    return module, run


def _profiled(model, run):
    """``run(session)`` under the profiler, each reported call fed to an attention probe (64 sampled query rows,
    torch path, its state made before): the calls, the probe and the profile."""
    probe = AttentionProbe("attn", HEADS, backend="torch", query_rows=64)
    probe.allocate(torch.device("cpu"))  # the metric's state, made once before the first measured step
    calls = []

    def on_attention(call):
        calls.append(call)
        probe.update(call)

    session = Session(model, on_attention, strict=True)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(session)
    return calls, probe, prof


@pytest.mark.parametrize("case", [_flash_2d, _eager_4d, _mha_key_padding, _nested, _bloom, _mpt, _x_transformers])
def test_no_allocation_of_n_squared_over_4_bytes_in_capture_and_update(case):
    calls, probe, prof = _profiled(*case())
    assert len(calls) == 1 and calls[0].q.shape[-2] == N
    sizes = _allocations(prof)
    assert sizes, "the profiler recorded no allocation: nothing was measured"
    assert max(sizes) < LIMIT, f"geomon allocated {max(sizes)} bytes at N = {N} (limit N*N/4 = {LIMIT})"
    # no host sync either: .item(), bool(tensor), int(tensor) all read a device value through this op
    assert not [e for e in prof.events() if e.name == "aten::_local_scalar_dense"], "capture read a value back"
    # the rows measured are the real ones: the padded rows of the left-padded sequence are left out
    stats = probe.metric._stats()
    sampled = torch.linspace(0, N - 1, 64).round().long()
    padded = sampled >= N - PAD if case is _nested else sampled < PAD  # a nested tensor's padding is its tail
    batch = calls[0].q.shape[0]
    assert int(stats.count.sum()) == HEADS * (64 * batch - int(padded.sum()))


def test_a_boolean_mask_eager_adds_is_read_per_chunk_without_a_float_copy():
    """A user's boolean ``[B, 1, N, N]`` mask reaching Hugging Face eager is added by the model as 1 / 0 (it masks
    nothing): geomon reads it so, one key chunk at a time, with no float copy of it (which would be 4·N·N bytes),
    no host read, and every sampled row counted."""
    module = nn.Module()
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, HEADS, N, DH, generator=gen), torch.randn(1, HEADS, N, DH, generator=gen)
    mask = torch.ones(1, 1, N, N, dtype=torch.bool)
    mask[..., :PAD] = False  # would be padding if it masked; eager adds 0 there and 1 elsewhere
    call = {"attention_mask": mask, "scaling": None}
    calls, probe, prof = _profiled(module, lambda session: hf._report(session, module, q, k, call, False))
    assert len(calls) == 1 and calls[0].attn_mask is None
    sizes = _allocations(prof)
    assert sizes and max(sizes) < LIMIT, f"geomon allocated {max(sizes)} bytes at N = {N} (limit {LIMIT})"
    assert not [e for e in prof.events() if e.name == "aten::_local_scalar_dense"], "capture read a value back"
    assert int(probe.metric._stats().count.sum()) == HEADS * 64
