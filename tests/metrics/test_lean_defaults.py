"""torchmetrics keeps a default for every state and clones it on reset: geomon's defaults hold one element, so a
C x D class-sum state is not kept twice, and reset still gives full, writable, zero states."""

import torch

from geomon.metrics import NeuralCollapse, RankMe


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor))


def test_defaults_hold_one_element_and_reset_gives_full_zero_states():
    metric = NeuralCollapse(num_classes=2000, num_features=64, backend="torch")
    states = [getattr(metric, name) for name in metric._defaults]
    assert _bytes(metric._defaults.values()) < 0.001 * _bytes(states)  # was the same size as the states
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(500, 64, generator=g), torch.randint(0, 2000, (500,), generator=g)
    w = torch.randn(2000, 64, generator=g)
    metric.update(h, y, w)
    first = metric.compute()
    metric.reset()
    for name, default in metric._defaults.items():
        state = getattr(metric, name)
        assert state.shape == default.shape and state.is_contiguous() and torch.equal(state, default.expand_as(state))
    metric.update(h, y, w)
    fresh = NeuralCollapse(num_classes=2000, num_features=64, backend="torch")
    fresh.update(h, y, w)
    for name in (n for n in metric._defaults if not n.startswith("nc4")):  # a reset metric accumulates as a fresh
        torch.testing.assert_close(getattr(metric, name), getattr(fresh, name), rtol=0, atol=0)  # one (nc4 reads
    assert float(metric.nc4_count) == 500 and float(fresh.nc4_count) == 0  # the previous window's means: by design)
    for key, value in fresh.compute().items():
        torch.testing.assert_close(first[key], value, equal_nan=True)


def test_moving_a_metric_keeps_its_defaults_lean():
    metric = RankMe(num_features=256).to(torch.float64).to("cpu")
    gram = metric._defaults["gram"] if "gram" in metric._defaults else max(metric._defaults.values(), key=torch.numel)
    assert gram.numel() >= 256 * 256 and gram.untyped_storage().nbytes() <= 8
