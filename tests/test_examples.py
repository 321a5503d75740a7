"""Every example runs (in a fast mode) and shows what it claims."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dimensional_collapse_example_separates_the_three_encoders():
    results = _load("dimensional_collapse").main(["--batches", "5"])
    healthy, collapsed, fast = results["healthy"], results["collapsed"], results["fast decay"]
    assert collapsed[0] < 12 and collapsed[0] < fast[0] < healthy[0]  # collapse reads near its 8 live directions
    assert healthy[1] < fast[1]  # alpha-ReQ: a faster decay reads as a larger exponent
    assert abs(healthy[1] - 1.0) < 0.2  # scales k^-1/2 -> covariance eigenvalues k^-1
