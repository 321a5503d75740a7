"""The README's main job runs end to end (fast mode): a Lightning fit that logs every probe to local trackers."""

import csv
import math

import pytest

from geomon.tools import demo

pytest.importorskip("lightning")


def test_demo_trains_logs_every_probe_and_writes_a_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    values = demo.main(["--steps", "8", "--every", "4", "--batch", "8", "--out", str(tmp_path), "--quiet"])
    printed = capsys.readouterr().out
    assert "model.blocks.1.attn" in printed and "neural collapse" in printed and "where to look" in printed
    assert "alerts: none fired" in printed or "alerts fired: " in printed
    assert "attention geometry at step 4" in printed  # the step the values were measured on, not the 8 steps run
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value}
    for key in (
        "geomon/attention/entropy/model.blocks.0.attn",
        "geomon/attention/entropy_normalized/model.blocks.1.attn",
        "geomon/attention/max_logit/model.blocks.1.attn",
        "geomon/spectral/sigma/model.blocks.0.attn.qkv",
        "geomon/rankme/model.head.input",
        "geomon/nc/nc1/model.head.input",
        "train_loss",
    ):
        assert key in logged, key
    steps = sorted({int(row["step"]) for row in rows if row.get("geomon/attention/entropy/model.blocks.0.attn")})
    assert steps == [0, 4]
    assert (metrics.parent / "geomon_heads.csv").exists()
    assert list(tmp_path.glob("tensorboard/version_*/events.out.tfevents.*"))
    assert (tmp_path / "report" / "index.html").exists()
    for key, value in values.items():
        if key.startswith("geomon/attention/"):
            assert math.isfinite(value), key


def test_the_summary_names_the_alerts_that_fired():
    prefix = "geomon/alerts/"
    assert demo.alerts_line({prefix + "entropy_collapse": 0.0, "train_loss": 1.0}) == "alerts: none fired"
    line = demo.alerts_line({prefix + "entropy_collapse": 2.0, prefix + "max_logit_growth": 0.0, prefix + "nan": 1.0})
    assert line.startswith("alerts fired: entropy_collapse x2, nan x1 (") and "geomon_alerts.csv" in line
