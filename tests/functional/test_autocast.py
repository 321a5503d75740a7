"""geomon computes in at least float32 also inside the model's ``torch.autocast`` region (its probes run in forward
hooks under bf16-mixed training): autocast must not turn geomon's own float32 products into bfloat16 ones."""

import math

import pytest
import torch

from geomon.functional import attention_entropy
from geomon.functional._class_tiles import tiled_argmax


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(2, 4, 9, 8, generator=g)).to(dtype)
    k = (3 * torch.randn(2, 2, 9, 8, generator=g)).to(dtype)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(torch.rand(2, 1, 9, 9, generator=g) < 0.3, -math.inf)
    additive[..., 0] = 0.0  # every row keeps a key
    return q, k, additive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mask", ["none", "causal", "additive"])
def test_attention_entropy_inside_cpu_autocast_equals_outside(dtype, mask):
    q, k, additive = _inputs(dtype)
    kwargs = {"causal": {"is_causal": True}, "additive": {"attn_mask": additive}, "none": {}}[mask]
    expected = attention_entropy(q, k, backend="torch", **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = attention_entropy(q, k, backend="torch", **kwargs)
    for a, b in zip(inside, expected, strict=True):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)  # before the fix: max logits on the bfloat16 grid, entropies 1e-2 off


def test_attention_entropy_inside_autocast_matches_a_float64_softmax():
    q, k, _ = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        entropy, max_logit = attention_entropy(q, k, backend="torch")
    scores = (q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(8)
    p = scores.softmax(-1)
    torch.testing.assert_close(entropy.double(), -torch.special.xlogy(p, p).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(max_logit.double(), scores.amax(-1), rtol=1e-5, atol=1e-5)


def test_nc4_decision_inside_autocast_is_the_float32_argmax():
    # 1 + 2**-10 rounds to 1 in bfloat16: in bfloat16 the two classes tie (argmax 0); in float32 class 1 wins.
    features = torch.tensor([[1.0, 1.0 + 2**-10], [1.0 + 2**-10, 1.0]])
    rows, offset = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2)
    expected = (features.double() @ rows.double().T).argmax(1)
    assert expected.tolist() == [1, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tiled_argmax(features, rows, offset, backend="torch").tolist() == expected.tolist()
