"""capture_attention on nanoGPT-style causal self-attention (flash and eager), geomon's TinyGPT, and the guarantees
every source shares: once per forward (also with activation checkpointing), errors become warnings, no leftovers."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from geomon._tiny_gpt import TinyGPT
from geomon.capture import capture_attention, find_attention_modules
from tests.capture._reference import assert_clean, assert_rows_close, collect, rows_of, softmax_rows


class SelfAttention(nn.Module):
    """Written for these tests in nanoGPT's shape: a fused c_attn, n_head, n_embd and a flash switch."""

    def __init__(self, n_embd: int, n_head: int, flash: bool) -> None:
        super().__init__()
        self.n_embd, self.n_head, self.flash = n_embd, n_head, flash
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("allowed", torch.ones(16, 16, dtype=torch.bool).tril())

    def forward(self, x):
        b, t, c = x.shape
        heads = [p.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2) for p in self.c_attn(x).chunk(3, -1)]
        q, k, v = heads
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            weights = (q @ k.transpose(-1, -2)) / math.sqrt(k.shape[-1])
            weights = weights.masked_fill(~self.allowed[:t, :t], float("-inf")).softmax(-1)
            y = weights @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, flash: bool, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = SelfAttention(32, 4, flash)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        if self.use_checkpoint:
            return x + checkpoint(lambda h: self.attn(self.ln(h)), x, use_reentrant=False)
        return x + self.attn(self.ln(x))


def _model(flash, use_checkpoint=False):
    torch.manual_seed(0)
    return nn.Sequential(*(Block(flash, use_checkpoint) for _ in range(2)))


def _by_hand(attention, x):
    qkv = x.double() @ attention.c_attn.weight.double().T + attention.c_attn.bias.double()
    q, k = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in qkv.split(32, -1)[:2])
    return softmax_rows(q, k, allowed=torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril())


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt_attention_once_per_layer_equal_to_a_float64_reference(flash):
    model = _model(flash)
    assert find_attention_modules(model) == {"0.attn": "nanogpt", "1.attn": "nanogpt"}
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1))
    inputs = {}
    handles = [
        b.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.update({i: a[0]})) for i, b in enumerate(model)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        calls, _ = collect(model, lambda: model(x))
    assert [(c.module, c.is_causal) for c in calls] == [("0.attn", True), ("1.attn", True)]
    for i, call in enumerate(calls):
        entropy, max_logit, n_keys = rows_of(call)
        expected_entropy, expected_max = _by_hand(model[i].attn, inputs[i])
        assert_rows_close(entropy, expected_entropy)
        assert_rows_close(max_logit, expected_max)
        assert n_keys[0, 0].tolist() == list(range(1, 11))


@pytest.mark.parametrize("flash", [True, False])
def test_training_is_bit_identical_and_checkpoint_recomputation_is_not_reported_again(flash):
    def train(capture):
        model = _model(flash, use_checkpoint=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3))
        calls = []
        for _ in range(2):
            if capture:
                with capture_attention(model, calls.append, strict=True):
                    loss = model(x).square().mean()
                    loss.backward()  # the checkpointed attention runs its forward again, inside the block
            else:
                loss = model(x).square().mean()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return loss.detach(), [p.detach().clone() for p in model.parameters()], calls, model

    plain, captured = train(False), train(True)
    assert torch.equal(plain[0], captured[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], captured[1], strict=True))
    assert [c.module for c in captured[2]] == ["0.attn", "1.attn"] * 2
    assert_clean(captured[3])


def test_tiny_gpt_is_listed_and_seen_at_sdpa():
    model = TinyGPT(vocab_size=17, d_model=32, n_layer=2, n_head=4, context=12)
    assert find_attention_modules(model) == {"blocks.0.attn": "tiny_gpt", "blocks.1.attn": "tiny_gpt"}
    calls, _ = collect(model, lambda: model(torch.randint(0, 17, (2, 12))))
    assert [(c.module, c.is_causal, c.k.shape) for c in calls] == [
        (f"blocks.{i}.attn", True, torch.Size([2, 4, 12, 8])) for i in range(2)
    ]


def test_tiny_gpt_attention_that_stops_calling_sdpa_is_recomputed(monkeypatch):
    model = TinyGPT(vocab_size=17, d_model=32, n_layer=1, n_head=4, context=12)
    idx = torch.randint(0, 17, (2, 12))
    with torch.no_grad():
        via_sdpa, _ = collect(model, lambda: model(idx))
        sdpa = F.scaled_dot_product_attention

        def hidden(q, k, v, is_causal=False):  # an implementation that geomon cannot intercept
            return sdpa(q, k, v, is_causal=is_causal)

        import geomon._tiny_gpt as tiny

        monkeypatch.setattr(tiny, "F", type("F", (), {"scaled_dot_product_attention": staticmethod(hidden)}))
        recomputed, _ = collect(model, lambda: model(idx))
    assert len(recomputed) == 1
    for a, b in zip(rows_of(via_sdpa[0]), rows_of(recomputed[0]), strict=True):
        assert_rows_close(a, b)


def test_a_failing_callback_warns_per_call_and_strict_raises():
    model = _model(flash=False)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = model(x)

    def broken(call):
        raise ValueError("probe bug")

    warning = pytest.warns(UserWarning, match="attention capture in '[01].attn' failed")
    with torch.no_grad(), warning as record, capture_attention(model, broken):
        out = model(x)
    assert torch.equal(out, expected) and len(record) == 2
    with torch.no_grad(), pytest.raises(ValueError, match="probe bug"), capture_attention(model, broken, strict=True):
        model(x)
    assert_clean(model)


def test_calls_outside_the_model_are_ignored_and_nested_blocks_are_independent():
    model, other = _model(flash=True), _model(flash=False)
    outer, inner = [], []
    with capture_attention(model, outer.append), warnings.catch_warnings():
        warnings.simplefilter("error")
        other(torch.randn(1, 4, 32))  # not part of the watched model
        F.scaled_dot_product_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
        with capture_attention(other, inner.append):
            model(torch.randn(1, 4, 32))
            other(torch.randn(1, 4, 32))
    assert [c.module for c in outer] == ["0.attn", "1.attn"]
    assert [c.module for c in inner] == ["0.attn", "1.attn"]
    assert_clean(model)


class NanoGPTAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention`` as in its model.py (config arguments inlined)."""

    def __init__(self, n_embd: int = 32, n_head: int = 4, block_size: int = 16) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, 0.0, False
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def apply_rotary(x, positions):
    """Rotate-half rotary embedding over the last dimension."""
    half = x.shape[-1] // 2
    freqs = positions[:, None].double() / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RopeFork(NanoGPTAttention):
    """A nanoGPT fork with rotary embeddings on Q and K: same attribute names, different scores."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        positions = torch.arange(T)
        q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            y = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, -math.inf), dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class QKNormFork(NanoGPTAttention):
    """A nanoGPT fork with QK-norm in submodules, its forward otherwise nanoGPT's."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_q, self.ln_k = nn.LayerNorm(8), nn.LayerNorm(8)


def test_nanogpt_itself_is_recomputed_and_forks_that_change_the_scores_are_not():
    assert find_attention_modules(nn.ModuleDict({"attn": NanoGPTAttention()})) == {"attn": "nanogpt"}
    rope, qk_norm = find_attention_modules(nn.ModuleDict({"rope": RopeFork(), "qk": QKNormFork()})).values()
    assert rope.startswith("nanogpt-like, not recomputed") and "rotary" in rope
    assert qk_norm.startswith("nanogpt-like, not recomputed") and "ln_k" in qk_norm


@pytest.mark.parametrize("flash", [True, False])
def test_a_rope_fork_is_measured_at_sdpa_or_named_never_mismeasured(flash):
    torch.manual_seed(0)
    attention = RopeFork()
    attention.flash = flash
    model = nn.ModuleDict({"attn": attention})
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls, _ = collect(model, lambda: (attention(x), attention(x)))
    said = [str(w.message) for w in caught if "'attn'" in str(w.message)]
    if not flash:  # the eager path is not recomputed without its rotary embedding: named once, no value
        assert calls == [] and len(said) == 1 and "not recomputed" in said[0], said
        return
    assert said == [] and [c.module for c in calls] == ["attn", "attn"]
    qkv = x.double() @ attention.c_attn.weight.double().T + attention.c_attn.bias.double()
    q, k = (apply_rotary(t.unflatten(-1, (4, 8)).transpose(1, 2), torch.arange(10)) for t in qkv.split(32, -1)[:2])
    entropy, max_logit = softmax_rows(q, k, allowed=torch.ones(10, 10, dtype=torch.bool).tril())
    captured, captured_max, _ = rows_of(calls[0])
    assert_rows_close(captured, entropy)
    assert_rows_close(captured_max, max_logit)
