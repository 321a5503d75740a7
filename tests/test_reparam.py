"""σReparam layer: power iteration, σ and its gradient against SVD references; conversion math; lazy imports."""

import ast
import inspect
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geomon.functional import GeomonWarning
from geomon.reparam import SigmaReparamLinear, remove_sigma_reparam, sigma_reparam


def _weight_with_gap(out_features, in_features, gen, transposed=False):
    """A weight with singular values 3, 2, 1.9, ... (a clear gap: power iteration converges fast)."""
    k = min(out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.tensor([3.0, 2.0], dtype=torch.float64), torch.linspace(1.9, 0.1, k - 2, dtype=torch.float64)])
    w = (u * s) @ v.T
    return (w.T if transposed else w).float().contiguous()


def _layer(gen, transposed=False, out_features=24, in_features=40):
    layer = SigmaReparamLinear(in_features, out_features, transposed=transposed)
    with torch.no_grad():
        layer.weight.copy_(_weight_with_gap(out_features, in_features, gen, transposed))
        layer.u.copy_(F.normalize(torch.randn(out_features, generator=gen), dim=0))  # far from converged
    return layer


def _top_singular(weight, transposed):
    matrix = (weight.T if transposed else weight).detach().double()
    u, s, vh = torch.linalg.svd(matrix)
    return s[0], u[:, 0], vh[0]


# ----------------------------------------------------------------------------------------------- the layer itself


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_sigma_estimate_converges_to_the_spectral_norm(gen, transposed):
    layer = _layer(gen, transposed).train()
    x = torch.randn(5, 40, generator=gen)
    exact = torch.linalg.matrix_norm(layer.weight.detach().double(), 2)
    layer(x)
    assert abs(float(layer.sigma) - float(exact)) > 1e-3  # one step from a random vector is not there yet
    for _ in range(30):
        layer(x)
    assert float(layer.sigma) == pytest.approx(float(exact), rel=1e-6)
    assert float(layer.estimate_sigma().detach()) == pytest.approx(float(exact), rel=1e-6)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_gradient_of_sigma_is_the_top_singular_outer_product(gen, transposed):
    layer = _layer(gen, transposed).train()
    for _ in range(30):
        layer(torch.zeros(1, 40))
    (grad,) = torch.autograd.grad(layer.estimate_sigma(), layer.weight)
    _, u1, v1 = _top_singular(layer.weight, transposed)
    expected = torch.outer(u1, v1)  # the sign ambiguity of the SVD cancels in the outer product
    torch.testing.assert_close(grad.double(), expected.T if transposed else expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_forward_gradients_match_the_analytic_ones(gen, transposed):
    layer = _layer(gen, transposed).train()
    for _ in range(30):
        layer(torch.zeros(1, 40))
    with torch.no_grad():
        layer.gamma.fill_(1.7)
    x, g = torch.randn(6, 40, generator=gen), torch.randn(6, 24, generator=gen)
    (layer(x) * g).sum().backward()
    sigma, u1, v1 = _top_singular(layer.weight, transposed)
    w = (layer.weight.T if transposed else layer.weight).detach().double()
    big_g = g.double().T @ x.double()  # dL/dŴ for y = x Ŵᵀ
    inner = (big_g * w).sum()
    grad_w = 1.7 / sigma * big_g - 1.7 / sigma**2 * inner * torch.outer(u1, v1)
    torch.testing.assert_close(layer.weight.grad.double(), grad_w.T if transposed else grad_w, atol=1e-5, rtol=1e-5)
    assert float(layer.gamma.grad) == pytest.approx(float(inner / sigma), rel=1e-5)


def test_eval_freezes_u_training_moves_it_and_the_global_rng_is_untouched(gen):
    layer = _layer(gen)
    x = torch.randn(4, 40, generator=gen)
    plain = nn.Linear(40, 24)  # initialised from the global RNG before its state is taken
    state = torch.get_rng_state()
    u0 = layer.u.clone()
    layer.eval()
    first = layer(x)
    assert torch.equal(layer.u, u0)
    assert torch.equal(layer(x), first)  # deterministic eval outputs
    layer.train()(x)
    assert not torch.equal(layer.u, u0)
    converted = SigmaReparamLinear.from_linear(plain)
    converted.train()(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_power_step_and_sigma_run_in_float32_under_autocast(gen):
    reference = _layer(gen).train()
    layer = SigmaReparamLinear(40, 24).train()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(4, 40, generator=gen)
    expected = reference(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.u.dtype == layer.sigma.dtype == torch.float32
    assert torch.equal(layer.u, reference.u) and torch.equal(layer.sigma, reference.sigma)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    half = SigmaReparamLinear.from_linear(nn.Linear(40, 24).to(torch.bfloat16)).train()
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16 and half.u.dtype == torch.float32


def test_from_linear_keeps_the_function_and_the_copy_is_independent():
    linear = nn.Linear(16, 8)
    layer = SigmaReparamLinear.from_linear(linear, n_power_iter=2).eval()
    x = torch.randn(3, 16)
    assert (layer(x) - linear(x)).abs().max() <= 1e-6
    assert float(layer.gamma.detach()) == pytest.approx(
        float(torch.linalg.matrix_norm(linear.weight.double(), 2)), rel=1e-6
    )
    assert layer.weight is not linear.weight and torch.equal(layer.weight, linear.weight)
    assert "n_power_iter=2" in repr(layer) and "transposed=False" in repr(layer)
    with pytest.raises(TypeError, match=r"nn\.Linear or a transformers Conv1D"):
        SigmaReparamLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="n_power_iter"):
        SigmaReparamLinear(4, 4, n_power_iter=0)
    broken = nn.Linear(16, 8)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    assert SigmaReparamLinear.from_linear(broken)(x).isnan().all()  # loud, not hidden as zeros


def test_converted_and_removed_layers_keep_the_mode_of_the_layers_they_replace(gen):
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 40, generator=gen)
    with torch.no_grad():
        before = model(x)
    sigma_reparam(model)
    assert not model.training and not model[0].training and not model[2].training
    u0, u2, sigma0 = model[0].u.clone(), model[2].u.clone(), model[0].sigma.clone()
    with torch.no_grad():
        for _ in range(3):  # eval forwards take no power step: the output is the plain model's, bit for bit
            assert torch.equal(model(x), before)
    assert torch.equal(model[0].u, u0) and torch.equal(model[2].u, u2) and torch.equal(model[0].sigma, sigma0)
    model[2].train()  # mixed modes survive the round trip layer by layer
    remove_sigma_reparam(model)
    assert type(model[0]) is nn.Linear and not model[0].training
    assert type(model[2]) is nn.Linear and model[2].training
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).eval())
    sigma_reparam(mixed)
    assert mixed[0].training and not mixed[1].training
    assert not SigmaReparamLinear.from_linear(nn.Linear(4, 4).eval()).training
    assert SigmaReparamLinear.from_linear(nn.Linear(4, 4)).training


class _EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        options = {"d_model": 32, "nhead": 4, "dim_feedforward": 64, "dropout": 0.0, "batch_first": True}
        layer = nn.TransformerEncoderLayer(**options)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoderLayer(**options)
        self.head = nn.Linear(32, 8)

    def forward(self, x, memory):
        return self.head(self.decoder(self.encoder(x), memory))


def test_encoder_layer_linears_read_raw_by_the_fast_path_are_skipped_and_named(gen):
    torch.manual_seed(0)
    model = _EncoderDecoder()
    skipped = [f"encoder.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    with pytest.warns(GeomonWarning) as caught:
        sigma_reparam(model)
    assert [str(w.message) for w in caught] == [
        f"sigma_reparam skips {', '.join(map(repr, skipped))}: nn.TransformerEncoderLayer's inference fast path "
        "(eval mode without grad) reads linear1.weight and linear2.weight directly, which would ignore γ / σ there; "
        "pass exclude=[...] with their names to silence this warning"
    ]
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, SigmaReparamLinear))
    assert converted == ["decoder.linear1", "decoder.linear2", "head"]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SigmaReparamLinear):
                module.gamma.mul_(3.0)  # as training moves γ: the converted layers now compute something else
    model.eval()
    x, memory = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with_grad = model(x, memory)
    with torch.no_grad():  # the encoder layers take their fused fast path here
        without_grad = model(x, memory)
    torch.testing.assert_close(without_grad, with_grad.detach(), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma_reparam(_EncoderDecoder(), exclude=["encoder.*.linear1", "encoder.*.linear2"])


def test_zero_weights_are_converted_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    nn.init.zeros_(model[1].weight)
    with pytest.warns(GeomonWarning, match="all-zero weights, which get no gradient and stay zero: 1$"):
        sigma_reparam(model)
    x = torch.randn(3, 4)
    model.train()(x).sum().backward()
    assert torch.equal(model[1](x), model[1].bias.expand(3, 4)) and not model[1].weight.grad.any()


@pytest.mark.parametrize("kind", ["random_init", "tall", "rank_one", "zero"])
def test_conversion_starts_from_the_exact_top_singular_pair(kind, gen):
    shapes = {"random_init": (256, 256), "tall": (300, 40), "rank_one": (64, 48), "zero": (8, 8)}
    linear = nn.Linear(*shapes[kind])
    with torch.no_grad():
        if kind == "random_init":  # the hardest case for power iteration: σ₂/σ₁ is nearly one
            linear.weight.copy_(torch.randn(256, 256, generator=gen) * 0.02)
        if kind == "rank_one":
            linear.weight.copy_(torch.outer(torch.randn(48, generator=gen), torch.randn(64, generator=gen)))
        if kind == "zero":
            linear.weight.zero_()
    layer = SigmaReparamLinear.from_linear(linear).eval()
    exact, u1, _ = _top_singular(linear.weight, False)
    x = torch.randn(4, linear.in_features, generator=gen)
    with torch.no_grad():
        assert float(layer.gamma) == pytest.approx(float(exact), rel=1e-6, abs=1e-30)
        assert torch.equal(layer(x), linear(x))
    if kind != "zero":
        assert float(abs(layer.u.double() @ u1)) == pytest.approx(1.0, abs=1e-6)
    layer.train()(x)
    assert float(layer.sigma) == pytest.approx(float(exact), rel=1e-6, abs=1e-30)


def test_a_module_registered_twice_is_replaced_everywhere_by_one_layer():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.Tanh(), shared).eval()
    x = torch.randn(2, 6)
    before = model(x)
    sigma_reparam(model)
    assert isinstance(model[0], SigmaReparamLinear) and model[0] is model[2]
    assert (model(x) - before).abs().max() <= 1e-6
    model.train()
    (model(x).sum() + model(x).sum()).backward()  # two training forwards (four power steps) before one backward
    assert model[0].weight.grad.isfinite().all() and model[0].gamma.grad.isfinite().all()


def test_transformers_is_imported_lazily(monkeypatch):
    import geomon._reparam_layer
    import geomon.reparam

    for module in (geomon.reparam, geomon._reparam_layer):  # no module-level import of transformers
        tree = ast.parse(inspect.getsource(module))
        imported = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert not [name for name in imported if name and name.startswith("transformers")], module.__name__
    monkeypatch.delitem(
        sys.modules, "transformers.pytorch_utils", raising=False
    )  # as if transformers had never been imported
    model = sigma_reparam(nn.Sequential(nn.Linear(3, 3)))
    assert isinstance(model[0], SigmaReparamLinear)
    assert type(remove_sigma_reparam(model)[0]) is nn.Linear


@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (64, 256)])
def test_gamma_equals_sigma_of_wide_and_tall_weights(shape):
    # regression: a start vector with a null-space component left the Lanczos start of wide weights short of
    # convergence (an 8 x 16 weight read 0.14% low)
    g = torch.Generator().manual_seed(64)
    for _ in range(20):
        weight = torch.randn(shape, generator=g) / shape[1] ** 0.5
        linear = nn.Linear(shape[1], shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
        layer = SigmaReparamLinear.from_linear(linear)
        expected = float(torch.linalg.matrix_norm(weight.double(), 2))
        assert float(layer.gamma.detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (1, 7), (7, 1)])
def test_rank_one_weights_convert_to_their_exact_singular_pair(shape):
    # regression: the Krylov space of a rank-one weight closes after one step, which left the bidiagonal without a
    # superdiagonal and crashed from_linear
    g = torch.Generator().manual_seed(11)
    left, right = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
    linear = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.outer(left, right))
    layer = SigmaReparamLinear.from_linear(linear)
    assert float(layer.gamma.detach()) == pytest.approx(float(left.norm() * right.norm()), rel=1e-6)
    assert abs(float(layer.u.double() @ (left.double() / left.norm()))) == pytest.approx(1.0, rel=1e-6)
    x = torch.randn(3, shape[1], generator=g)
    torch.testing.assert_close(layer(x), linear(x))
