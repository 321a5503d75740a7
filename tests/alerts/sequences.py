"""Helpers for the alert tests: feed constructed value sequences to a rule and summarise what it returns."""

from __future__ import annotations

from collections.abc import Sequence

from geomon.alerts import AlertEvent

ENT = "geomon/attention/entropy_normalized/blocks.{}.attn"
LOGIT = "geomon/attention/max_logit/blocks.{}.attn"
RANK = "geomon/rankme/{}"
EVERY = 50  # evaluations happen every 50 global steps: patience counts evaluations, events carry global steps


def heads_frames(per_layer: Sequence[Sequence[Sequence[float]]], key: str = ENT) -> list[dict[str, list[float]]]:
    """``per_layer[layer][t]`` = head values of ``layer`` at evaluation ``t`` -> one heads dict per evaluation."""
    steps = len(per_layer[0])
    return [{key.format(layer): list(values[t]) for layer, values in enumerate(per_layer)} for t in range(steps)]


def run(rule, scalars=None, heads=None, *, start: int = 0) -> list[AlertEvent]:
    """Evaluate ``rule`` on evaluation ``start + t`` (global step ``EVERY * (start + t)``) for each frame."""
    n = len(scalars if scalars is not None else heads)
    events = []
    for t in range(n):
        step = EVERY * (start + t)
        events += rule.evaluate(step, scalars[t] if scalars is not None else {}, heads[t] if heads is not None else {})
    return events


def summary(events: Sequence[AlertEvent]) -> list[tuple[int, str, str, tuple[int, ...]]]:
    """``(evaluation index, kind, key, heads)`` of each event."""
    return [(event.step // EVERY, event.kind, event.key, event.heads) for event in events]
