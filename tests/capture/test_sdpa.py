"""Capturing Q/K at the attention call: right tensors, right module, no change to training, always cleaned up."""

import pytest
import torch
import torch.nn.functional as F

from geomon._tiny_gpt import TinyGPT
from geomon.capture import capture_sdpa
from geomon.functional import attention_entropy
from geomon.metrics import AttentionEntropy

ORIGINAL_SDPA = F.scaled_dot_product_attention


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=17, d_model=32, n_layer=2, n_head=4, context=12)


def _qk_from_projection(model, x):
    """Q and K recomputed independently of the capture: from each block's qkv projection output."""
    captured = {}
    handles = [
        block.attn.qkv.register_forward_hook(lambda m, i, o, n=f"blocks.{j}.attn": captured.update({n: o.detach()}))
        for j, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    out = {}
    for name, qkv in captured.items():
        q, k, _ = qkv.split(32, dim=2)
        out[name] = tuple(t.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2) for t in (q, k))
    return out


def test_captured_entropy_equals_the_reference_from_independently_captured_qk():
    model = _model().eval()
    x = torch.randint(0, 17, (3, 12))
    metrics = {f"blocks.{j}.attn": AttentionEntropy(num_heads=4) for j in range(2)}
    calls = []

    def on_attention(call):
        calls.append((call.module, call.is_causal, tuple(call.q.shape)))
        metrics[call.module].update(call.q, call.k, is_causal=call.is_causal, attn_mask=call.attn_mask)

    with torch.no_grad(), capture_sdpa(model, on_attention):
        model(x)
    assert calls == [("blocks.0.attn", True, (3, 4, 12, 8)), ("blocks.1.attn", True, (3, 4, 12, 8))]
    for name, (q, k) in _qk_from_projection(model, x).items():
        entropy, _ = attention_entropy(q, k, is_causal=True)
        assert float(metrics[name].compute()["entropy"]) == pytest.approx(float(entropy.mean()), rel=1e-6)


def test_training_is_bit_identical_with_and_without_capture():
    def train(capture: bool):
        model = _model(seed=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(3):
            x = torch.randint(0, 17, (4, 12), generator=g)
            if capture:
                with capture_sdpa(model, lambda call: attention_entropy(call.q, call.k, is_causal=call.is_causal)):
                    logits = model(x)
            else:
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(5)
    losses_a, weights_a = train(capture=False)
    after_a = torch.rand(3)
    torch.manual_seed(5)
    losses_b, weights_b = train(capture=True)
    after_b = torch.rand(3)
    assert torch.equal(losses_a, losses_b)
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    assert torch.equal(after_a, after_b)  # no random numbers were drawn from the user's stream


def test_everything_is_removed_after_an_exception_in_the_forward():
    model = _model()

    def exploding_forward(*args, **kwargs):
        raise RuntimeError("boom")

    model.blocks[1].mlp.forward = exploding_forward
    with pytest.raises(RuntimeError, match="boom"), capture_sdpa(model, lambda call: None):
        model(torch.randint(0, 17, (1, 12)))
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_failing_callback_warns_and_leaves_the_output_alone():
    model = _model().eval()
    x = torch.randint(0, 17, (2, 12))
    with torch.no_grad():
        expected = model(x)

    def broken(call):
        raise ValueError("probe bug")

    warning = pytest.warns(UserWarning, match="attention capture in 'blocks.[01].attn' failed")
    with torch.no_grad(), warning, capture_sdpa(model, broken):
        out = model(x)
    assert torch.equal(out, expected)
    with torch.no_grad(), pytest.raises(ValueError, match="probe bug"), capture_sdpa(model, broken, strict=True):
        model(x)
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA


def test_calls_outside_the_watched_model_are_ignored_and_kwargs_are_read():
    model = _model()
    seen = []
    q = torch.randn(1, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    with capture_sdpa(model, seen.append):
        F.scaled_dot_product_attention(q, q, q)  # not inside the model
    assert seen == []

    class Wrapper(torch.nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(query=x, key=x, value=x, attn_mask=mask, scale=0.5)

    wrapper = Wrapper()
    with capture_sdpa(wrapper, seen.append):
        wrapper(q)
    assert len(seen) == 1 and seen[0].module == "" and seen[0].scale == 0.5 and torch.equal(seen[0].attn_mask, mask)


@pytest.mark.parametrize("shape", [(2, 5, 8), (2, 3, 2, 5, 8)], ids=["3-D", "5-D"])
def test_a_call_that_is_not_four_dimensional_is_named_once_and_not_reported(shape):
    """SDPA takes any batch dimensions (SAM's windows, Hiera's units, [B*H, N, D]); which of them are heads the call
    does not say, so in a module that declares no head count such a call is left out with one warning that names
    the layout, not a probe failure (with a declared head count it is read: test_attention_batch_dims.py)."""
    import warnings

    from geomon import Monitor

    class Windowed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            q = self.proj(x)
            return F.scaled_dot_product_attention(q, q, q)

    model = torch.nn.Sequential(Windowed())
    monitor = Monitor(every_n_steps=1, head=None, strict=True).attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            with torch.no_grad(), monitor.step(step):
                model(torch.randn(*shape))
            assert not [key for key in monitor.compute() if key.startswith("geomon/attention/")]
    said = [str(w.message) for w in caught if "is not reported" in str(w.message)]
    assert len(said) == 1 and f"{len(shape)}-D query" in said[0] and "[batch, heads, queries, head_dim]" in said[0]
