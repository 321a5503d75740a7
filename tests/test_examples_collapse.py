"""The collapse examples (neural collapse on digits, dimensional collapse in SSL) run in a fast mode and show what
they claim; their figures are PNGs."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("sklearn")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 10_000 < len(data) < 150_000  # something was drawn, and it stays small enough for the docs


def _nc1_reference(h: np.ndarray, y: np.ndarray) -> float:
    """Tr(Σ_W Σ_B^†) / C in float64 numpy, straight from METRICS.md §6 (balanced-case global mean)."""
    classes = np.unique(y)
    means = np.stack([h[y == c].mean(axis=0) for c in classes])
    centred = means - means.mean(axis=0)
    within = h - means[np.searchsorted(classes, y)]
    sigma_w = within.T @ within / len(h)
    sigma_b = centred.T @ centred / len(classes)
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / len(classes))


def test_neural_collapse_example_measures_the_head_input():
    example = _load("neural_collapse")
    from geomon import Monitor

    x, y = example.load_digits_tensors()
    torch.manual_seed(0)
    model = example.make_model()
    monitor = Monitor(every_n_steps=1, attention=False, neural_collapse=True, window_rows=len(x), alerts=())
    monitor.attach(model)
    row = example.measure(model, monitor, 0, x, y)
    model.eval()
    with torch.no_grad():  # the features entering the head, taken by hand
        h = model.body(x).double().numpy()
    assert row["nc1"] == pytest.approx(_nc1_reference(h, y.numpy()), rel=1e-6)
    assert math.isnan(row["nc4"])  # no previous window's class means yet: not logged, printed as nan
    assert 0.8 < row["train_error"] <= 1.0  # an untrained 10-way classifier


def test_neural_collapse_example_collapses_towards_the_simplex_etf(tmp_path):
    figure = tmp_path / "nc.png"
    history = _load("neural_collapse").main(["--epochs", "20", "--every", "5", "--figure", str(figure), "--quiet"])
    first, last = history[0], history[-1]
    assert [row["epoch"] for row in history] == [0, 5, 10, 15, 20]
    assert last["train_error"] < 0.01  # fits the training set
    assert last["nc1"] < first["nc1"] / 5  # within-class variability collapses
    assert last["nc2_equiangular"] < first["nc2_equiangular"]  # means head for equal angles,
    assert last["nc2_maxangle"] < first["nc2_maxangle"]  # with cosines near -1/(C-1)
    assert last["nc3"] < first["nc3"] / 4  # the classifier aligns with the class means
    assert math.isnan(first["nc4"]) and last["nc4"] < 0.02  # and decides as the nearest class centre
    _assert_png(figure)


def test_ssl_example_rankme_separates_the_collapse_from_vicreg(tmp_path):
    figure = tmp_path / "ssl.png"
    results = _load("ssl_rankme").main(["--steps", "150", "--figure", str(figure), "--quiet"])
    collapse, healthy = results["no_covariance"]["history"], results["vicreg"]["history"]
    key = "geomon/rankme/projector"
    for history in (collapse, healthy):  # a value every measured step from step 5 (the fill steps before each)
        assert [step for step, _ in history[key]] == list(range(5, 151, 5))
        assert all(math.isfinite(v) for _, v in history["geomon/alpha_req/projector"])  # D = 256 > 100
        assert "geomon/rankme/backbone" in history
    start = collapse[key][0][1]
    assert collapse[key][-1][1] < start / 3  # the collapse: RankMe falls steadily
    assert collapse[key][-1][1] < 0.5 * healthy[key][-1][1]  # and ends well below the run with the fix
    fired = results["no_covariance"]["alerts"]
    assert fired and fired[0][1] == "rank_collapse" and fired[0][2] == key
    assert results["vicreg"]["alerts"] == []
    _assert_png(figure)
