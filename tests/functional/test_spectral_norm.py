import pytest
import torch

from geomon.functional import spectral_norm


def _with_gap(gen, out, inp, batch=()):
    """A random matrix whose top singular value stands clear of the second (power iteration converges fast)."""
    u, _ = torch.linalg.qr(torch.randn(*batch, out, out, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, inp, inp, generator=gen, dtype=torch.float64))
    k = min(out, inp)
    s = torch.rand(*batch, k, generator=gen, dtype=torch.float64).sort(dim=-1, descending=True).values
    s[..., 0] = 2.0
    return u[..., :k] @ torch.diag_embed(s) @ v[..., :k].mT


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (33, 33), (1, 5)])
def test_matches_torch_linalg_matrix_norm(shape, gen):
    w = _with_gap(gen, *shape)
    sigma, u = spectral_norm(w)
    assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-10)
    assert float(u.norm()) == pytest.approx(1.0, rel=1e-12)


def test_random_gaussian_matrix_converges_with_enough_steps(gen):
    w = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    sigma, _ = spectral_norm(w, n_iter=2000)
    assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-6)


def test_batched_weights(gen):
    w = _with_gap(gen, 12, 7, batch=(3, 2))
    sigma, u = spectral_norm(w)
    assert sigma.shape == (3, 2) and u.shape == (3, 2, 12)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(w, 2), rtol=1e-10, atol=0)


def test_warm_start_tracks_a_drifting_weight_with_one_step(gen):
    w = _with_gap(gen, 20, 10)
    _, u = spectral_norm(w)
    for _ in range(20):
        w = w + 1e-3 * torch.randn(20, 10, generator=gen, dtype=torch.float64)
        sigma, u = spectral_norm(w, u=u)  # default: one step when warm
        assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-5)


def test_warm_steps_compose(gen):
    w = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    _, u = spectral_norm(w, n_iter=3)
    for _ in range(4):
        sigma_stepwise, u = spectral_norm(w, u=u)
    sigma_at_once, _ = spectral_norm(w, n_iter=7)
    assert float(sigma_stepwise) == pytest.approx(float(sigma_at_once), rel=1e-12)


def test_estimate_never_exceeds_sigma(gen):
    w = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(w, 2))
    for steps in (0, 1, 2, 5):
        assert float(spectral_norm(w, n_iter=steps)[0]) <= exact * (1 + 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_weights(dtype, gen):
    w = _with_gap(gen, 24, 16).to(dtype)
    sigma, u = spectral_norm(w)
    assert sigma.dtype == torch.float32 and u.dtype == torch.float32
    exact = float(torch.linalg.matrix_norm(w.double(), 2))
    assert float(sigma) == pytest.approx(exact, rel=1e-5)


def test_zero_weight_gives_zero_and_keeps_the_vector(gen):
    w = _with_gap(gen, 6, 4).float()
    _, u = spectral_norm(w)
    sigma, u_after = spectral_norm(torch.zeros(6, 4), u=u)
    assert float(sigma) == 0.0
    torch.testing.assert_close(u_after, u)


def test_does_not_consume_the_global_random_stream(gen):
    w = torch.randn(8, 8, generator=gen)
    torch.manual_seed(1234)
    spectral_norm(w)
    after = torch.rand(3)
    torch.manual_seed(1234)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize(
    ("w", "kwargs", "error", "match"),
    [
        (torch.ones(5), {}, ValueError, r"w must have shape \[\.\.\., out, in\]"),
        (torch.ones(3, 3, dtype=torch.int64), {}, TypeError, "w must be a real floating-point"),
        (torch.ones(3, 4), {"u": torch.ones(4)}, ValueError, r"u must have shape \(3,\)"),
        (torch.ones(3, 4), {"n_iter": -1}, ValueError, "n_iter must be a non-negative integer"),
    ],
)
def test_bad_input_is_rejected(w, kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral_norm(w, **kwargs)


def test_inside_the_callers_autocast_it_still_computes_in_float32(gen):
    """A plain loop that wraps its whole step, compute included, in autocast: σ must not come from bf16 products."""
    w = _with_gap(gen, 48, 32).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sigma, u = spectral_norm(w)
    assert sigma.dtype == torch.float32 and u.dtype == torch.float32
    assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(w.double(), 2)), rel=1e-6)


def test_an_all_zero_u_is_refused_with_what_to_pass(gen):
    w = _with_gap(gen, 6, 4, batch=(2,))
    u = torch.nn.functional.normalize(torch.randn(2, 6, generator=gen, dtype=torch.float64), dim=-1)
    u[1] = 0
    with pytest.raises(ValueError, match=r"all-zero vector.*u=None"):
        spectral_norm(w, u=u)
