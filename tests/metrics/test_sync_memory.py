"""How many copies of a summed state a rank holds while the DDP sync reduces it (one gloo process, CPU).

The docs quote this number (docs/guides/streaming.md, "Memory during sync"): the state itself (torchmetrics' ``sync``
keeps it to restore after ``compute``; its own ``_copy_state_dict`` would clone it) and the copy geomon all-reduces,
so two, whatever the world size. The restored state is the local one, unchanged.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.distributed as dist

from geomon.metrics import NeuralCollapse, RankMe


def _copies(shape: tuple[int, ...]) -> int:
    """Distinct live float64 storages of at least ``shape``'s size held by tensors of exactly ``shape`` (the
    one-element defaults that torchmetrics' reset expands are not copies)."""
    gc.collect()
    size = torch.Size(shape).numel() * 8
    storages = set()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            is_state = isinstance(obj, torch.Tensor) and obj.dtype == torch.float64 and tuple(obj.shape) == shape
            if is_state and obj.untyped_storage().nbytes() >= size:
                storages.add(obj.untyped_storage().data_ptr())
    return len(storages)


@pytest.fixture
def one_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("make", "args", "shape"),
    [
        (lambda: RankMe(num_features=96, min_samples=1), (torch.randn(300, 96),), (96, 96)),
        (
            lambda: NeuralCollapse(num_classes=40, num_features=24),
            (torch.randn(300, 24), torch.arange(300) % 40),
            (24, 24),  # its Gram (the C x D sums share their shape with nc4's reference means)
        ),
    ],
    ids=["RankMe", "NeuralCollapse"],
)
def test_a_rank_holds_two_copies_of_a_state_while_it_is_reduced(one_process_group, monkeypatch, make, args, shape):
    metric = make()
    metric.update(*args)
    assert _copies(shape) == 1
    local = {name: (getattr(metric, name), float(getattr(metric, name).double().sum())) for name in metric._defaults}
    seen = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *rest, **kwargs):
        if tuple(tensor.shape) == shape:
            seen.append(_copies(shape))
        return all_reduce(tensor, *rest, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting_all_reduce)
    metric.compute()
    assert seen == [2]  # the state (also torchmetrics' cache) and the reduced copy
    assert _copies(shape) == 1  # the local state is restored and the reduced copy is freed
    for name, (tensor, total) in local.items():  # restored as it was: the same tensor, the same values
        assert getattr(metric, name) is tensor and float(tensor.double().sum()) == total, name
