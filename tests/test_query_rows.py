"""The default number of attention query rows (``query_rows="auto"``): the 2% FLOP rule and its floor, and the probe
that uses it."""

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from geomon import Monitor, keys
from geomon._guard import Guard
from geomon._tiny_gpt import Block
from geomon.capture import AttentionCall
from geomon.probes import AttentionProbe
from geomon.probes.attention import MIN_QUERY_ROWS, auto_query_rows
from geomon.probes.base import Context, Values

SHARE = Fraction(2, 100)


def forward_flops(n_q: int, n_k: int, d: int, layers: int) -> int:
    """A transformer's forward (matrix products, 2 FLOPs per multiply-add): per layer Q/K/V/output projections and a
    4x MLP over the ``n_q`` query positions, ``QKᵀ`` and ``PV`` over ``n_q x n_k`` pairs."""
    return layers * (2 * n_q * d * 3 * d + 2 * n_q * d * d + 2 * 2 * n_q * d * 4 * d + 2 * 2 * n_q * n_k * d)


def entropy_flops(rows: int, n_k: int, d: int, layers: int) -> int:
    """The logits the entropy recomputes: ``rows`` queries of every head (``H·Dh = d``) against ``n_k`` keys."""
    return layers * 2 * rows * n_k * d


def within_budget(rows: int, n_q: int, n_k: int, d: int, layers: int) -> bool:
    return entropy_flops(rows, n_k, d, layers) < SHARE * forward_flops(n_q, n_k, d, layers)


GRID = [(n, d, layers) for n in (1, 64, 128, 129, 256, 1000, 1024, 4096, 8192, 32768, 131072)
        for d in (64, 128, 512, 768, 4096) for layers in (1, 12, 48)]  # fmt: skip


@pytest.mark.parametrize(("n", "d", "layers"), GRID)
def test_auto_rows_keep_the_entropy_under_two_percent_of_the_forward_above_the_floor(n, d, layers):
    rows = auto_query_rows(n, n, d)
    assert 1 <= rows <= n
    if n <= MIN_QUERY_ROWS:
        assert rows == n  # short sequences are measured in full
        return
    assert rows >= MIN_QUERY_ROWS
    if rows > MIN_QUERY_ROWS:  # the FLOP rule decides: within 2% of the whole model's forward
        assert within_budget(rows, n, n, d, layers)
    if rows < n:  # and it takes as many rows as the budget allows: one more would break it
        assert not within_budget(rows + 1, n, n, d, layers)


@pytest.mark.parametrize(("n_q", "n_k"), [(200, 50), (200, 5000), (1024, 77), (300, 4096), (129, 10**6)])
@pytest.mark.parametrize("d", [64, 1024])
def test_auto_rows_of_cross_attention_obey_the_same_budget(n_q, n_k, d):
    rows = auto_query_rows(n_q, n_k, d)
    assert MIN_QUERY_ROWS <= rows <= n_q
    if rows > MIN_QUERY_ROWS:
        assert within_budget(rows, n_q, n_k, d, 1)
    if rows < n_q:
        assert not within_budget(rows + 1, n_q, n_k, d, 1)


def test_auto_rows_at_gpt2_small_widths():
    # 0.24 d + 0.04 N at d = 768: 194.56 at N = 256, 225.28 at 1024, exactly 512 at 8192 (strictly below: 511)
    assert [auto_query_rows(n, n, 768) for n in (100, 256, 1024, 8192)] == [100, 194, 225, 511]
    assert auto_query_rows(512, 512, 128) == MIN_QUERY_ROWS  # 0.24 * 128 + 0.04 * 512 = 51.2: the floor


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None, "8"])
def test_auto_rows_reject_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        auto_query_rows(bad, 10, 10)


def test_the_forward_formula_is_what_torch_counts_for_a_transformer_block():
    """The rule's forward FLOPs, 24·N·d² + 4·N²·d per layer, against torch's FLOP counter on a real block (math SDPA:
    its two batched products are counted)."""
    n, d, heads = 48, 32, 4
    block = Block(d, heads)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        block(torch.randn(1, n, d))
    assert counter.get_total_flops() == forward_flops(n, n, d, 1)


def _entropy_of_rows(q: torch.Tensor, k: torch.Tensor, rows: np.ndarray) -> float:
    """Mean entropy (nats) over batch, heads and the given query rows: explicit float64 softmax."""
    scores = q.double()[:, :, rows] @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    p = torch.softmax(scores, dim=-1)
    return float(-(p * torch.log(p)).sum(-1).mean())


def _probe_entropy(probe: AttentionProbe, q: torch.Tensor, k: torch.Tensor) -> float:
    probe.update(AttentionCall("attn", q, k, None, False, None))
    out = Values()
    probe.compute(Context({}, Guard(True)), out)
    return float(out.scalars[keys.key(keys.ENTROPY, "attn")])


def test_the_probe_measures_the_auto_rows_by_default():
    torch.manual_seed(0)
    n, heads, dh = 300, 2, 8  # d = 16: the floor, 128 evenly spaced rows of 300
    q, k = torch.randn(1, heads, n, dh) * 3, torch.randn(1, heads, n, dh)
    q[:, :, ::2] *= 0.1  # even rows near uniform, odd rows peaked: which rows are measured shows in the mean
    assert auto_query_rows(n, n, heads * dh) == MIN_QUERY_ROWS
    sampled = np.round(np.linspace(0, n - 1, MIN_QUERY_ROWS)).astype(int)
    expected, every_row = _entropy_of_rows(q, k, sampled), _entropy_of_rows(q, k, np.arange(n))
    assert abs(expected - every_row) > 1e-3  # the test can tell the two apart
    assert _probe_entropy(AttentionProbe("attn", heads), q, k) == pytest.approx(expected, rel=1e-5)
    assert _probe_entropy(AttentionProbe("attn", heads, query_rows=None), q, k) == pytest.approx(every_row, rel=1e-5)
    assert _probe_entropy(AttentionProbe("attn", heads, query_rows=1000), q, k) == pytest.approx(every_row, rel=1e-5)


def test_monitor_defaults_to_auto_rows_and_checks_the_option():
    assert Monitor().options.query_rows == "auto"
    assert Monitor(query_rows=None).options.query_rows is None
    with pytest.raises(ValueError, match="query_rows must be a positive integer, 'auto' or None"):
        Monitor(query_rows="all")


def test_short_sequences_through_the_monitor_are_measured_in_full():
    """A model's own call at N <= 128: the default monitor logs the entropy of every row (checked against q, k)."""
    torch.manual_seed(1)
    n, d, heads = 96, 32, 4
    block = Block(d, heads)
    x = torch.randn(2, n, d)
    monitor = Monitor(every_n_steps=1, head=None, alerts=(), strict=True).attach(block)
    with monitor.step(0):
        block(x)
    value = float(monitor.compute(0)[keys.key(keys.ENTROPY, "attn")])
    with torch.no_grad():
        q, k, _ = block.attn.qkv(block.ln1(x)).split(d, dim=2)
        q, k = (t.view(2, n, heads, d // heads).transpose(1, 2) for t in (q, k))
        scores = q.double() @ k.double().transpose(-1, -2) / (d // heads) ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        expected = float(-(F.softmax(scores, -1) * F.log_softmax(scores, -1)).nan_to_num().sum(-1).mean())
    assert value == pytest.approx(expected, rel=1e-5)


def test_inspect_counts_the_logits_of_the_auto_rows_the_monitor_really_computes():
    """At N = 300 (> 128) the default monitor computes 128 rows' logits per head; `geomon inspect`'s cost model counts
    those, and torch's FLOP counter sees exactly that many in the monitored forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from geomon._tiny_gpt import TinyGPT
    from geomon.tools.cost import estimate_flops
    from geomon.tools.inspect_model import describe

    batch, n, d, heads = 2, 300, 32, 2
    torch.manual_seed(0)
    model = TinyGPT(20, d_model=d, n_layer=1, n_head=heads, context=n)
    x = torch.randint(0, 20, (batch, n))
    monitor = Monitor(every_n_steps=1, head=None, alerts=(), backend="torch", strict=True).attach(model)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as plain:
            model(x)
        with FlopCounterMode(display=False) as monitored, monitor.step(0):
            model(x)
    expected = 2 * batch * heads * 128 * n * (d // heads)  # 128 rows per head: the floor, by hand
    assert monitored.get_total_flops() - plain.get_total_flops() == expected
    plan, found = describe(model)
    cost = estimate_flops(plan, found, model, batch_size=batch, seq_len=n)
    assert cost["capture_terms"]["attention_logits"] == expected
