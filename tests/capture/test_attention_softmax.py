"""Attention written by hand, read at the module's own softmax: rows equal a float64 softmax of the scores (and the
q/k path on the same scores), padded query rows left out as on every other path, Hugging Face DeBERTa-v2 and GPT-Neo
equal to their own returned probabilities, a module with two softmaxes said once and not reported, and training
unchanged. References: explicit float64 softmax of q/k the test forms itself, and the models' own probabilities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon.functional import attention_entropy
from geomon.functional.attention_scores import _score_rows
from geomon.keys import ENTROPY, ENTROPY_NORMALIZED, MAX_LOGIT, key
from geomon.metrics import AttentionEntropy
from tests.capture._reference import measure_once, recorded_softmax, softmax_inputs

B, N, H, D = 2, 7, 3, 4


def _float64_rows(scores: torch.Tensor, allowed: torch.Tensor | None = None):
    """Entropy, max logit and key count of softmax rows over allowed keys, in float64."""
    scores = scores.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    p = torch.softmax(scores, -1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    n_keys = torch.isfinite(scores).sum(-1)
    empty = n_keys == 0
    return entropy.masked_fill(empty, math.nan), scores.amax(-1).masked_fill(empty, math.nan), n_keys


@pytest.mark.parametrize("seed", range(4))
def test_score_rows_equal_a_float64_softmax_and_the_query_key_path(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, N, D, generator=g) * 2, torch.randn(B, H, N + 2, D, generator=g) * 2
    allowed = torch.rand(B, 1, N, N + 2, generator=g) < 0.5
    allowed[0, 0, 3] = False  # a row with no allowed key
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    filled = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)  # as Hugging Face fills a mask
    got = _score_rows(filled, masked_at=-1e4)
    want = _float64_rows(scores, allowed.expand_as(scores))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
    via_qk = attention_entropy(q, k, attn_mask=allowed, backend="torch", return_n_keys=True)
    for a, b in zip(got, via_qk, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
    metric, reference = AttentionEntropy(H), AttentionEntropy(H)
    metric.update_scores(filled, masked_at=-1e4)
    reference.update(q, k, attn_mask=allowed)
    for name, value in reference.compute().items():
        torch.testing.assert_close(metric.compute()[name], value, rtol=1e-6, atol=1e-7, equal_nan=True)


class HandWritten(nn.Module):
    """Attention written by hand, its key padding filled with -1e9 (as much hand-written code does); keeps the
    scores it formed for the test's reference."""

    def __init__(self, dim: int = H * D, heads: int = H, softmaxes: int = 1) -> None:
        super().__init__()
        self.heads, self.softmaxes = heads, softmaxes
        self.qkv = nn.Linear(dim, 3 * dim)
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, None, :], -1e9)
        self.kept.append(scores.detach())
        weights = scores.softmax(dim=-1)
        if self.softmaxes == 2:  # a gated mix of two maps (as ConViT's GPSA): not one attention
            weights = 0.5 * weights + 0.5 * torch.nn.functional.softmax(scores * 0.1, dim=-1)
        return (weights @ v).transpose(1, 2).flatten(2)


class Net(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = HandWritten(**kwargs)
        self.out = nn.Linear(H * D, 5)

    def forward(self, x, keep=None):
        return self.out(x + self.attn(x, keep))


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right-padded"])
def test_a_hand_written_attention_is_measured_at_its_softmax_without_its_padded_rows(padded):
    torch.manual_seed(0)
    model = Net()
    nn.init.normal_(model.attn.qkv.weight, std=0.6)
    x = torch.randn(B, N, H * D)
    keep = torch.ones(B, N, dtype=torch.bool)
    if padded:
        keep[1, -3:] = False
    values, details, said = measure_once(model, x, keep)
    assert not [m for m in said if "'attn'" in m], said
    scores = model.attn.kept[0]
    entropy, max_logit, n_keys = _float64_rows(scores, keep[:, None, None, :].expand_as(scores))
    real = keep[:, None, :].expand_as(entropy)  # padded tokens' query rows are left out
    per_head = torch.stack([entropy[:, h][real[:, h]].mean() for h in range(H)])
    normalized = entropy / torch.log(n_keys.double())
    torch.testing.assert_close(details[key(ENTROPY, "attn")].double(), per_head, rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, "attn")] == pytest.approx(float(entropy[real].mean()), rel=1e-5)
    assert values[key(ENTROPY_NORMALIZED, "attn")] == pytest.approx(float(normalized[real].mean()), rel=1e-5)
    assert values[key(MAX_LOGIT, "attn")] == pytest.approx(float(max_logit[real].max()), rel=1e-5)


def test_query_rows_reads_evenly_spaced_rows_and_still_finds_the_padding_over_every_row():
    torch.manual_seed(2)
    model = Net()
    nn.init.normal_(model.attn.qkv.weight, std=0.6)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -3:] = False
    values, details, _ = measure_once(model, torch.randn(B, N, H * D), keep, query_rows=4)
    scores = model.attn.kept[0]
    entropy, _, _ = _float64_rows(scores, keep[:, None, None, :].expand_as(scores))
    rows = torch.linspace(0, N - 1, 4).round().long()  # 0, 2, 4, 6: row 6 of the second sequence is padding
    real = keep[:, None, rows].expand(B, H, 4)
    sampled = entropy[:, :, rows]
    per_head = torch.stack([sampled[:, h][real[:, h]].mean() for h in range(H)])
    torch.testing.assert_close(details[key(ENTROPY, "attn")].double(), per_head, rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, "attn")] == pytest.approx(float(sampled[real].mean()), rel=1e-5)


def test_auto_query_rows_reads_at_least_128_evenly_spaced_rows_at_the_softmax():
    """``query_rows="auto"`` (the default) at a softmax: the layer's head count stands for its width, so a call of
    300 queries reads the 128-row floor (0.24·3 + 0.04·300 = 12.7 is below it), evenly spaced."""
    torch.manual_seed(3)
    model = Net()
    nn.init.normal_(model.attn.qkv.weight, std=0.6)
    values, details, _ = measure_once(model, torch.randn(1, 300, H * D), query_rows="auto")
    entropy, _, _ = _float64_rows(model.attn.kept[0])
    sampled = entropy[:, :, torch.linspace(0, 299, 128).round().long()]
    torch.testing.assert_close(details[key(ENTROPY, "attn")].double(), sampled.mean(dim=(0, 2)), rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, "attn")] != pytest.approx(float(entropy.mean()), rel=1e-4)  # not every row


def test_two_softmaxes_in_one_call_are_said_once_and_not_reported():
    model = Net(softmaxes=2)
    for _ in range(2):
        values, _, said = measure_once(model, torch.randn(B, N, H * D))
        assert key(ENTROPY, "attn") not in values
    assert len([m for m in said if "take 2 softmaxes" in m]) == 1, said


class BlockAttention(nn.Module):
    """Attention over blocks of ``L`` tokens written by hand, its scores ``[B, blocks, H, L, L]`` (LongT5's layout,
    of a class geomon does not list)."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.num_heads, self.block = H, block
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], -1, self.block, 3, H, D).unbind(3)  # [B, blocks, L, H, D]
        p = torch.einsum("bnqhd,bnkhd->bnhqk", q, k).softmax(-1)
        return torch.einsum("bnhqk,bnkhd->bnqhd", p, v).reshape(x.shape)


def test_scores_with_two_dimensions_of_the_head_count_are_named_with_their_layout():
    """With as many blocks as heads, which dimension holds the heads cannot be told from an unlisted class's
    scores: it is named with the layout, and nothing is reported (a listed class is placed by its table:
    ``test_attention_softmax_streams.py``)."""
    model = nn.Sequential(BlockAttention(block=2))
    values, _, said = measure_once(model, torch.randn(B, H * 2, H * D))  # 3 blocks of 2 tokens
    assert not [name for name in values if name.startswith("geomon/attention/")], values
    (warning,) = said
    assert "take a softmax over scores [2, 3, 3, 2, 2], in which 2 dimensions have its 3 heads" in warning


@pytest.mark.parametrize("layer", ["two-softmaxes", "linear"])
def test_every_layer_left_unreported_for_its_softmaxes_is_named(layer):
    """Each layer of a class that takes several softmaxes (BigBird's block-sparse attention, Nystromformer's
    landmarks) or a softmax over another dimension (linear attention) is named in the warning, not only the first
    one: a layer that runs attention must have a value or be named (as the unseen-attention warning does: the
    count, and the first four names)."""
    make = (lambda: HandWritten(softmaxes=2)) if layer == "two-softmaxes" else LinearAttention
    model = nn.Sequential(*(_Wrapped(make()) for _ in range(3)))
    values, _, said = measure_once(model, torch.randn(B, N, H * D))
    assert not [name for name in values if name.startswith("geomon/attention/")], values
    assert len(said) == 1, said  # one warning for the class
    assert all(f"'{i}.attn'" in said[0] for i in range(3)) and "3 module(s)" in said[0], said


def test_training_with_a_hand_written_attention_is_unchanged():
    before = vars(torch.Tensor).get("softmax")  # None: TensorBase's method, inherited

    def train(monitored: bool):
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = Monitor(every_n_steps=1, head=None).attach(model) if monitored else None
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            x = torch.randn(B, N, H * D, generator=g)
            if monitor is not None:
                with monitor.step(step):
                    loss = model(x).square().mean()
            else:
                loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if monitor is not None:
                assert key(ENTROPY, "attn") in monitor.compute(step)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(False), train(True), strict=True):
        assert torch.equal(a, b)
    assert vars(torch.Tensor).get("softmax") is before  # the wrapper is gone: Tensor.softmax is as it was


def _hf(config_name, model_name, **config):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_name)(initializer_range=0.3, **config)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize(
    ("config_name", "model_name", "config"),
    [
        # XLNet lets a padded token attend to itself: no key is blocked for every row, so its padded rows count
        ("XLNetConfig", "XLNetModel", dict(vocab_size=100, d_model=64, n_layer=2, n_head=4, d_inner=128)),
        ("DebertaV2Config", "DebertaV2Model",
         dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"])),
        ("GPTNeoConfig", "GPTNeoModel",
         dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
              window_size=4, max_position_embeddings=64)),
    ],
    ids=["xlnet", "deberta-v2", "gpt-neo"],
)  # fmt: skip
def test_hugging_face_attention_written_by_hand_equals_its_own_probabilities(config_name, model_name, config):
    model = _hf(config_name, model_name, **config)
    ids = torch.randint(4, 100, (B, 9), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, 9, dtype=torch.long)
    keep[1, -3:] = 0  # right padding
    with torch.no_grad():
        probabilities = model(input_ids=ids, attention_mask=keep, output_attentions=True).attentions
    values, details, said = measure_once(model, input_ids=ids, attention_mask=keep)
    layers = sorted(name.removeprefix(key(ENTROPY, "")) for name in values if name.startswith(key(ENTROPY, "")))
    assert len(layers) == len(probabilities) == 2, (layers, said)
    real = keep.bool()[:, None, :].expand(B, 4, 9)
    if model_name == "XLNetModel":
        real = torch.ones_like(real)
    for layer, p in zip(layers, probabilities, strict=True):
        entropy = -torch.special.xlogy(p.double(), p.double()).sum(-1)
        per_head = torch.stack([entropy[:, h][real[:, h]].mean() for h in range(4)])
        torch.testing.assert_close(details[key(ENTROPY, layer)].double(), per_head, rtol=1e-5, atol=1e-6)
        assert values[key(ENTROPY, layer)] == pytest.approx(float(entropy[real].mean()), rel=1e-5)


def test_timm_tnt_attention_equals_its_own_softmax_input():
    pytest.importorskip("timm")
    from timm.models.tnt import Attention

    torch.manual_seed(0)
    layer = Attention(24, 24, num_heads=3)
    nn.init.normal_(layer.qk.weight, std=0.5)
    x = torch.randn(B, N, 24)
    seen = []
    with recorded_softmax(lambda scores, dim: seen.append(scores.detach().double())), torch.no_grad():
        layer(x)  # the reference: the scores TNT hands to its softmax
    values, details, _ = measure_once(_Wrapped(layer), x)
    entropy, max_logit, _ = _float64_rows(seen[0])
    torch.testing.assert_close(details[key(ENTROPY, "attn")].double(), entropy.mean(dim=(0, 2)), rtol=1e-5, atol=1e-6)
    assert values[key(MAX_LOGIT, "attn")] == pytest.approx(float(max_logit.max()), rel=1e-5)


class _Wrapped(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.attn = layer

    def forward(self, *args):
        return self.attn(*args)


def _own_softmax_rows(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per head, the mean float64 entropy and the max logit of the rows of every last-dim softmax a module of the
    model takes over ``[B, H, Nq, Nk]`` scores (heads at dim 1)."""
    per_head = {}
    for name, calls in softmax_inputs(model, x).items():
        entropies, maxima = [], []
        for scores in calls:
            assert scores.ndim == 4, (name, tuple(scores.shape))
            p = torch.softmax(scores, -1)
            entropies.append((-torch.special.xlogy(p, p).sum(-1)).transpose(0, 1).flatten(1))  # [H, B·Nq]
            maxima.append(scores.amax(-1).transpose(0, 1).flatten(1))
        per_head[name] = (torch.cat(entropies, 1).mean(1), torch.cat(maxima, 1).amax(1))
    return per_head


@pytest.mark.parametrize("name", ["levit_128s", "mvitv2_tiny", "cait_xxs24_224", "xcit_nano_12_p16_224"])
def test_timm_models_written_by_hand_log_their_own_softmax(name):
    """Per layer and head: the mean entropy and the max logit of the rows each module hands to its own softmax."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    for module in model.modules():  # every attention by hand: the reference sees softmax calls only
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        if isinstance(module, nn.Linear):  # sharper maps than the default init's near-uniform ones
            nn.init.normal_(module.weight, std=0.3)
    x = torch.randn(1, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    want = _own_softmax_rows(model, x)
    values, details, said = measure_once(model, x)
    got = {n.removeprefix(key(ENTROPY, "")) for n in values if n.startswith(key(ENTROPY, ""))}
    assert got == want.keys(), (sorted(got ^ want.keys()), said)
    for layer, (entropy, max_logit) in want.items():
        torch.testing.assert_close(details[key(ENTROPY, layer)].double(), entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(details[key(MAX_LOGIT, layer)].double(), max_logit, rtol=1e-5, atol=1e-6)
        assert values[key(ENTROPY, layer)] == pytest.approx(float(entropy.mean()), rel=1e-5), layer
        assert values[key(MAX_LOGIT, layer)] == pytest.approx(float(max_logit.max()), rel=1e-5), layer


class AdditiveMask(nn.Module):
    """Attention by hand whose padding mask is added as ``(1 - keep) * -10000`` (BERT-era code): the scores at padded
    keys are ``q·k - 10000``, above -1e4 wherever ``q·k`` is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = H
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, H, -1)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) + ((1.0 - keep.float()) * -10000.0)[:, None, None, :]
        self.kept.append(scores.detach())
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_an_additive_minus_10000_mask_is_masked_whatever_the_logit():
    torch.manual_seed(0)
    model = _Wrapped(AdditiveMask())
    nn.init.normal_(model.attn.qkv.weight, std=1.0)
    nn.init.constant_(model.attn.qkv.bias, 1.0)  # positive logits: padded keys score above -1e4
    x = torch.randn(B, N, H * D)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -3:] = False
    values, details, _ = measure_once(model, x, keep)
    scores = model.attn.kept[0]
    assert bool((scores[1, ..., -3:] > -1e4).any())  # the case in point
    entropy, max_logit, n_keys = _float64_rows(scores, keep[:, None, None, :].expand_as(scores))
    real = keep[:, None, :].expand_as(entropy)
    normalized = entropy / torch.log(n_keys.double())
    per_head = torch.stack([entropy[:, h][real[:, h]].mean() for h in range(H)])
    torch.testing.assert_close(details[key(ENTROPY, "attn")].double(), per_head, rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY_NORMALIZED, "attn")] == pytest.approx(float(normalized[real].mean()), rel=1e-5)
    assert values[key(MAX_LOGIT, "attn")] == pytest.approx(float(max_logit[real].max()), rel=1e-5)


class LinearAttention(nn.Module):
    """Linear attention as in denoising-diffusion-pytorch: ``q`` softmaxed over its channels, ``k`` over the tokens
    (``[B, heads, Dh, N]``, a last-dim softmax over a heads-shaped tensor), never a ``[queries, keys]`` map."""

    def __init__(self, dim: int = H * D, heads: int = H) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).permute(0, 2, 3, 1) for t in self.to_qkv(x).chunk(3, -1))
        q, k = q.softmax(dim=-2), k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        return torch.einsum("bhde,bhdn->bhen", context, q).permute(0, 3, 1, 2).flatten(2)


def test_linear_attention_is_not_read_as_softmax_attention():
    values, _, said = measure_once(_Wrapped(LinearAttention()), torch.randn(B, N, H * D))
    assert not [name for name in values if name.startswith("geomon/attention/") and name.endswith("/attn")], values
    assert [m for m in said if "'attn'" in m], said  # named, not silently measured


@pytest.mark.parametrize("std", [0.6, 40.0])
def test_logits_near_the_masking_threshold_are_said_once(std):
    """At the softmax a score at or below -5e3 reads as masked (a mask added to a logit); a layer whose own logits
    pass 1e3 may have real logits there, so that its values leave rows out: said once, for that layer only."""
    torch.manual_seed(0)
    model = Net()
    nn.init.normal_(model.attn.qkv.weight, std=std)
    values, _, said = measure_once(model, torch.randn(B, N, H * D))
    max_logit = float(model.attn.kept[0].amax())
    warned = [m for m in said if "read at its own softmax, has logits up to" in m]
    if std == 0.6:
        assert max_logit < 100 and not warned, said
    else:
        assert float(model.attn.kept[0].amin()) < -5e3 < 1e3 < max_logit
        assert len(warned) == 1 and "'attn'" in warned[0], said
        assert values[key(MAX_LOGIT, "attn")] > 1e3


class GivenScoresAttention(nn.Module):
    """One head whose softmax takes the scores it is given."""

    num_heads = 1

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.softmax(dim=-1)


def test_a_left_out_row_with_a_huge_logit_is_said_too():
    """Key 0 scores -6000 in every row, so it reads as padding and its query row, which holds the layer's largest
    logit (1500), is left out: the logged max logit (2) cannot show it, the warning does."""
    scores = torch.tensor([[-6000.0, 1500.0, 0.0], [-6000.0, 1.0, 2.0], [-6000.0, 0.5, 1.0]])[None, None]
    values, _, said = measure_once(nn.ModuleDict({"attn": GivenScoresAttention()})["attn"], scores)
    (name,) = [n.removeprefix(key(MAX_LOGIT, "")) for n in values if n.startswith(key(MAX_LOGIT, ""))]
    assert values[key(MAX_LOGIT, name)] == pytest.approx(2.0)  # rows 1 and 2 only
    warned = [m for m in said if "read at its own softmax, has logits up to 1500" in m]
    assert len(warned) == 1, said
