"""Two processes (gloo, CPU), each updating with its own uneven share, give the one-process values on all data."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection

from geomon.functional import GeomonWarning
from geomon.metrics import AlphaReQ, AttentionEntropy, NeuralCollapse, RankMe, SpectralNorm

C, D, HEADS = 5, 120, 4
SPLIT = 130  # rank 0 takes rows [:SPLIT], rank 1 the rest: uneven on purpose


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, C, (400,), generator=g)
    centres = torch.randn(C, D, generator=g) * 3
    scale = torch.arange(1, D + 1) ** -0.5
    return {
        "z": torch.randn(200, D, generator=g) * scale,
        "features": centres[labels] + torch.randn(400, D, generator=g),
        "labels": labels,
        "weight": torch.randn(C, D, generator=g),
        "q": torch.randn(6, HEADS, 9, 8, generator=g) * 2,
        "k": torch.randn(6, 2, 9, 8, generator=g),
        "w": torch.randn(32, 16, generator=g),
    }


def _measure(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Update every metric with this process's share and compute (a collective under DDP)."""
    rankme, alpha = RankMe(num_features=D, min_samples=1), AlphaReQ(num_features=D)
    attention, spectral = AttentionEntropy(num_heads=HEADS), SpectralNorm()
    collapse = NeuralCollapse(num_classes=C, num_features=D)
    rankme.update(parts["z"])
    alpha.update(parts["z"])
    attention.update(parts["q"], parts["k"], is_causal=True)
    spectral.update(parts["w"])
    out = {"rankme": rankme.compute(), "alpha": alpha.compute(), "sigma": spectral.compute()}
    out |= {f"attention/{k}": v for k, v in attention.compute().items() if not k.endswith("per_head")}
    # two windows, so that nc4 of the second compares against the (global) means of the first
    collapse.update(parts["features1"], parts["labels1"], parts["weight"])
    out |= {f"nc_window1/{k}": v for k, v in collapse.compute().items()}
    collapse.reset()
    collapse.update(parts["features2"], parts["labels2"], parts["weight"])
    out |= {f"nc_window2/{k}": v for k, v in collapse.compute().items()}
    return {key: float(value) for key, value in out.items()}


def _whole(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        **data,
        "features1": data["features"][:200],
        "labels1": data["labels"][:200],
        "features2": data["features"][200:],
        "labels2": data["labels"][200:],
    }


def _share(data: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's rows of every sample-indexed tensor (uneven cuts); weights are replicated, as under DDP."""
    whole = _whole(data)
    cuts = {"z": SPLIT, "q": 2, "k": 2, "features1": 120, "labels1": 120, "features2": 60, "labels2": 60}
    return {
        key: (value if key not in cuts else value[: cuts[key]] if rank == 0 else value[cuts[key] :])
        for key, value in whole.items()
    }


def _compute_group(z: torch.Tensor) -> dict[str, float]:
    """Metrics with identical states share them in a MetricCollection compute group: sync must not reduce twice."""
    group = MetricCollection(
        {
            "plain": RankMe(num_features=D, min_samples=1),
            # 201 rows needed, 200 exist: NaN unless a second reduction doubles the count
            "centred": RankMe(num_features=D, min_samples=201, centered=True),
        },
        compute_groups=True,
    )
    group.update(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeomonWarning)
        values = {f"group/{k}": float(v) for k, v in group.compute().items()}
    values["group/local_rows_after_compute"] = float(group["centred"].n)
    return values


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        parts = _share(_data(), rank)
        values = _measure(parts) | _compute_group(parts["z"])
        torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path: Path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data = _data()
    single = _measure(_whole(data)) | _compute_group(data["z"])
    assert ranks[0].keys() == single.keys()
    assert [values.pop("group/local_rows_after_compute") for values in ranks] == [SPLIT, 200 - SPLIT]
    single.pop("group/local_rows_after_compute")
    assert not math.isnan(single["nc_window2/nc4"]) and math.isnan(single["nc_window1/nc4"])
    for key, expected in single.items():
        for rank, values in enumerate(ranks):
            if math.isnan(expected):
                assert math.isnan(values[key]), (rank, key)
            else:
                assert values[key] == pytest.approx(expected, rel=1e-6, abs=1e-9), (rank, key)
