"""σReparam converter on real Hugging Face models (GPT-2, Llama, ViT), training, checkpoints, removal."""

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geomon._tiny_gpt import TinyGPT
from geomon.functional import GeomonWarning
from geomon.probes.logit_map import logit_map_sigma, qk_weights
from geomon.reparam import SigmaReparamLinear, remove_sigma_reparam, sigma_reparam, sigma_reparam_stats

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _convertible(model):
    return [n for n, m in model.named_modules() if n and (type(m) is nn.Linear or type(m) is Conv1D)]


# ------------------------------------------------------------------------------------- the converter, real models


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    config.bos_token_id = config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config), lambda g: {"input_ids": torch.randint(0, 100, (2, 12), generator=g)}


def _llama():
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config), lambda g: {"input_ids": torch.randint(0, 100, (2, 12), generator=g)}


def _vit():
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    return transformers.ViTModel(config), lambda g: {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return (
        out.logits
        if hasattr(out, "logits")
        else torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])
    )


@pytest.mark.parametrize("build", [_gpt2, _llama, _vit], ids=["gpt2", "llama", "vit"])
def test_conversion_keeps_the_outputs_of_real_models(build, gen):
    torch.manual_seed(0)
    model, make_inputs = build()
    model.eval()
    inputs = make_inputs(gen)
    before = _outputs(model, inputs)
    candidates = _convertible(model)
    tied = [
        name for name in candidates if name == "lm_head" and model.lm_head.weight is model.get_input_embeddings().weight
    ]
    state = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma_reparam(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)] == [
        f"sigma_reparam skips {name!r}: its parameters are shared with transformer.wte (weight tying); "
        "pass exclude=[...] with its name to silence this warning"
        for name in tied
    ]
    converted = sorted(sigma_reparam_stats(model))
    assert converted == sorted(set(candidates) - set(tied)) and len(converted) >= 8
    assert not _convertible(model) or _convertible(model) == tied
    # the converted layers took the eval mode of the layers they replace: u is frozen, and as γ / σ(W₀) is exactly
    # one the applied weight is W itself, so the outputs are those of the model before conversion, bit for bit
    layers = [m for m in model.modules() if isinstance(m, SigmaReparamLinear)]
    assert not any(layer.training for layer in layers)
    u_before = [layer.u.clone() for layer in layers]
    assert torch.equal(_outputs(model, inputs), before)
    assert torch.equal(_outputs(model, inputs), before)
    assert all(torch.equal(layer.u, u) for layer, u in zip(layers, u_before, strict=True))
    if tied:  # the tie is intact
        assert model.lm_head.weight is model.get_input_embeddings().weight
    remove_sigma_reparam(model)
    assert _convertible(model) == candidates and not sigma_reparam_stats(model)
    assert not any(m.training for m in model.modules())
    assert torch.equal(_outputs(model, inputs), before)


@pytest.mark.parametrize("build", [_gpt2, _llama, _vit], ids=["gpt2", "llama", "vit"])
def test_conversion_keeps_the_function_of_real_models_exactly_in_float64(build, gen):
    torch.manual_seed(0)
    model, make_inputs = build()
    model = model.double().eval()
    inputs = {key: value.double() if value.is_floating_point() else value for key, value in make_inputs(gen).items()}
    before = _outputs(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeomonWarning)  # the tied GPT-2 head
        sigma_reparam(model)
    assert (_outputs(model, inputs) - before).abs().max() <= 1e-12 * max(1.0, float(before.abs().max()))


def test_tied_layer_excluded_explicitly_gives_no_warning_and_include_selects():
    model, _ = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma_reparam(model, include=["transformer.h.*.attn.*", "lm_head"], exclude="lm_head")
    assert sorted(sigma_reparam_stats(model)) == [
        f"transformer.h.{i}.attn.{p}" for i in (0, 1) for p in ("c_attn", "c_proj")
    ]
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D


def test_bad_input_fails_fast_with_the_candidates():
    model, _ = _llama()
    with pytest.raises(ValueError, match=r"'\*\.qkv'.*candidates are: model\.layers\.0\.self_attn\.q_proj"):
        sigma_reparam(model, include=["*.q_proj", "*.qkv"])
    with pytest.raises(ValueError, match="'nothing'"):
        sigma_reparam(model, exclude=["nothing"])
    assert not sigma_reparam_stats(model)  # nothing was converted before the failure
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        sigma_reparam({"weight": torch.ones(2, 2)})
    with pytest.raises(TypeError, match="from_linear"):
        sigma_reparam(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        remove_sigma_reparam("model")
    with pytest.raises(TypeError, match="sequence of strings"):
        sigma_reparam(model, include=[3])
    with pytest.warns(GeomonWarning, match="converted no layer: the model has no untied nn.Linear or Conv1D layer"):
        sigma_reparam(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"include=\[\] selects no layer; pass include=None"):
        sigma_reparam(model, include=[])
    assert not sigma_reparam_stats(model)


def test_converting_twice_frozen_layers_and_bare_layers_are_said_plainly():
    model = sigma_reparam(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    with pytest.warns(GeomonWarning, match=r"converted no layer: the model's layers are already σReparam"):
        sigma_reparam(model)
    layer = model[0]
    with pytest.raises(TypeError, match=r"is itself a SigmaReparamLinear.*; it is already σReparam"):
        sigma_reparam(layer)
    advice = r"remove_sigma_reparam\(nn\.Sequential\(layer\)\)\[0\] gives the plain layer"
    with pytest.raises(TypeError, match=advice):
        remove_sigma_reparam(layer)
    x = torch.randn(2, 3)
    expected = layer.eval()(x)
    plain = remove_sigma_reparam(nn.Sequential(layer))[0]  # the advice works
    assert type(plain) is nn.Linear and torch.equal(plain(x), expected)
    frozen = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    frozen[0].requires_grad_(False)
    sigma_reparam(frozen)
    assert [name for name, p in frozen.named_parameters() if p.requires_grad] == ["1.weight", "1.bias", "1.gamma"]


# ------------------------------------------------------------------------------------------- training, checkpoints


def _tiny(seed):
    torch.manual_seed(seed)
    return sigma_reparam(TinyGPT(vocab_size=13, d_model=32, n_layer=2, n_head=4, context=12))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 13, (8, 1), generator=g)
    return (start + torch.arange(12)) % 13  # a counting sequence: easy to learn


def _train(model, optimizer, steps, first=0):
    losses = []
    for step in range(first, first + steps):
        x = _batch(step)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_training_a_converted_model_is_stable_and_learns():
    model = _tiny(0).train()
    assert len(sigma_reparam_stats(model)) >= 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = _train(model, optimizer, 30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    stats = sigma_reparam_stats(model)
    assert any(abs(float(s["ratio"]) - 1) > 1e-3 for s in stats.values())  # γ learned away from σ
    for name, s in stats.items():
        layer = model.get_submodule(name)
        assert torch.equal(s["gamma"], layer.gamma.detach()) and torch.equal(s["sigma"], layer.sigma)
        assert float(s["ratio"]) == pytest.approx(float(layer.gamma / layer.sigma), rel=1e-6)
    with torch.no_grad():  # weights fixed: more training-mode forwards converge every σ to the spectral norm
        for _ in range(30):
            model(_batch(0))
    for name, s in sigma_reparam_stats(model).items():
        exact = torch.linalg.matrix_norm(model.get_submodule(name).weight.double(), 2)
        assert float(exact) * (1 - 5e-3) <= float(s["sigma"]) <= float(exact) * (1 + 1e-6), name  # a lower bound


def test_state_dict_round_trip_restores_gamma_sigma_u_and_the_training_trajectory():
    model = _tiny(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _train(model, optimizer, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only=True: plain tensors only
    restored = _tiny(1).train()
    assert not torch.equal(restored.head.weight, model.head.weight)
    restored.load_state_dict(saved["model"])
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=3e-3)
    restored_optimizer.load_state_dict(saved["optimizer"])
    for (name, a), b in zip(sigma_reparam_stats(model).items(), sigma_reparam_stats(restored).values(), strict=True):
        assert torch.equal(a["gamma"], b["gamma"]) and torch.equal(a["sigma"], b["sigma"]), name
        assert torch.equal(model.get_submodule(name).u, restored.get_submodule(name).u), name
    x = _batch(99)
    assert torch.equal(model.eval()(x), restored.eval()(x))
    assert _train(model.train(), optimizer, 3, first=5) == _train(restored.train(), restored_optimizer, 3, first=5)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_remove_round_trip_after_training_keeps_the_function():
    model, make_inputs = _gpt2()
    sigma_reparam(model, exclude="lm_head")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        loss = model(**make_inputs(torch.Generator().manual_seed(step)), labels=None).logits.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    inputs = make_inputs(torch.Generator().manual_seed(7))
    before = _outputs(model, inputs)
    assert any(abs(float(s["ratio"]) - 1) > 1e-4 for s in sigma_reparam_stats(model).values())
    state = torch.get_rng_state()
    remove_sigma_reparam(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert {type(m) for m in model.modules()} & {SigmaReparamLinear, Conv1D} == {Conv1D}
    assert (_outputs(model, inputs) - before).abs().max() <= 1e-6
    sigma_reparam(model, exclude="lm_head")  # and back again
    assert (_outputs(model, inputs) - before).abs().max() <= 1e-6


def test_lightning_checkpoint_restores_gamma_sigma_and_u(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _tiny(0)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return F.cross_entropy(self.model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    data = torch.utils.data.TensorDataset(torch.cat([_batch(i) for i in range(3)]))
    module = Lit()
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = Lit.load_from_checkpoint(tmp_path / "last.ckpt")
    stats, restored_stats = sigma_reparam_stats(module), sigma_reparam_stats(restored)
    assert any(abs(float(s["ratio"]) - 1) > 1e-4 for s in stats.values())
    for name, s in stats.items():
        assert torch.equal(s["gamma"], restored_stats[name]["gamma"]), name
        assert torch.equal(s["sigma"], restored_stats[name]["sigma"]), name
        assert torch.equal(module.get_submodule(name).u, restored.get_submodule(name).u), name


def _applied_weight(layer):
    """The [out, in] weight a layer applies, read off its outputs on the identity (eval mode, bias removed)."""
    in_features = layer.in_features if hasattr(layer, "in_features") else layer.weight.shape[0]
    eye = torch.eye(in_features, dtype=layer.weight.dtype)
    with torch.no_grad():
        out = layer(eye) - layer(torch.zeros_like(eye))
    return out.T.double()


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_logit_maps_of_sigma_reparam_layers_use_the_weight_they_apply(build, gen):
    # regression: the logit-map σ read W itself from σReparam layers, not γ W / σ(W), and read a converted GPT-2
    # Conv1D (stored [in, out]) as [out, in]
    from geomon import Monitor

    torch.manual_seed(0)
    model, make_inputs = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeomonWarning)
        sigma_reparam(model)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SigmaReparamLinear):
                layer.gamma.mul_(2.5)  # the applied weight is now 2.5 x W / σ(W), far from W
    model.eval()
    monitor = Monitor(every_n_steps=1, head=None, strict=True).attach(model)
    with torch.no_grad(), monitor.step(0):
        model(**make_inputs(gen))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeomonWarning)
        values = monitor.compute()
    config = model.config
    heads, width = config.num_attention_heads, config.hidden_size
    head_dim = width // heads
    for j in range(config.num_hidden_layers):
        if build is _gpt2:
            attn = model.transformer.h[j].attn
            w_q, w_k, _ = _applied_weight(attn.c_attn).split(width, dim=0)
            name = f"transformer.h.{j}.attn"
        else:
            attn = model.model.layers[j].self_attn
            w_q, w_k = _applied_weight(attn.q_proj), _applied_weight(attn.k_proj)
            name = f"model.layers.{j}.self_attn"
        group = heads // (w_k.shape[0] // head_dim)
        per_head = [
            torch.linalg.matrix_norm(
                w_q[h * head_dim : (h + 1) * head_dim].T @ w_k[(h // group) * head_dim : (h // group + 1) * head_dim],
                2,
            )
            / math.sqrt(head_dim)
            for h in range(heads)
        ]
        if build is _gpt2:
            assert float(values[f"geomon/spectral/logit_sigma/{name}"]) == pytest.approx(float(max(per_head)), rel=1e-5)
            continue
        # Llama's rotary embeddings make the logit map depend on the query-key offset: not logged, said once; the
        # weights the probe reads are still the applied ones
        assert f"geomon/spectral/logit_sigma/{name}" not in values
        assert any(f"logit map of {name!r} is not logged: rotary" in str(w.message) for w in caught)
        w_q_read, w_k_read, scale, _ = qk_weights(attn)
        assert float(logit_map_sigma(w_q_read, w_k_read, scale).max()) == pytest.approx(float(max(per_head)), rel=1e-5)


def test_spectral_keys_of_sigma_reparam_layers_describe_the_weight_they_apply(gen):
    from geomon import Monitor

    torch.manual_seed(0)
    model, make_inputs = _gpt2()
    sigma_reparam(model, exclude=["lm_head"])
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SigmaReparamLinear):
                layer.gamma.mul_(2.5)  # the applied weight is now 2.5 x W / σ(W), far from W
    model.eval()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    monitor = Monitor(every_n_steps=1, head=None, attention=False, spectral_modules=names, strict=True).attach(model)
    with torch.no_grad(), monitor.step(0):
        model(**make_inputs(gen))
    values = monitor.compute()
    for name in names:
        layer = model.get_submodule(name)
        applied = _applied_weight(layer)
        sigma = torch.linalg.matrix_norm(applied, 2)
        # the monitor's 100-step cold start is a lower bound, within 5e-4 here (σ₂/σ₁ of a random init is near 1);
        # the raw W's σ is 2.5 times smaller
        logged = float(values[f"geomon/spectral/sigma/{name}"])
        assert float(sigma) * (1 - 2e-3) <= logged <= float(sigma) * (1 + 1e-6)
        stable_rank = applied.square().sum() / sigma.square()
        assert float(values[f"geomon/spectral/stable_rank/{name}"]) == pytest.approx(float(stable_rank), rel=5e-3)
        raw = torch.linalg.matrix_norm(layer.weight.detach().double(), 2)  # the raw W's σ is reparam_sigma's
        assert float(values[f"geomon/spectral/reparam_sigma/{name}"]) == pytest.approx(float(raw), rel=1e-6)
