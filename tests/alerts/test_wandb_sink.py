"""WandbSink against a real offline W&B run: the alerts are read back from the run's transaction log."""

import time
import warnings
from datetime import timedelta

import pytest

from geomon.alerts import AlertEngine, EntropyCollapse, MaxLogitAbove, WandbSink
from geomon.functional import GeomonWarning
from tests.alerts.sequences import ENT, LOGIT

wandb = pytest.importorskip("wandb")


def _read_alerts(run_file, count: int):
    from tests.wandb_records import alerts

    deadline = time.monotonic() + 30
    while True:  # the W&B service may still be flushing the run file when finish() returns on a loaded machine
        found = alerts(run_file)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_alerts_reach_an_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(mode="offline", dir=str(tmp_path), project="geomon-test")
    try:
        sinks = [
            WandbSink(run, wait_duration=timedelta(minutes=5), rules=["entropy_collapse"]),
            WandbSink(wait_duration=30, rules=["max_logit"], kinds=("fired",)),  # wandb.run at each event
        ]
        engine = AlertEngine([EntropyCollapse(patience=1), MaxLogitAbove()], sinks, strict=True)
        engine.evaluate(100, {LOGIT.format(0): 150.0}, {ENT.format(2): [0.6, 0.01, 0.02, 0.7]})
        engine.evaluate(200, {LOGIT.format(0): 20.0}, {ENT.format(2): [0.6, 0.5, 0.5, 0.7]})
    finally:
        run.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    found = _read_alerts(run_file, 3)
    assert [(a["title"], a["level"], a["wait_duration"]) for a in found] == [
        ("Entropy collapse: blocks.2.attn", "ERROR", 300_000),  # 2 of 4 heads: 50% -> ERROR
        ("Max attention logit: blocks.0.attn", "WARN", 30_000),
        ("Entropy collapse cleared: blocks.2.attn", "INFO", 300_000),
    ]
    assert found[0]["text"].startswith(
        "Entropy collapse in layer blocks.2.attn at step 100: heads 1, 2 of 4, normalised attention entropy 0.01 "
        "(head 1), below the threshold 0.1"
    )
    assert "step 100" in found[1]["text"] and "150" in found[1]["text"]


def test_without_a_run_events_are_dropped_with_one_warning():
    assert wandb.run is None
    sink = WandbSink()
    engine = AlertEngine([MaxLogitAbove()], [sink], strict=True)
    with pytest.warns(GeomonWarning, match="no active W&B run"):
        engine.evaluate(0, {LOGIT.format(0): 150.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.evaluate(1, {LOGIT.format(0): 20.0})
        engine.evaluate(2, {LOGIT.format(0): 200.0})
    assert caught == []  # warned once, not on every event
