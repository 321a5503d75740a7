"""examples/hf_trainer.py runs in a fast mode and logs what it claims, where it claims."""

import glob
import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"


def test_hf_trainer_example_logs_unprefixed_keys_to_log_history_and_tensorboard(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = importlib.util.spec_from_file_location("hf_trainer", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "20", "--every", "10", "--batch-size", "8", "--report-to", "tensorboard",
                           "--out", str(tmp_path)])  # fmt: skip

    assert result["head"] == "lm_head"
    measured = {row["step"]: row for row in result["measured"]}
    assert sorted(measured) == [10, 20]
    assert sorted(row["step"] for row in result["history"] if "loss" in row) == [10, 20]  # the Trainer's own logs
    for row in measured.values():
        for layer in ("transformer.h.0.attn", "transformer.h.1.attn"):
            assert 0.0 < row[f"geomon/attention/entropy_normalized/{layer}"] <= 1.0
            assert 0.0 < row[f"geomon/attention/entropy/{layer}"] <= math.log(example.CONTEXT)
        assert 1.0 <= row["geomon/rankme/lm_head.input"] <= 64
        for stat in ("nc1", "nc2_equinorm", "nc3", "cdnv"):  # labels came from the forward call's labels
            assert math.isfinite(row[f"geomon/nc/{stat}/lm_head.input"])
    assert result["values"] == {key: value for key, value in measured[20].items() if key.startswith("geomon/")}

    (log_dir,) = {str(Path(f).parent) for f in glob.glob(f"{tmp_path}/runs/**/events.out.tfevents.*", recursive=True)}
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    key = "geomon/attention/entropy/transformer.h.1.attn"
    assert [(event.step, event.value) for event in events.Scalars(key)] == [
        (step, pytest.approx(measured[step][key], rel=1e-6)) for step in (10, 20)
    ]
    pytest.importorskip("matplotlib")
    from geomon.tools.report import build_report

    report = build_report(log_dir, tmp_path / "report")  # geomon report draws the Trainer's TensorBoard run
    assert report.html.exists() and any(f.name == "attention_entropy.png" for f in report.figures)
    assert report.html.read_text().count("transformer.h.1.attn") >= 1
