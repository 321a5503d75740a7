"""What geomon cannot capture it says, once: a module that looks like attention and runs unseen is named."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geomon
from geomon.capture import capture_attention
from geomon.capture.attention import looks_like_attention
from tests.capture._reference import tiny_hf_model


class ManualAttention(nn.Module):
    """Softmax attention written by hand (no SDPA): ``capture_attention`` without ``on_scores`` does not read it (the
    monitor reads it at its softmax: tests/capture/test_attention_softmax.py)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights @ v).transpose(1, 2).flatten(2)


class UndeclaredHeadsAttention(ManualAttention):
    """Written by hand, its head count under a name no library uses: no head dimension to read at its softmax."""

    def __init__(self):
        super().__init__()
        self.splits = self.heads
        del self.heads

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (self.splits, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights @ v).transpose(1, 2).flatten(2)


class SdpaAttention(ManualAttention):
    def forward(self, x):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return out.transpose(1, 2).flatten(2)


class AttentionBlock(nn.Module):  # looks like attention by its name, and contains an attention module
    def __init__(self, attention):
        super().__init__()
        self.attn, self.mlp = attention, nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


def _model(attention_cls):
    torch.manual_seed(0)
    return nn.Sequential(AttentionBlock(attention_cls()), AttentionBlock(attention_cls()), nn.Linear(16, 10))


def _messages(caught):
    return [str(w.message) for w in caught if "look like attention" in str(w.message)]


def test_a_hand_written_attention_is_named_once_per_block_and_its_wrapper_is_not():
    model = _model(ManualAttention)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capture_attention(model, lambda call: None), torch.no_grad():
            model(torch.randn(2, 5, 16))
            model(torch.randn(2, 5, 16))
    (message,) = _messages(caught)  # one for the class, naming each layer, the blocks around them not at all
    assert "2 module(s) of class ManualAttention ('0.attn', '1.attn')" in message


def test_attention_through_sdpa_raises_no_warning():
    model = _model(SdpaAttention)
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capture_attention(model, calls.append), torch.no_grad():
            model(torch.randn(2, 5, 16))
    assert [c.module for c in calls] == ["0.attn", "1.attn"]
    assert _messages(caught) == []


def test_the_monitor_says_it_once_per_run_not_once_per_measured_step():
    model = _model(UndeclaredHeadsAttention)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = geomon.Monitor(every_n_steps=1, head=None).attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            with monitor.step(step):
                loss = model(torch.randn(4, 5, 16)).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.compute()
    messages = _messages(caught)
    assert len(messages) == 1 and all(isinstance(w.message, geomon.GeomonWarning) for w in caught if
                                      "look like attention" in str(w.message))  # fmt: skip


def test_many_layers_of_one_class_make_one_warning_that_names_a_few():
    torch.manual_seed(0)
    model = nn.Sequential(*[AttentionBlock(ManualAttention()) for _ in range(12)], nn.Linear(16, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capture_attention(model, lambda call: None), torch.no_grad():
            model(torch.randn(2, 5, 16))
    (message,) = _messages(caught)
    assert "12 module(s) of class ManualAttention ('0.attn', '1.attn', '2.attn', '3.attn' and 8 more)" in message


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (ManualAttention(), True),
        (AttentionBlock(nn.Identity()), True),
        (nn.MultiheadAttention(8, 2), True),
        (nn.Sequential(nn.Linear(8, 8), nn.GELU()), False),
        (nn.Linear(8, 8), False),
        (nn.LayerNorm(8), False),
    ],
)
def test_looks_like_attention(module, expected):
    assert looks_like_attention(module) is expected


@pytest.mark.parametrize(("config_name", "model_name"), [("MambaConfig", "MambaModel"),
                                                          ("FalconMambaConfig", "FalconMambaModel")])  # fmt: skip
def test_state_space_mixers_are_not_named_as_attention(config_name, model_name):
    """A Mamba mixer has an ``in_proj`` (as ``nn.MultiheadAttention`` does) but no attention: its ``A_log``
    parameter marks it as a state-space layer, so no unseen-attention warning names it."""
    model = tiny_hf_model(config_name, model_name, vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4)
    assert isinstance(model.layers[0].mixer.A_log, nn.Parameter) and hasattr(model.layers[0].mixer, "in_proj")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capture_attention(model, lambda call: None), torch.no_grad():
            model(input_ids=torch.randint(0, 50, (1, 6)))
    assert not _messages(caught), _messages(caught)
