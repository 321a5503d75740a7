"""A captured call's mask in parts (the model's mask by reference, padded query rows, a rule generated per key chunk)
gives exactly the rows of the dense mask it stands for: explicit float64 softmax over a mask built here by hand."""

import math

import pytest
import torch

from geomon.capture._patterns import AlignedRule, KeyTerms, ModuleMasks
from geomon.functional import attention_entropy
from tests.capture._reference import softmax_rows

H, DH = 2, 4


def _rows(q, k, backend="torch", **kwargs):
    return attention_entropy(q, k, backend=backend, return_n_keys=True, **kwargs)


def _check(q, k, allowed, rows=None, additive=None, **kwargs):
    """Rows of ``attention_entropy`` with ``kwargs`` against the explicit softmax over ``allowed`` [B, 1|H, Nq, Nk]."""
    entropy, max_logit, n_keys = _rows(q, k, **kwargs)
    expected_entropy, expected_max = softmax_rows(q, k, allowed=allowed, additive=additive)
    expected_keys = allowed.expand(q.shape[0], q.shape[1], -1, -1).sum(-1)
    if rows is not None:
        expected_entropy, expected_max, expected_keys = (x[..., rows] for x in (expected_entropy, expected_max,
                                                                              expected_keys))  # fmt: skip
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(max_logit.double(), expected_max, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(n_keys, expected_keys)


@pytest.mark.parametrize("n_q", [3, 7])
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize(("chunk_size", "backend"), [(2, "torch"), (None, "torch"), (None, "triton")])
def test_bottom_right_rule_with_key_padding_and_dropped_rows(n_q, window, chunk_size, backend):
    # the kernel takes the rule as a key range per row (causal offset Nk - Nq, window) with the key padding mask
    n_k, gen = 7, torch.Generator().manual_seed(n_q)
    q, k = torch.randn(2, H, n_q, DH, generator=gen), torch.randn(2, 1, n_k, DH, generator=gen)
    tokens = torch.ones(2, n_k, dtype=torch.bool)
    tokens[1, :3] = False  # left padding in the second sequence
    dropped = ~tokens[:, n_k - n_q :]
    i, j = torch.arange(n_q)[:, None] + n_k - n_q, torch.arange(n_k)[None, :]
    rule = j <= i
    if window is not None:
        rule &= (i - j).abs() < window
    allowed = rule[None, None] & tokens[:, None, None, :] & ~dropped[:, None, :, None]
    pattern = AlignedRule(n_q, n_k, True, window, None)
    key_mask = tokens[:, None, None, :]
    _check(q, k, allowed, attn_mask=key_mask, chunk_size=chunk_size, _pattern=pattern, _query_padding=dropped,
           backend=backend)  # fmt: skip
    index = torch.tensor([n_q - 1, 0, 1])
    _check(q, k, allowed, index, attn_mask=key_mask, chunk_size=chunk_size, query_index=index, _pattern=pattern,
           _query_padding=dropped, backend=backend)  # fmt: skip


def test_packed_sequences_rule():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, H, 6, DH, generator=gen), torch.randn(1, H, 6, DH, generator=gen)
    segments = torch.tensor([1, 1, 1, 2, 2, 3])
    allowed = (segments[:, None] == segments[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    _check(q, k, allowed[None, None], chunk_size=4, _pattern=AlignedRule(6, 6, True, None, segments))
    # the kernel takes each row's own sequence as its key range
    _check(q, k, allowed[None, None], backend="triton", _pattern=AlignedRule(6, 6, True, None, segments))
    window = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() < 2
    rule = AlignedRule(6, 6, True, 2, segments)
    _check(q, k, (allowed & window)[None, None], backend="triton", _pattern=rule)
    _check(q, k, (allowed & window)[None, None], chunk_size=4, _pattern=rule)
    # a sequence is a run of equal ids (an id seen again later starts a new sequence), on both paths
    runs = torch.tensor([1, 1, 2, 2, 1, 1])
    allowed = torch.block_diag(*[torch.ones(2, 2)] * 3).bool() & torch.ones(6, 6, dtype=torch.bool).tril()
    for backend in ("torch", "triton"):
        _check(q, k, allowed[None, None], backend=backend, _pattern=AlignedRule(6, 6, True, None, runs))
    # with fewer queries than keys (a cache) the sequences are not read per key: the torch path takes them
    with pytest.raises(RuntimeError, match="other than a key range"):
        _rows(q[..., 2:, :], k, backend="triton", _pattern=AlignedRule(4, 6, True, None, segments))


@pytest.mark.parametrize("extra", [0, 2])
def test_module_masks_combine_as_the_module_does(extra):
    """nn.MultiheadAttention semantics: boolean True = blocked, floats added; appended keys open to every row."""
    n, batch, gen = 5, 2, torch.Generator().manual_seed(extra)
    q, k = torch.randn(batch, H, n, DH, generator=gen), torch.randn(batch, H, n + extra, DH, generator=gen)
    attn = torch.randn(1, 1, n, n, generator=gen)
    padding = torch.tensor([[False] * n, [True, True] + [False] * (n - 2)]).view(batch, 1, 1, n)
    blocked = torch.rand(batch, H, n, n, generator=gen) < 0.3
    pad = torch.nn.functional.pad
    allowed = pad(~(padding | blocked), (0, extra), value=True)
    additive = pad(attn, (0, extra), value=0.0).masked_fill(~allowed, 0.0)
    pattern = ModuleMasks([attn, padding, blocked], n)
    _check(q, k, allowed, additive=additive, chunk_size=3, _pattern=pattern)
    expected = pad((padding | blocked).all(-2).all(-2).view(batch, n), (0, extra), value=False)
    assert torch.equal(pattern.padded_keys(batch, n + extra), expected)


def test_masked_at_blocks_additive_entries_at_or_below_it():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, H, 4, DH, generator=gen), torch.randn(1, H, 6, DH, generator=gen)
    mask = torch.randn(1, 1, 4, 6, generator=gen)
    mask[..., 0, :2] = -1e4
    mask[..., 1, 3] = -2e4
    mask[..., 2, :] = -1e4  # a row with no key left
    allowed = mask > -1e4
    _check(q, k, allowed, additive=mask.masked_fill(~allowed, 0.0), attn_mask=mask, chunk_size=4, _masked_at=-1e4)


def test_padded_rows_read_as_rows_without_keys_and_bad_padding_is_refused():
    q, k = torch.randn(2, H, 3, DH), torch.randn(2, H, 3, DH)
    padding = torch.tensor([[True, False, False], [False, False, True]])
    entropy, max_logit, n_keys = _rows(q, k, _query_padding=padding)
    drop = padding[:, None, :].expand(2, H, 3)
    assert entropy[drop].isnan().all() and max_logit[drop].isnan().all() and (n_keys[drop] == 0).all()
    assert (n_keys[~drop] == 3).all() and not entropy[~drop].isnan().any()
    with pytest.raises(ValueError, match="query_padding"):
        _rows(q, k, _query_padding=padding[:, :2])
    with pytest.raises(TypeError, match="query_padding"):
        _rows(q, k, _query_padding=padding.long())
    with pytest.raises(ValueError, match="is_causal"):
        _rows(q, k, is_causal=True, _pattern=AlignedRule(3, 3, True, None, None))
    with pytest.raises(ValueError, match="masked_at"):
        _rows(q, k, _masked_at=math.nan)


@pytest.mark.parametrize("chunk_size", [2, 5, 64])
def test_key_terms_with_a_zero_key_memory_keys_and_terms_of_each_width(chunk_size):
    """x-transformers' layout: a zero key and 2 memory keys first (rolled last when reported), a key-padding mask and
    a bias over all keys but the zero key, the previous layer's scores over all keys, a one-key mask broadcast, causal
    bottom-right; against a dense mask and bias written here over the module's key order, then rolled."""
    g = torch.Generator().manual_seed(3)
    n_q, zero, memory = 6, 1, 2
    n_k = n_q + zero + memory
    q, k = torch.randn(1, H, n_q, DH, generator=g), torch.randn(1, H, n_k, DH, generator=g)
    padding = torch.ones(1, 1, 1, n_k - zero, dtype=torch.bool)
    padding[..., -2:] = False  # the last two tokens are padding
    bias = torch.randn(1, H, n_q, n_k - zero, generator=g)
    previous = torch.randn(1, H, n_q, n_k, generator=g)
    every = torch.ones(1, 1, n_q, 1, dtype=torch.bool)  # one key, broadcast
    rule = KeyTerms(padding & every, [bias, previous], True, n_q, n_k, zero, zero + memory)
    # dense, in the module's key order: the zero key first, open, bias 0
    allowed = torch.cat([torch.ones(1, 1, 1, zero, dtype=torch.bool), padding], -1).expand(1, H, n_q, n_k)
    allowed = allowed & torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
    additive = torch.cat([torch.zeros(1, H, n_q, zero), bias], -1) + previous
    order = (torch.arange(n_k) + zero + memory) % n_k  # reported key c is the module's key order[c]
    _check(q, k[..., order, :], allowed[..., order], additive=additive[..., order], chunk_size=chunk_size,
           _pattern=rule)  # fmt: skip
    padded = rule.padded_keys(1, n_k)
    assert padded.tolist() == [[False] * (n_q - 2) + [True, True] + [False] * (zero + memory)]
    with pytest.raises(ValueError, match="a mask term of 4 keys for a call of 9 keys"):
        KeyTerms(None, [torch.zeros(1, 1, 1, 4)], False, n_q, n_k, zero, 0)
