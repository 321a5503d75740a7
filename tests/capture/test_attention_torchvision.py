"""torchvision's hand-written window attention under the monitor: Swin (``ShiftedWindowAttention``), Swin V2
(``ShiftedWindowAttentionV2``: cosine attention, clamped logit scale, continuous position bias) and MaxViT
(``RelativePositionalMultiHeadAttention``, window and grid). Reference: the module's own softmax, read by replacing
``torch.nn.functional.softmax`` during a separate forward without geomon (its input: the logits with every bias and
mask; its output: the probabilities), rows of padding tokens (the all-zero windowed tokens the module projects)
left out, entropy ``-Σ p log p`` in float64."""

import math
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")

from torchvision.models import maxvit, swin_transformer  # noqa: E402

from geomon import Monitor  # noqa: E402
from geomon.capture import capture_attention, find_attention_modules  # noqa: E402
from tests.capture._reference import (  # noqa: E402
    assert_clean,
    assert_rows_close,
    choose_as_on_cuda,
    collect,
    rows_of,
)

ATTENTION = (
    swin_transformer.ShiftedWindowAttention,
    swin_transformer.ShiftedWindowAttentionV2,
    maxvit.RelativePositionalMultiHeadAttention,
)


def _trained_looking(model):
    """Biases and logit scales far from their initial values, so that a dropped or misplaced term shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, swin_transformer.ShiftedWindowAttentionV2):
                heads = module.num_heads  # some heads above the clamp at log(100)
                module.logit_scale.copy_(torch.linspace(0.5, 6.0, heads).reshape(heads, 1, 1))
                torch.nn.init.normal_(module.cpb_mlp[2].weight, std=0.5, generator=g)
                torch.nn.init.normal_(module.qkv.bias, generator=g)  # its K third must be ignored, as torchvision does
            elif isinstance(module, ATTENTION):
                torch.nn.init.normal_(module.relative_position_bias_table, std=2.0, generator=g)
    return model


def _swin_small(v2=False, **kwargs):
    torch.manual_seed(0)
    extra = {"block": swin_transformer.SwinTransformerBlockV2, "downsample_layer": swin_transformer.PatchMergingV2}
    model = swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5,
        **(extra if v2 else {}), **kwargs,
    )  # fmt: skip
    return _trained_looking(model)


def _maxvit_small(**kwargs):
    torch.manual_seed(0)
    model = maxvit.MaxVit(
        input_size=(64, 64), stem_channels=8, partition_size=4, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=5, **kwargs,
    )  # fmt: skip
    return _trained_looking(model)


def _images(batch, height, width=None):
    return torch.randn(batch, 3, height, width or height, generator=torch.Generator().manual_seed(1))


@contextmanager
def _own_softmax(model):
    """Per attention module: the logits its softmax receives and the probabilities it returns ``[windows, H, N, N]``,
    the windowed tokens it projects (Swin: its first ``F.linear`` input), and the input it was called with."""
    seen, running = {}, []
    names = {m: n for n, m in model.named_modules() if isinstance(m, ATTENTION)}
    softmax, linear = F.softmax, F.linear

    def spy_softmax(x, *args, **kwargs):
        out = softmax(x, *args, **kwargs)
        if running:
            n, heads = x.shape[-1], x.shape[-3]  # Swin [B·nW, H, N, N]; MaxViT [B, G, H, P, P]
            seen[running[-1]].update(
                logits=x.detach().reshape(-1, heads, n, n), p=out.detach().reshape(-1, heads, n, n)
            )
        return out

    def spy_linear(x, *args, **kwargs):  # Swin's qkv projection: the first 3-D input (V2's bias MLP takes 4-D)
        if running and x.dim() == 3 and "tokens" not in seen[running[-1]]:
            seen[running[-1]]["tokens"] = x.detach()
        return linear(x, *args, **kwargs)

    def enter(module, args):
        running.append(names[module])
        seen[names[module]] = {"input": args[0].detach()}

    def leave(*_):
        running.pop()  # returns None: the module's output stays its own

    handles = [m.register_forward_pre_hook(enter) for m in names]
    handles += [m.register_forward_hook(leave) for m in names]
    F.softmax, F.linear = spy_softmax, spy_linear
    try:
        yield seen
    finally:
        F.softmax, F.linear = softmax, linear
        for handle in handles:
            handle.remove()


def _reference(model, images):
    """Per module: per-head entropy and max logit over real query rows, and those rows ``[windows, N]``."""
    with torch.no_grad(), _own_softmax(model) as seen:
        model(images)
    out = {}
    for name, own in seen.items():
        p, logits = own["p"].double(), own["logits"].double()
        real = torch.ones(p.shape[0], p.shape[-2], dtype=torch.bool)  # MaxViT: no padding
        if "tokens" in own:  # Swin: padding tokens are the all-zero windowed tokens it projects
            real = own["tokens"].ne(0).any(-1)
        entropy = -torch.special.xlogy(p, p).sum(-1)  # [W, H, N]
        per_head = entropy.transpose(0, 1)[:, real]  # [H, real rows]
        max_logit = logits.amax(-1).transpose(0, 1)[:, real].amax(-1)
        out[name] = {"entropy": per_head.mean(-1), "max_logit": max_logit, "real": real, "input": own["input"]}
        out[name]["all_entropy"], out[name]["all_max"] = entropy, logits.amax(-1)
    return out


def _monitored(model, images):
    monitor = Monitor(every_n_steps=1, head=None, query_rows=None, strict=True).attach(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with monitor.step(0):
            model(images)
        values = monitor.compute()
    unseen = [str(w.message) for w in caught if "attention" in str(w.message) and "not seen" in str(w.message)]
    unseen += [str(w.message) for w in caught if "look like attention" in str(w.message)]
    assert not unseen, unseen
    return values, monitor.details


def _check(model, images):
    names = [n for n, m in model.named_modules() if isinstance(m, ATTENTION)]
    assert find_attention_modules(model) == dict.fromkeys(names, "torchvision")
    model.eval()
    want = _reference(model, images)
    values, details = _monitored(model, images)
    for name in names:
        entropy, max_logit = (f"geomon/attention/{family}/{name}" for family in ("entropy", "max_logit"))
        torch.testing.assert_close(details[entropy].double(), want[name]["entropy"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(details[max_logit].double(), want[name]["max_logit"], rtol=1e-5, atol=1e-5)
        total = want[name]["entropy"].mean()  # every head has the same rows
        assert math.isclose(float(values[entropy]), float(total), rel_tol=1e-5), name
        assert math.isclose(float(values[max_logit]), float(want[name]["max_logit"].max()), rel_tol=1e-5), name
    return want


def _layout(module, x):
    """(padded to whole windows, effectively shifted) for a Swin attention module called on ``x [B, H, W, C]``."""
    window, shift = module.window_size, module.shift_size
    padded = [math.ceil(size / w) * w for size, w in zip(x.shape[1:3], window, strict=True)]
    shifted = any(s > 0 and w < p for s, w, p in zip(shift, window, padded, strict=True))
    return list(x.shape[1:3]) != padded, shifted


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_small_with_padding_and_shifts_equals_its_own_softmax(v2):
    """40 x 24 px: stage 1 is 10 x 6 tokens (padded to 12 x 8, shifted on both axes), stage 2 5 x 3 (padded to
    8 x 4: shifted along the height only, the window covering the width)."""
    model = _swin_small(v2=v2)
    want = _check(model, _images(2, 40, 24))
    layouts = {_layout(m, want[n]["input"]) for n, m in model.named_modules() if n in want}
    assert layouts >= {(True, True), (True, False)}, layouts  # padded with and without a shift
    assert model.features[3][1].attn.shift_size == [2, 2]


def test_swin_small_without_padding_shifted_and_not():
    model = _swin_small()
    want = _check(model, _images(2, 32))  # 8 x 8 then 4 x 4 tokens: no padding; the second stage's shift is void
    layouts = [_layout(m, want[n]["input"]) for n, m in model.named_modules() if n in want]
    assert layouts == [(False, False), (False, True), (False, False), (False, False)]


@pytest.mark.parametrize("factory", ["swin_t", "swin_v2_t"])
def test_torchvision_swin_t_and_v2_t_equal_their_own_softmax(factory):
    """The torchvision models themselves at 64 px: 16 x 16 tokens padded to windows of 7 (v1) or windows of 8 (v2)
    in stage 1, 2 x 2 tokens in a single window in the last stage."""
    torch.manual_seed(0)
    model = _trained_looking(getattr(torchvision.models, factory)(num_classes=10))
    _check(model, _images(1, 64))


def test_maxvit_window_and_grid_attention_equal_their_own_softmax():
    model = _maxvit_small()
    want = _check(model, _images(2, 64))
    kinds = {m.partition_type for m in model.modules() if isinstance(m, maxvit.PartitionAttentionLayer)}
    assert kinds == {"window", "grid"} and len(want) == 4


def test_torchvision_maxvit_t_equals_its_own_softmax():
    torch.manual_seed(0)
    _check(_trained_looking(torchvision.models.maxvit_t(num_classes=10)), _images(1, 224))


def test_padding_rows_are_left_out_and_every_real_row_is_exact():
    """Per row, through capture_attention: each real query row equals the module's own softmax row; the rows of
    padding tokens (cropped away by the module) are NaN, out of every mean."""
    for v2 in (False, True):
        model = _swin_small(v2=v2).eval()
        images = _images(2, 40, 24)
        want = _reference(model, images)
        with torch.no_grad():
            calls, _ = collect(model, lambda m=model, x=images: m(x))
        assert [c.module for c in calls] == list(want)
        for call in calls:
            entropy, max_logit, _ = rows_of(call)
            real = want[call.module]["real"][:, None, :].expand_as(entropy)
            assert_rows_close(entropy, want[call.module]["all_entropy"], real)
            assert_rows_close(max_logit, want[call.module]["all_max"], real)
            assert entropy[~real].isnan().all() and (~real).any()
        assert_clean(model)


def test_swin_v2_cosine_attention_has_no_logit_sigma_and_says_why():
    """The logit-map diagnostics read σ(W_Qᵀ W_K)·scale from ``qkv``: right for Swin v1 (logits scale·q·k + bias),
    not for V2's cosine attention, which is skipped with a warning rather than logged."""
    for v2 in (False, True):
        model = _swin_small(v2=v2).eval()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            monitor = Monitor(every_n_steps=1, head=None).attach(model)
            with monitor.step(0):
                model(_images(1, 32))
            values = monitor.compute()
        sigma = [key for key in values if key.startswith("geomon/spectral/logit_sigma/")]
        said = [str(w.message) for w in caught if "cosine attention" in str(w.message)]
        assert (len(sigma), len(said)) == ((0, 4) if v2 else (4, 0)), (sigma, said)


def test_a_subclass_is_not_recomputed_but_named():
    class Mine(swin_transformer.ShiftedWindowAttention):
        pass

    model = torch.nn.Sequential(Mine(8, [2, 2], [1, 1], 2))
    assert find_attention_modules(model) == {}
    said = []
    with capture_attention(model, lambda call: None, strict=True, warn=lambda tag, message: said.append(message)):
        model(torch.randn(1, 4, 4, 8))
    assert len(said) == 1 and "Mine" in said[0]


@pytest.mark.parametrize("kind", ["swin", "swin_v2", "maxvit"])
def test_training_is_bit_identical_with_the_monitor_on(kind):
    """Two SGD steps in train mode (attention dropout, stochastic depth: the random stream is used) with and without
    the monitor measuring every step: same weights, same losses, same random stream after."""

    def train(monitored):
        if kind == "maxvit":
            model = _maxvit_small(attention_dropout=0.1, mlp_dropout=0.1).train()
            images = _images(2, 64)
        else:
            model = _swin_small(v2=kind == "swin_v2", attention_dropout=0.1, stochastic_depth_prob=0.2).train()
            images = _images(2, 40, 24)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = Monitor(every_n_steps=1, head=None, strict=True).attach(model)
        torch.manual_seed(3)
        losses = []
        for step in range(2):
            with monitor.step(step) if monitored else torch.enable_grad():
                loss = model(images).logsumexp(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if monitored:
                values = monitor.compute()
                assert any(key.startswith("geomon/attention/entropy/") for key in values)
            losses.append(loss.detach())
        return losses, [p.detach().clone() for p in model.parameters()], torch.rand(3)

    (losses_a, weights_a, rng_a), (losses_b, weights_b, rng_b) = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("which", ["swin-v1", "swin-v2", "maxvit"])
def test_the_kernel_as_cuda_would_run_it_equals_their_own_softmax(which, monkeypatch):
    """The padded, shifted Swin maps and MaxViT again with ``backend="auto"`` choosing as on CUDA: the (interpreted)
    kernel takes every call, with the per-window float mask and the padding tokens' rows left out."""
    chosen = choose_as_on_cuda(monkeypatch)
    if which == "maxvit":
        _check(_maxvit_small(), _images(1, 64))
    else:
        _check(_swin_small(v2=which == "swin-v2"), _images(1, 40, 24))
    assert chosen and set(chosen) == {"triton"}, chosen
