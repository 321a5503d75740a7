"""Adapters that report Q/K at their module's exit read the projections' outputs the model computed in that call:
a projection that draws random numbers in training (a LoRA adapter with ``lora_dropout``) is not called again, so
the values are those of the dropout sample the model used, and training's random stream, hence training itself, is
what it is without geomon. References: the model's own softmax inputs in a forward from the same seed (float64), and
the same training loop run without geomon (bit-identical losses and weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon.keys import ENTROPY, MAX_LOGIT, key
from tests.capture._reference import measure_once, softmax_inputs, tiny_hf_model


class LoRA(nn.Module):
    """A frozen-style base projection plus a low-rank update that reads its input through dropout (as peft's LoRA
    with ``lora_dropout``): random in training."""

    def __init__(self, base: nn.Linear, rank: int = 4, p: float = 0.3) -> None:
        super().__init__()
        self.base, self.dropout = base, nn.Dropout(p)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, 0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(self.dropout(x)))


def _timm_vit() -> tuple[nn.Module, dict]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    for block in model.blocks:
        block.attn.fused_attn = False  # attention written by hand: recomputed at the module's exit
        block.attn.qkv = LoRA(block.attn.qkv)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, {"x": images}


def _bloom() -> tuple[nn.Module, dict]:
    model = tiny_hf_model("BloomConfig", "BloomForCausalLM", vocab_size=100, hidden_size=32, n_layer=2, n_head=4,
                          attention_dropout=0.0, hidden_dropout=0.0)  # fmt: skip
    for block in model.transformer.h:
        block.self_attention.query_key_value = LoRA(block.self_attention.query_key_value)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


def _longformer() -> tuple[nn.Module, dict]:
    """Longformer projects the transposed input and divides its Q in place after projecting it: Q and K are read
    back all the same (Q after that one division)."""
    model = tiny_hf_model("LongformerConfig", "LongformerModel", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, attention_window=[4, 4],
                          max_position_embeddings=80, attention_probs_dropout_prob=0.0,
                          hidden_dropout_prob=0.0)  # fmt: skip
    for layer in model.encoder.layer:
        layer.attention.self.query = LoRA(layer.attention.self.query)
        layer.attention.self.key = LoRA(layer.attention.self.key)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


MODELS = {"timm-vit": _timm_vit, "bloom": _bloom, "longformer": _longformer}


def _loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    logits = out if isinstance(out, torch.Tensor) else out[0]  # logits, or the last hidden state
    return logits.float().pow(2).mean()


def _train(model: nn.Module, inputs: dict, monitored: bool) -> tuple[list[float], list[torch.Tensor]]:
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(every_n_steps=1, head=None, neural_collapse=False, alerts=[]) if monitored else None
    if monitor is not None:
        monitor.attach(model)
    torch.manual_seed(7)
    losses = []
    for step in range(3):
        if monitor is None:
            loss = _loss(model, inputs)
        else:
            with monitor.step(step):
                loss = _loss(model, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if monitor is not None:
            assert monitor.compute(step)  # measured
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_with_a_stochastic_projection_is_unchanged(name):
    """Three monitored training steps give the losses and weights of three unmonitored ones, bit for bit."""
    model, inputs = MODELS[name]()
    plain_losses, plain_weights = _train(model, inputs, monitored=False)
    losses, weights = _train(model, inputs, monitored=True)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights, strict=True))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_values_are_those_of_the_dropout_sample_the_model_used(name):
    """In training mode, each layer's entropy and max logit equal those of the scores its own softmax took in a
    forward from the same seed: the same dropout sample."""
    model, inputs = MODELS[name]()
    model.train()
    torch.manual_seed(3)
    scores = softmax_inputs(model, **inputs)
    torch.manual_seed(3)
    values, _, said = measure_once(model, **inputs)
    assert not [s for s in said if "note" not in s and "logit-map" not in s], said
    assert len(scores) == 2
    for layer, (s,) in scores.items():
        s = s.masked_fill(s <= -5e3, -torch.inf)  # Bloom's causal mask: the dtype's minimum
        p = torch.softmax(s, dim=-1)
        entropy = -torch.special.xlogy(p, p).sum(-1)
        assert values[key(ENTROPY, layer)] == pytest.approx(float(entropy.mean()), rel=1e-5), layer
        assert values[key(MAX_LOGIT, layer)] == pytest.approx(float(s.amax()), rel=1e-5), layer


def test_a_projection_not_read_back_in_training_is_not_called_again():
    """Under ``inference_mode`` tensors keep no version counter, so nothing is read back: a projection that is not a
    plain ``nn.Linear`` is then not called again in training (its dropout, hooks and state would run twice); the
    layer is named as not reported, nothing is logged for it, and the random stream is where it was."""
    model, inputs = _timm_vit()
    model.train()
    torch.manual_seed(3)
    with torch.inference_mode():
        model(**inputs)
    expected_state = torch.get_rng_state()
    torch.manual_seed(3)
    with torch.inference_mode():
        values, _, said = measure_once(model, **inputs)
    assert torch.equal(torch.get_rng_state(), expected_state)
    assert not any(name.startswith(key(ENTROPY, "")) for name in values)
    assert any("NotReadBack" in s and "blocks.0.attn" in s for s in said), said


def test_only_the_projections_of_a_recomputed_module_are_kept():
    """The outputs kept while a recomputed module runs are those of its Q/K projections, not of its other children
    (an encoder layer's feed-forward, dropouts, norms)."""
    from geomon.capture._projections import ChildOutputs

    outputs = ChildOutputs()
    timm_attention = _timm_vit()[0].blocks[0].attn
    layer = nn.TransformerEncoderLayer(16, 2, batch_first=True)
    outputs.watch(timm_attention)
    outputs.watch(layer)
    assert outputs.children[id(timm_attention)] == (id(timm_attention.qkv),)
    assert outputs.children[id(layer)] == ()
