"""Known series for the report tests, and writers that put them into real runs (Lightning loggers, W&B offline)."""

from __future__ import annotations

import csv
from pathlib import Path

L0, L1 = "model.blocks.0.attn", "model.blocks.1.attn"
STEPS = [0, 2, 4, 6]
# Values exactly representable in float32, so TensorBoard's float32 events read back equal.
SERIES: dict[str, dict[int, float]] = {
    f"geomon/attention/entropy/{L0}": dict(zip(STEPS, [2.0, 1.75, 1.5, 1.25], strict=True)),
    f"geomon/attention/entropy/{L1}": dict(zip(STEPS, [2.5, 2.25, 2.0, 1.125], strict=True)),
    f"geomon/attention/entropy_normalized/{L0}": dict(zip(STEPS, [0.875, 0.75, 0.6875, 0.625], strict=True)),
    f"geomon/attention/entropy_normalized/{L1}": dict(zip(STEPS, [0.9375, 0.5, 0.25, 0.0625], strict=True)),
    f"geomon/attention/max_logit/{L0}": dict(zip(STEPS, [10.0, 20.0, 40.0, 80.0], strict=True)),
    f"geomon/attention/max_logit/{L1}": dict(zip(STEPS, [5.0, 5.0, 6.0, 7.0], strict=True)),
    "geomon/rankme/ln_f": {0: 30.0, 4: 25.0, 6: 27.5},  # not logged at step 2: an empty CSV cell
    "geomon/alpha_req/ln_f": {0: 1.0, 4: 0.875, 6: 0.8125},
    "geomon/nc/nc1/ln_f": {2: 5.0, 6: 0.5},
    "geomon/nc/gnc2_mean/ln_f": {2: -0.125, 6: -0.375},
    f"geomon/spectral/sigma/{L0}.qkv": dict(zip(STEPS, [1.5, 2.0, 3.0, 4.5], strict=True)),
    f"geomon/spectral/entropy_bound/{L0}": dict(zip(STEPS, [0.5, 0.375, 0.25, 0.125], strict=True)),
    "geomon/alerts/entropy_collapse": dict(zip(STEPS, [0.0, 0.0, 1.0, 1.0], strict=True)),  # fired at step 4
    "geomon/alerts/max_logit": dict(zip(STEPS, [0.0, 0.0, 0.0, 2.0], strict=True)),  # fired (twice) at step 6
    "train_loss": dict(zip(STEPS, [4.0, 3.5, 3.25, 3.0], strict=True)),
}
EXPECTED_FIGURES = {
    "attention_entropy.png", "attention_entropy_normalized.png", "attention_max_logit.png",
    "head_entropy_heatmap.png", "rankme_alpha_ln_f.png", "neural_collapse.png", "spectral_sigma.png",
    "entropy_bound.png",
}  # fmt: skip
HEADS = 4


def head_value(step: int, layer: int, head: int) -> float:
    """Per-head normalised entropy of the sidecar: layer 1's head 3 collapses to 1/32 at the last step."""
    if (step, layer, head) == (6, 1, 3):
        return 0.03125
    return 1.0 - 0.0625 * head - 0.03125 * layer - 0.015625 * step


def metrics_at(step: int) -> dict[str, float]:
    """Every key logged at ``step``."""
    return {key: points[step] for key, points in SERIES.items() if step in points}


def write_heads(folder: Path) -> Path:
    """A ``geomon_heads.csv`` sidecar with :func:`head_value` for both layers, 4 heads, every step."""
    file = Path(folder) / "geomon_heads.csv"
    with file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "key", "head", "value"])
        for step in STEPS:
            for layer, name in enumerate([L0, L1]):
                for head in range(HEADS):
                    key = f"geomon/attention/entropy_normalized/{name}"
                    writer.writerow([step, key, head, head_value(step, layer, head)])
    return file


def write_alerts(folder: Path) -> Path:
    """A ``geomon_alerts.csv`` sidecar with the step-4 entropy-collapse alert."""
    file = Path(folder) / "geomon_alerts.csv"
    key = f"geomon/attention/entropy_normalized/{L1}"
    file.write_text(f"step,rule,key,kind,level,text\n4,entropy_collapse,{key},threshold,WARN,normalised entropy low\n")
    return file


def log_all(logger) -> None:
    """Log every step's metrics through a Lightning logger and flush it."""
    for step in STEPS:
        logger.log_metrics(metrics_at(step), step=step)
    logger.save()
    logger.finalize("success")
