"""Tokens of a packed flash call that belong to no sequence: transformers' flash path computes only the tokens between
``cu_seq_lens_q[0]`` and ``cu_seq_lens_q[-1]``, and cuts ``position_ids`` into sequences from each minimum, so the
tokens before the first minimum (a row that starts mid-sequence) or past the last bound (a packed row padded after
packing) have no output row there; geomon leaves their query rows out. Reference: transformers' own
``prepare_fa_kwargs_from_position_ids`` for where the sequences are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geomon.capture.hf import interface_mask

flash_utils = pytest.importorskip("transformers.modeling_flash_attention_utils")


def _causal_module() -> nn.Module:
    module = nn.Module()
    module.is_causal = True
    return module


def _call(n: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, 2, n, 4), torch.zeros(batch, 2, n, 4)


def _in_sequences(bounds: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` True at the tokens inside ``[bounds[0], bounds[-1])``: those flash computes."""
    index = torch.arange(n)
    return (index >= bounds[0]) & (index < bounds[-1])


@pytest.mark.parametrize("positions", [[5, 6, 7, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3], [3, 0, 1, 0, 1, 2]])
def test_tokens_before_the_first_sequence_are_left_out(positions):
    """Only the tokens transformers' cut places in a sequence are measured, each against its own sequence's keys."""
    ids = torch.tensor([positions])
    (bounds, _), _ = flash_utils.prepare_fa_kwargs_from_position_ids(ids)
    n = len(positions)
    mask = interface_mask(_causal_module(), *_call(n), None, {"position_ids": ids})
    assert torch.equal(mask.dropped[0], ~_in_sequences(bounds.long(), n))
    allowed = mask.pattern(torch.arange(n), 0, n)
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):  # causal within each sequence
        expected = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
        assert torch.equal(allowed[start:stop, start:stop], expected)
        assert not allowed[start:stop, :start].any() and not allowed[start:stop, stop:].any()


def test_tokens_past_the_last_varlen_bound_are_left_out():
    """A packed row padded after packing: ``cu_seq_lens_q = [0, 4, 10]`` over 12 tokens; tokens 10 and 11 are in no
    sequence."""
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 6, "max_length_k": 6}
    mask = interface_mask(_causal_module(), *_call(12), None, kwargs)
    assert torch.equal(mask.dropped[0], ~_in_sequences(cu.long(), 12))
    allowed = mask.pattern(torch.arange(12), 0, 12)
    assert not allowed[4:10, :4].any() and allowed[4:10, 4:10].equal(torch.ones(6, 6, dtype=torch.bool).tril())


def test_varlen_arguments_over_several_rows_are_refused_with_a_reason():
    """transformers flattens a batch of several rows into one packed sequence list under the varlen arguments:
    geomon does not read that and says so, instead of measuring each row as one causal sequence."""
    cu = torch.tensor([0, 3, 6, 12], dtype=torch.int32)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 6, "max_length_k": 6}
    with pytest.raises(ValueError, match=r"varlen arguments .* batch of 2 rows"):
        interface_mask(_causal_module(), *_call(6, batch=2), None, kwargs)
