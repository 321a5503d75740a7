"""Read what a callback's monitor computed, before the callback routes it anywhere."""

from __future__ import annotations


def spy_computes(callback) -> dict[int, dict[str, float]]:
    """What ``callback.monitor.compute`` returns from now on, by step, as Python floats (read before any routing)."""
    found, compute = {}, callback.monitor.compute

    def spy(step=None, **kwargs):
        values = compute(step, **kwargs)
        found[step] = {key: float(value) for key, value in values.items()}
        return values

    callback.monitor.compute = spy
    return found
