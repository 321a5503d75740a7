"""The embedding probe's windows: RankMe over min(N, D) values and the covariance RankMe under its own key."""

import pytest
import torch

from geomon import Monitor, keys
from geomon.functional import rankme
from geomon.probes.embedding import EmbeddingProbe


def _svdvals_rankme(z: torch.Tensor, centered: bool, eps: float = 1e-7) -> float:
    """METRICS.md §1 from torch.linalg.svdvals in float64 (min(N, D) values; centred: their squares)."""
    x = z.double() - z.double().mean(dim=0) if centered else z.double()
    sigma = torch.linalg.svdvals(x)
    values = sigma**2 if centered else sigma
    p = values / values.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


@pytest.mark.filterwarnings("ignore:alpha_req needs more")
@pytest.mark.parametrize(("d", "window"), [(160, 90), (160, 160), (40, 300), (120, 50)])
def test_each_window_logs_both_rankmes_equal_to_svdvals_references(d, window):
    g = torch.Generator().manual_seed(d + window)
    scales = torch.arange(1, d + 1, dtype=torch.float32) ** -0.7
    mean = 2.0 * torch.randn(d, generator=g)  # a shared mean: the two variants differ a lot
    monitor = Monitor(every_n_steps=1, attention=False, head=None, window_rows=window, strict=True)
    monitor.attach(torch.nn.Linear(1, 1))
    rows, windows = [], []
    for step in range(8):
        chunk = torch.randn(2, 23, d, generator=g) * scales + mean  # 46 rows a step: windows close mid-way
        with monitor.step(step):
            monitor.observe("z", chunk)
        rows.append(chunk.reshape(-1, d))
        values = monitor.compute(step, spectra=True)
        if "geomon/rankme/z" in values:
            windows.append((torch.cat(rows), values, dict(monitor.spectra)))
            rows = []
    assert len(windows) >= 1
    for z, values, spectra in windows:
        assert z.shape[0] >= window
        assert keys.key(keys.RANKME_COV, "z") == "geomon/rankme_cov/z"
        uncentred, centred = float(values["geomon/rankme/z"]), float(values["geomon/rankme_cov/z"])
        assert uncentred == pytest.approx(_svdvals_rankme(z, False), rel=1e-7)
        assert centred == pytest.approx(_svdvals_rankme(z, True), rel=1e-7)
        assert uncentred == pytest.approx(float(rankme(z)), rel=1e-9)  # the functional on the same rows
        assert centred == pytest.approx(float(rankme(z, centered=True)), rel=1e-9)
        assert abs(uncentred - centred) > 1.0  # distinct keys hold distinct numbers
        assert ("geomon/alpha_req/z" in values) == (d > 100)
        spectrum = spectra["geomon/rankme/z"]
        assert spectrum.shape == (min(z.shape),)  # min(N, D) singular values, not the Gram's D eigenvalues
        torch.testing.assert_close(spectrum, torch.linalg.svdvals(z.double()), rtol=1e-6, atol=1e-9)


def test_the_probe_declares_both_keys():
    assert EmbeddingProbe("z", 64).keys() == ["geomon/rankme/z", "geomon/rankme_cov/z"]
    assert EmbeddingProbe("z", 128).keys() == ["geomon/rankme/z", "geomon/rankme_cov/z", "geomon/alpha_req/z"]


def test_a_non_finite_window_warns_and_does_not_crash():
    monitor = Monitor(every_n_steps=1, attention=False, head=None, window_rows=10)
    monitor.attach(torch.nn.Linear(1, 1))
    z = torch.randn(10, 8)
    z[3, 2] = float("inf")
    with monitor.step(0):
        monitor.observe("z", z)
    with pytest.warns(UserWarning, match="NaN or Inf"):
        values = monitor.compute(0, spectra=True)
    for key in ("geomon/rankme/z", "geomon/rankme_cov/z"):
        assert key not in values or not torch.isfinite(values[key])
    assert "geomon/rankme/z" not in monitor.spectra
