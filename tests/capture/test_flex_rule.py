"""Flex attention's ``BlockMask`` read chunk by chunk (``FlexRule``), never as an ``Nq x Nk`` tensor. References:
flex's own eager probabilities (``flex_attention`` with the identity as values returns them), block layouts written
out by loops here, and a Hugging Face Llama whose registered attention function runs eager flex with the
``BlockMask`` its flex mask function built."""

import warnings

import pytest
import torch

flex = pytest.importorskip("torch.nn.attention.flex_attention")

from geomon.capture._patterns import FlexRule  # noqa: E402
from geomon.functional import attention_entropy  # noqa: E402
from tests.capture._reference import assert_rows_close, collect, entropy_of, rows_of  # noqa: E402


def _flex_probabilities(q, k, block_mask, scale=None):
    """Flex's own attention probabilities ``[B, H, Nq, Nk]``: its output with the identity as the values."""
    eye = torch.eye(k.shape[2], dtype=q.dtype).expand(*k.shape[:2], -1, -1).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is not compiled
        return flex.flex_attention(q, k, eye, block_mask=block_mask, scale=scale)


def _materialise(rule, positions, n_k, chunk):
    """The rule's rows at ``positions`` over every key, joined from chunks (test side only)."""
    return torch.cat([rule(positions, start, min(start + chunk, n_k)) for start in range(0, n_k, chunk)], dim=-1)


def _lengths_mask(lengths):
    def mask_mod(b, h, q, kv):
        # causal, key padding per batch entry, and head 0 also sees every third key that other heads may not
        return (q >= kv) & (kv < lengths[b]) & ((kv % 3 != 0) | (h == 0))

    return mask_mod


@pytest.mark.parametrize("chunk", [64, 128, 333])
def test_flex_rule_allows_exactly_what_flex_attends_to(chunk):
    batch, heads, n, dim = 2, 3, 300, 8
    mask_mod = _lengths_mask(torch.tensor([300, 170]))
    block_mask = flex.create_block_mask(mask_mod, batch, heads, n, n, device="cpu")
    generator = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(batch, heads, n, dim, generator=generator),
        torch.randn(batch, heads, n, dim, generator=generator),
    )
    probs = _flex_probabilities(q, k, block_mask)
    rule = FlexRule(block_mask, batch, heads, n, n)
    positions = torch.tensor([0, 5, 127, 128, 200, 299])
    allowed = _materialise(rule, positions, n, chunk)
    assert allowed.shape == (batch, heads, positions.numel(), n)
    assert torch.equal(allowed, probs[:, :, positions] > 0)
    # the entropy through the metric's torch path equals that of flex's probabilities, every row and a subset
    entropy, _, n_keys = attention_entropy(q, k, backend="torch", return_n_keys=True, chunk_size=chunk, _pattern=rule)
    attends = n_keys > 0  # heads 1 and 2 block key 0, so their row 0 sees no key: flex returns zeros, geomon NaN
    assert attends.all(-1).any() and not attends.all()
    assert_rows_close(entropy, entropy_of(probs), attends)
    assert entropy[~attends].isnan().all()
    assert torch.equal(n_keys, (probs > 0).sum(-1))
    subset, _ = attention_entropy(q, k, backend="torch", query_index=positions, chunk_size=chunk, _pattern=rule)
    assert_rows_close(subset, entropy_of(probs[:, :, positions]), attends[:, :, positions])


def test_flex_rule_follows_the_block_tables_and_keeps_only_them():
    """A block-sparse mask built from its tables (``mask_mod`` allows all): full blocks attend everywhere, partial
    ones where ``mask_mod`` allows, unlisted ones nowhere. (Eager flex ignores the tables; its compiled kernels, which
    train models, read them: the expectation is written from the tables.)"""
    n, block = 300, 128
    counts = torch.tensor([[[1, 1, 2]]])  # query block 0 lists key block 0; 1 lists 1; 2 lists 0 and 2
    indices = torch.tensor([[[[0, 1, 2], [1, 0, 2], [0, 2, 1]]]])
    full_counts = torch.tensor([[[0, 1, 0]]])  # query block 1 also has key block 2 full
    full_indices = torch.tensor([[[[0, 0, 0], [2, 0, 0], [0, 0, 0]]]])

    def odd_keys(b, h, q, kv):
        return kv % 2 == 1

    block_mask = flex.BlockMask.from_kv_blocks(
        counts, indices, full_counts, full_indices, BLOCK_SIZE=block, mask_mod=odd_keys, seq_lengths=(n, n)
    )
    rule = FlexRule(block_mask, 2, 2, n, n)
    positions = torch.arange(n)
    allowed = _materialise(rule, positions, n, 100)
    expected = torch.zeros(n, n, dtype=torch.bool)
    partial = {0: [0], 1: [1], 2: [0, 2]}
    for q in range(n):
        for kv in range(n):
            q_block, kv_block = q // block, kv // block
            if q_block == 1 and kv_block == 2:
                expected[q, kv] = True
            elif kv_block in partial[q_block]:
                expected[q, kv] = kv % 2 == 1
    assert torch.equal(allowed, expected.expand(2, 2, n, n))
    tables = [rule.partial] + ([rule.full] if rule.full is not None else [])
    assert all(table.numel() == 1 * 1 * 3 * 3 for table in tables)  # B·H·Qblocks·KVblocks, not B·H·Nq·Nk


def test_flex_rule_passes_the_calls_own_batch_and_head_to_a_broadcast_mask():
    """A BlockMask made with B = H = 1 (``create_block_mask(..., None, None, ...)``) is broadcast by flex, but its
    ``mask_mod`` is called with each row's own batch and head index."""
    n = 40
    mask_mod = _lengths_mask(torch.tensor([40, 17]))
    block_mask = flex.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, n, n, device="cpu")
    block_mask.mask_mod = mask_mod  # the tables of plain causality (a superset), the finer rule per row
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, n, 8, generator=generator), torch.randn(2, 3, n, 8, generator=generator)
    allowed = _materialise(FlexRule(block_mask, 2, 3, n, n), torch.arange(n), n, 16)
    assert torch.equal(allowed, _flex_probabilities(q, k, block_mask) > 0)
    assert not torch.equal(allowed[0], allowed[1]) and not torch.equal(allowed[:, 0], allowed[:, 1])


@pytest.mark.parametrize("lengths", [[40, 17], [40, 40], [5, 33]])
def test_padded_keys_read_on_the_diagonal_equal_the_keys_no_row_sees(lengths):
    """Causal with key padding per batch entry (a real token sees itself): the keys the rule reports as padding
    from the diagonal are exactly those that no query row of any head may attend to."""
    n = 40
    mask_mod = _lengths_mask(torch.tensor(lengths))
    block_mask = flex.create_block_mask(mask_mod, 2, 3, n, n, device="cpu", BLOCK_SIZE=16)
    rule = FlexRule(block_mask, 2, 3, n, n)
    nobody = ~_materialise(rule, torch.arange(n), n, 7).any(-2).any(-2)  # test side: the full mask
    assert torch.equal(rule.padded_keys(2, n), nobody)
    assert torch.equal(nobody, torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None])


def test_block_masks_whose_blocks_cover_the_call_are_read_and_others_refused():
    full = flex.create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 64, 64, device="cpu")
    with pytest.raises(ValueError, match="cover 128 queries x 128 keys cannot mask 129 queries x 129 keys"):
        FlexRule(full, 1, 1, 129, 129)
    allowed = _materialise(FlexRule(full, 1, 1, 100, 100), torch.arange(100), 100, 32)  # within the one block
    assert torch.equal(allowed[0, 0], torch.ones(100, 100, dtype=torch.bool).tril())
    # one block spanning everything (the shape of flex's own no-op mask): every key open
    noop = flex.BlockMask.from_kv_blocks(torch.ones(1, 1, 1, dtype=torch.int32),
                                         torch.zeros(1, 1, 1, 1, dtype=torch.int32), BLOCK_SIZE=1 << 30,
                                         seq_lengths=(1, 1))  # fmt: skip
    assert _materialise(FlexRule(noop, 2, 2, 50, 50), torch.arange(50), 50, 20).all()


def test_hf_llama_through_an_eager_flex_function_logs_flex_own_entropies():
    """A Llama whose registered attention function runs eager flex with the BlockMask HF's flex mask function
    built (left and right padding, grouped-query heads): the captured rows equal flex's own probabilities."""
    transformers = pytest.importorskip("transformers")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    name, seen = "geomon_test_flex_eager", []

    def eager_flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex.flex_attention(query, key, value, block_mask=attention_mask, scale=scaling)
        seen.append(_flex_probabilities(query, key, attention_mask, scale=scaling))
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, eager_flex)
    AttentionMaskInterface.register(name, flex_attention_mask)
    try:
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=100)  # fmt: skip
        config._attn_implementation = name
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, 6:] = 0  # right padding
        mask[2, :3] = 0  # left padding
        with torch.no_grad():
            calls, _ = collect(model, lambda: model(ids, attention_mask=mask))
    finally:
        for interface in (AttentionInterface, AttentionMaskInterface):
            interface._global_mapping.pop(name, None)
    assert [c.module for c in calls] == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert len(seen) == 2
    real = mask.bool()[:, None, :].expand(3, 4, 9)  # padded query rows are left out, as on every other path
    for call, probs in zip(calls, seen, strict=True):
        assert call.attn_mask is None and isinstance(call.pattern, FlexRule)  # nothing Nq x Nk was built
        assert torch.equal(call.query_padding, ~mask.bool())
        entropy, _, n_keys = rows_of(call)
        assert_rows_close(entropy, entropy_of(probs), real)
        assert entropy[~real].isnan().all()
        assert torch.equal(n_keys[real], (probs > 0).sum(-1)[real])
