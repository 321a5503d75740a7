"""Every example runs (in a fast mode) and shows what it claims."""

import importlib.util
from pathlib import Path

import pytest

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


def test_entropy_collapse_example_alerts_on_the_collapse_only(tmp_path, monkeypatch):
    import csv
    import math
    import time

    pytest.importorskip("lightning.pytorch")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    figure = tmp_path / "entropy.png"
    results = _load("entropy_collapse").main(["--fast", "--out", str(tmp_path), "--figure", str(figure)])
    collapse, reparam, healthy = results["collapse"], results["sigma_reparam"], results["healthy"]
    first = collapse["entropy_alert_steps"][0]  # the alert fires ...
    if collapse["spike_step"] is not None:  # ... before the loss spikes, or, where the fast run ends first,
        assert first < collapse["spike_step"]
    else:  # while the heads are collapsed
        assert first < collapse["steps"] and collapse["min_entropy"] < 0.1
    with open(collapse["alerts_csv"], newline="") as handle:  # the callback's sidecar beside the CSV log
        rows = [row for row in csv.DictReader(handle) if row["kind"] == "fired" and row["rule"] == "entropy_collapse"]
    assert int(rows[0]["step"]) == first and "attn" in rows[0]["key"]
    if importlib.util.find_spec("wandb"):
        from tests.wandb_records import alerts

        deadline = time.monotonic() + 30
        while True:  # the W&B service may still be flushing the run file after finish() on a loaded machine
            found = [a for a in alerts(collapse["wandb_run"]) if a["title"].startswith("Entropy collapse")]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert found and f"at step {first}" in found[0]["text"]
    for run in (reparam, healthy):  # no alert of any rule, no false alarm
        assert run["alerts"] == [] and not run["alerts_csv"].exists()
        assert run["spike_step"] is None and run["min_entropy"] > 0.3 and math.isfinite(run["final_loss"])
    data = figure.read_bytes()  # --figure: the entropy and max-logit curves of the three runs
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 150_000
