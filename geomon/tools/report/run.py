"""What the report knows about a run, whatever logger wrote it: a long table of scalars, per-head values, alerts.

Rows are plain tuples so the readers stay simple: scalars ``(step, key, value)``, heads
``(step, key, head, value)``; alerts are :class:`Alert` records.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from geomon import keys
from geomon.tools.report.keys import ALERTS


class ReportError(Exception):
    """A run that cannot be reported on; the message is one line meant for the user."""


@dataclass(frozen=True, order=True)
class Alert:
    """One fired alert: a ``geomon_alerts.csv`` row, or a step where a ``geomon/alerts/<rule>`` count rose."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("step", "rule", "key", "kind", "level", "text")

    step: int
    rule: str
    key: str = ""
    kind: str = ""
    level: str = ""
    text: str = ""


@dataclass
class RunData:
    """Everything read from one run.

    Attributes:
        path: the path the user gave.
        source: which reader produced it: ``"csv"``, ``"csv-long"``, ``"tensorboard"`` or ``"wandb"``.
        files: the files that were read.
        scalars: ``(step, key, value)`` rows, every key the logger held (not only ``geomon/...``).
        heads: ``(step, key, head, value)`` rows of the ``geomon_heads.csv`` sidecar.
        sidecar_alerts: rows of the ``geomon_alerts.csv`` sidecar.
    """

    path: Path
    source: str
    files: list[Path] = field(default_factory=list)
    scalars: list[tuple[int, str, float]] = field(default_factory=list)
    heads: list[tuple[int, str, int, float]] = field(default_factory=list)
    sidecar_alerts: list[Alert] = field(default_factory=list)

    @cached_property
    def _series(self) -> dict[str, tuple[list[int], list[float]]]:
        by_key: dict[str, dict[int, float]] = {}
        for step, key, value in self.scalars:
            by_key.setdefault(key, {})[step] = value  # a step logged twice (resumed run): the last value wins
        return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}

    def keys(self) -> list[str]:
        """Every scalar key, in the order first seen."""
        return list(self._series)

    def geomon_keys(self) -> list[str]:
        """The ``geomon/...`` scalar keys."""
        return [key for key in self._series if keys.is_geomon(key)]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps (ascending) and values of one key; empty lists if it was never logged."""
        return self._series.get(key, ([], []))

    def names(self, prefix: str) -> list[str]:
        """What follows ``prefix`` in the keys that start with it (module or probe names), in depth order."""
        return sorted((key[len(prefix) :] for key in self._series if key.startswith(prefix)), key=natural_key)

    def last(self, key: str) -> float:
        """The value at the last step of a key (NaN if it was never logged)."""
        values = self.series(key)[1]
        return values[-1] if values else math.nan

    def step_range(self) -> tuple[int, int] | None:
        """First and last step of any ``geomon/...`` value or head row, or None without any."""
        steps = [step for key in self.geomon_keys() for step in self.series(key)[0]]
        steps += [row[0] for row in self.heads]
        return (min(steps), max(steps)) if steps else None

    def alerts(self) -> list[Alert]:
        """Sidecar alerts plus one per rise of a ``geomon/alerts/<rule>`` count (unless the sidecar has that step
        and rule), sorted by step."""
        found = set(self.sidecar_alerts)
        seen = {(alert.step, alert.rule) for alert in found}
        for rule in self.names(ALERTS):
            steps, counts = self.series(ALERTS + rule)
            for step, before, after in count_rises(steps, counts):
                if (step, rule) not in seen:
                    found.add(Alert(step, rule, text=f"{rule}: alert count {before:g} -> {after:g}"))
        return sorted(found)

    def alert_steps(self, families: tuple[str, ...] | None = None) -> list[int]:
        """The distinct steps with an alert; with ``families`` (key prefixes), only the alerts about them: an
        alert's key says what it is about, or, for an alert read off a count (no key), its rule
        (:data:`RULE_FAMILIES`); an alert about nothing known is about every figure."""
        return sorted({alert.step for alert in self.alerts() if families is None or about(alert, families)})


#: What the default rules watch, for alerts known only by their rule's name (``geomon/alerts/<rule>`` counts).
RULE_FAMILIES = {
    "entropy_collapse": (keys.prefix("attention"),),
    "max_logit": (keys.prefix("attention"),),
    "rank_collapse": (keys.prefix(keys.RANKME), keys.prefix(keys.RANKME_COV), keys.prefix(keys.ALPHA_REQ)),
}


#: Rules about the whole run, drawn on every figure whatever key their event names (``non_finite`` names the first
#: offending key in name order, while a diverged run is non-finite everywhere).
EVERY_FIGURE = frozenset({"non_finite"})


def about(alert: Alert, families: tuple[str, ...]) -> bool:
    """Whether ``alert`` concerns a key of one of ``families`` (key prefixes).

    Example:
        >>> about(Alert(4, "entropy_collapse", "geomon/attention/entropy/b.0"), ("geomon/rankme/",))
        False
        >>> about(Alert(6, "max_logit"), ("geomon/attention/max_logit/",)), about(Alert(6, "mine"), ("geomon/nc/",))
        (True, True)
        >>> about(Alert(9, "non_finite", "geomon/alpha_req/head.input"), ("geomon/attention/",))
        True
    """
    if alert.rule in EVERY_FIGURE:
        return True
    if keys.is_geomon(alert.key):
        return alert.key.startswith(families)
    watched = RULE_FAMILIES.get(alert.rule)
    return watched is None or any(f.startswith(w) or w.startswith(f) for f in families for w in watched)


def count_rises(steps: list[int], counts: list[float]) -> list[tuple[int, float, float]]:
    """Steps where a cumulative count rose, with the count before and after (it starts from 0).

    Example:
        >>> count_rises([0, 2, 4, 6, 8], [0, 0, 1, 1, 3])
        [(4, 0.0, 1.0), (8, 1.0, 3.0)]
    """
    rises, before = [], 0.0
    for step, count in zip(steps, counts, strict=True):
        if not math.isfinite(count):
            continue
        if count > before:
            rises.append((step, before, float(count)))
        before = float(count)
    return rises


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders numbered names by number, so layers sort by depth.

    Example:
        >>> sorted(["blocks.10.attn", "blocks.2.attn", "blocks.1.attn"], key=natural_key)
        ['blocks.1.attn', 'blocks.2.attn', 'blocks.10.attn']
    """
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)
