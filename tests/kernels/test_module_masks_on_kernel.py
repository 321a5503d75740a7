"""Module masks and per-key biases (ALiBi) on the fused kernel: the patterns the capture generates for
``nn.MultiheadAttention``, Bloom and MPT, split into one stored per-score mask plus a key bias, against a dense float64
softmax built here from the raw mask tensors in the module's own semantics."""

import math

import pytest
import torch

from geomon.capture._patterns import KeyTerms, ModuleMasks
from geomon.functional.attention_entropy import _attention_rows
from geomon.kernels import attention_entropy as kernel_module
from tests.kernels.conftest import DEVICE

MASKED_AT = -1e4  # the capture's padding rule: additive sums at or below it block their key
B, H, N, DH = 2, 4, 37, 16


@pytest.fixture(autouse=True, params=["launch tiles", "16 x 16 tiles"])
def tiles(request, monkeypatch):
    """Each test with the tiles a launch picks (one tile here) and with 16 x 16 tiles, whose edges fall inside the
    sequences, the padding and the key-bias rows."""
    if request.param == "16 x 16 tiles":
        small = kernel_module.TileConfig(16, 16, 4, 2)
        monkeypatch.setattr(kernel_module, "MASKED", small)
        monkeypatch.setattr(kernel_module, "CONFIGS", {key: small for key in kernel_module.CONFIGS})


def _qk(seed, n_k=N, kv_heads=H, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, DH, generator=g) * 2).to(DEVICE, dtype)
    k = torch.randn(B, kv_heads, n_k, DH, generator=g).to(DEVICE, dtype)
    return q, k


def _alibi(n_k, sign=-1.0):
    """``[1, H, 1, Nk]`` per-key ALiBi: slope_h · j (Bloom, sign +1) or slope_h · (j - Nk + 1) (MPT, sign -1)."""
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    j = torch.arange(n_k, dtype=torch.float32)
    position = j if sign > 0 else j - (n_k - 1)
    return (slopes[:, None] * position[None, :]).view(1, H, 1, n_k)


def _padding(n_k, lengths=(N, N - 9)):
    """``[B, 1, 1, Nk]`` True at the padded tail of each sequence (module semantics)."""
    return (torch.arange(n_k)[None, :] >= torch.tensor(lengths)[:, None]).view(B, 1, 1, n_k)


def _dense_reference(q, k, scale, terms, sdpa_mask=None):
    """Per-row (entropy, max logit, key count) from an explicit float64 softmax. ``terms`` are in the module's
    semantics (boolean True = blocked, floats added); their additive sum at or below ``MASKED_AT`` blocks the key.
    ``sdpa_mask``: a further mask in SDPA semantics (True = may attend; additive, blocked at or below ``MASKED_AT``)."""
    group = q.shape[1] // k.shape[1]
    scores = scale * q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)
    shape = scores.shape
    blocked = torch.zeros(shape, dtype=torch.bool)
    added = torch.zeros(shape, dtype=torch.float64)
    any_added = False
    for term in terms:
        term = term.cpu().expand(shape[0], shape[1], shape[2], term.shape[-1])
        wide = torch.zeros(shape, dtype=term.dtype if term.dtype != torch.bool else torch.bool)
        wide[..., : term.shape[-1]] = term  # keys past the terms (bias_k) stay open, bias 0
        if term.dtype == torch.bool:
            blocked |= wide
        else:
            added += wide.double()
            any_added = True
    if any_added:
        blocked |= added <= MASKED_AT
    if sdpa_mask is not None:
        m = sdpa_mask.cpu().expand(shape)
        if m.dtype == torch.bool:
            blocked |= ~m
        else:
            blocked |= m.double() <= MASKED_AT
            added = added + m.double()
    scores = (scores.cpu() + added).masked_fill(blocked, -math.inf)
    n_keys = (~blocked).sum(-1)
    p = torch.softmax(scores, -1)
    entropy = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)
    max_logit = scores.amax(-1)
    entropy[n_keys == 0] = math.nan
    max_logit[n_keys == 0] = math.nan
    return entropy, max_logit, n_keys


def _check(q, k, terms, n_k_module=None, sdpa_mask=None, query_index=None, atol=2e-5):
    pattern = ModuleMasks(terms, n_k_module or k.shape[2])
    scale = 1 / math.sqrt(DH)
    rows = {}
    for backend in ("triton", "torch"):  # "triton" raises if the pattern does not go to the kernel
        rows[backend] = _attention_rows(
            q, k, scale=scale, attn_mask=sdpa_mask, query_index=query_index, backend=backend, masked_at=MASKED_AT,
            pattern=pattern,
        )  # fmt: skip
    expected = _dense_reference(q, k, scale, terms, sdpa_mask)
    if query_index is not None:
        expected = [t[:, :, query_index.cpu()] for t in expected]
    for backend, (entropy, max_logit, n_keys) in rows.items():
        assert torch.equal(n_keys.cpu(), expected[2]), backend
        torch.testing.assert_close(entropy.double().cpu(), expected[0], atol=atol, rtol=0, equal_nan=True)
        torch.testing.assert_close(max_logit.double().cpu(), expected[1], atol=atol, rtol=1e-5, equal_nan=True)
    return expected


def _causal_blocked(n_k=N):
    return torch.ones(N, n_k, dtype=torch.bool).triu(1 + n_k - N).view(1, 1, N, n_k)


def test_mpt_alibi_beside_its_boolean_causal_mask():
    q, k = _qk(1)
    mask = (_causal_blocked() | _padding(N)).to(DEVICE)  # [B, 1, N, N], True = may not attend
    expected = _check(q, k, [_alibi(N).to(DEVICE), mask])
    assert bool((expected[2][1, :, -1] == N - 9).all())  # the padded sequence's last row sees its 28 real keys
    _check(q, k, [_alibi(N).to(DEVICE), mask], query_index=torch.tensor([36, 0, 17, 30, 17], device=DEVICE))


def test_bloom_alibi_beside_its_additive_4d_mask():
    q, k = _qk(2)
    additive = torch.zeros(B, 1, N, N).masked_fill(_causal_blocked() | _padding(N), torch.finfo(torch.float32).min)
    _check(q, k, [(_alibi(N, sign=1.0).expand(B, H, 1, N)).to(DEVICE)], sdpa_mask=(additive == 0).to(DEVICE))
    _check(q, k, [(_alibi(N, sign=1.0).expand(B, H, 1, N)).to(DEVICE)], sdpa_mask=additive.to(DEVICE))


@pytest.mark.parametrize("row_kind", ["bool", "float"])
@pytest.mark.parametrize("key_kind", ["bool", "float"])
def test_multihead_attention_masks_with_key_padding(row_kind, key_kind):
    q, k = _qk(3)
    row = _causal_blocked()
    if row_kind == "float":  # -inf above the diagonal, small finite values below
        row = torch.randn(1, 1, N, N, generator=torch.Generator().manual_seed(4)).masked_fill(row, -math.inf)
    keys = _padding(N)
    if key_kind == "float":
        keys = torch.zeros(B, 1, 1, N).masked_fill(keys, -math.inf)
        keys[0, ..., 5] = -2.5  # a finite additive key term
    terms = [row.to(DEVICE), keys.to(DEVICE)]
    if row_kind == "float" and key_kind == "float":  # the module compares their sum: not split, the torch path
        with pytest.raises(RuntimeError, match="torch path"):
            _check(q, k, terms)
        return
    _check(q, k, terms)


def test_per_key_terms_alone_become_one_key_mask_with_grouped_heads_and_sampled_queries():
    q, k = _qk(5, kv_heads=2)
    keys = torch.zeros(B, 1, 1, N).masked_fill(_padding(N), -1e9)  # below masked_at: blocked
    keys[1, ..., 3] = -9000.0  # above it: a finite bias
    _check(q, k, [_alibi(N).to(DEVICE), keys.to(DEVICE)], query_index=torch.tensor([0, 5, 36, 17], device=DEVICE))
    # a key-padding mask in SDPA semantics passed beside a per-key pattern: merged into the same key mask
    _check(q, k, [_alibi(N).to(DEVICE)], sdpa_mask=~_padding(N).to(DEVICE))


def test_keys_past_the_module_masks_stay_open():
    q, k = _qk(6, n_k=N + 2)  # bias_k and add_zero_attn keys appended after the module's N keys
    _check(q, k, [_alibi(N).to(DEVICE), _padding(N).to(DEVICE)], n_k_module=N)
    with pytest.raises(RuntimeError, match="torch path"):  # a per-score term cannot cover them in place
        _check(q, k, [_causal_blocked().to(DEVICE)], n_k_module=N)


def test_two_per_score_masks_stay_on_the_torch_path():
    q, k = _qk(7)
    with pytest.raises(RuntimeError, match="torch path"):
        _check(q, k, [_causal_blocked().to(DEVICE)], sdpa_mask=torch.ones(N, N, dtype=torch.bool, device=DEVICE))


def test_a_row_with_no_key_and_half_precision_inputs():
    q, k = _qk(8, dtype=torch.bfloat16)
    mask = _causal_blocked().expand(B, 1, N, N).clone()
    mask[0, 0, 4] = True  # a row that may attend nowhere: NaN, no key
    _check(q, k, [_alibi(N).to(DEVICE), mask.to(DEVICE)], atol=2e-4)


@pytest.mark.parametrize("row", ["allowed per score", "bias per score"])
def test_x_transformers_terms_with_the_causal_rule_bottom_right(row):
    """``Attend``'s terms (SDPA semantics: True = may attend, floats added) beside its causal flag, with fewer queries
    than keys (a cache: the rule aligned bottom-right)."""
    g = torch.Generator().manual_seed(9)
    n_q = N - 6
    q = (torch.randn(B, H, n_q, DH, generator=g) * 2).to(DEVICE)
    k = torch.randn(B, H, N, DH, generator=g).to(DEVICE)
    padding = ~_padding(N)  # True = may attend
    if row == "allowed per score":
        allowed = padding & (torch.rand(B, 1, n_q, N, generator=g) < 0.8)
        additive = [_alibi(N), torch.randn(1, H, 1, N, generator=g)]  # per-key terms: summed into the key bias
    else:
        allowed = padding
        additive = [torch.randn(1, H, n_q, N, generator=g)]  # a T5-style relative bias, per score
    pattern = KeyTerms(allowed.to(DEVICE), [t.to(DEVICE) for t in additive], True, n_q, N, 0, 0)
    scale = 1 / math.sqrt(DH)
    expected_mask = torch.zeros(B, H, n_q, N, dtype=torch.float64)
    for term in additive:
        expected_mask = expected_mask + term.double()
    causal = torch.arange(N)[None, :] <= torch.arange(n_q)[:, None] + (N - n_q)
    blocked = ~(allowed & causal) | (expected_mask <= MASKED_AT)
    scores = (scale * q.double().cpu() @ k.double().cpu().transpose(-1, -2) + expected_mask).masked_fill(
        blocked, -math.inf
    )
    p = torch.softmax(scores, -1)
    expected = (-torch.where(p > 0, p * p.log(), 0.0).sum(-1), scores.amax(-1), (~blocked).sum(-1))
    for backend in ("triton", "torch"):
        entropy, max_logit, n_keys = _attention_rows(q, k, scale=scale, backend=backend, masked_at=MASKED_AT,
                                                     pattern=pattern)  # fmt: skip
        assert torch.equal(n_keys.cpu(), expected[2]), backend
        torch.testing.assert_close(entropy.double().cpu(), expected[0], atol=2e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(max_logit.double().cpu(), expected[1], atol=2e-5, rtol=1e-5, equal_nan=True)


def test_nan_keys_beside_a_key_bias():
    """A NaN key at an allowed position makes the rows that see it NaN on both paths; at a key every row blocks, a
    boolean mask (MPT, nn.MultiheadAttention) keeps it out on both paths."""
    q, k = _qk(10)
    k[1, :, N - 2] = float("nan")  # a padded key of the second sequence (blocked for all its rows)
    k[0, :, 3] = float("nan")  # an allowed key of the first sequence, seen by its rows 3.. under the causal rule
    mask = (_causal_blocked() | _padding(N)).to(DEVICE)
    pattern = ModuleMasks([_alibi(N).to(DEVICE), mask], N)
    for backend in ("triton", "torch"):
        entropy, max_logit, _ = _attention_rows(q, k, backend=backend, masked_at=MASKED_AT, pattern=pattern)
        nan_rows = entropy.isnan()
        assert bool(nan_rows[0, :, 3:].all()) and not bool(nan_rows[0, :, :3].any()), backend
        assert bool(max_logit[0, :, 3:].isnan().all()), backend
        assert not bool(nan_rows[1].any()), backend  # the blocked NaN key is ignored
