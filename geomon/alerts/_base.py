"""Shared machinery of the rules: argument checks, the :class:`Rule` interface and the patience/recovery episode.

An *episode* is debounced twice: it opens only after ``patience`` consecutive bad evaluations, and closes only
after ``patience`` consecutive *clear* evaluations, where clear is stricter than "not bad" (a hysteresis band
between the two), so a value hovering at the threshold neither fires repeatedly nor flaps.
"""

from __future__ import annotations

import math
import numbers
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from geomon.alerts.events import LEVELS, AlertEvent, Level

Scalars = Mapping[str, float]
Heads = Mapping[str, Sequence[float]]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (Python or NumPy int or float), and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: object, minimum: int) -> int:
    """``int(value)`` if it is an integer (Python or NumPy) ``>= minimum``, else a ValueError saying so."""
    if not is_integer(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_float(
    owner: str, name: str, value: object, allowed: str, ok: Callable[[float], bool] = lambda v: True
) -> float:
    """``float(value)`` if it is a finite real number with ``ok(value)``, else a ValueError naming ``allowed``."""
    if not is_real(value) or not math.isfinite(value) or not ok(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_fraction(owner: str, name: str, value: object, *, optional: bool = False) -> float | None:
    """A number strictly between 0 and 1 (or ``None`` where allowed)."""
    if value is None and optional:
        return None
    allowed = "a number in (0, 1)" + (" or None to switch it off" if optional else "")
    return check_float(owner, name, value, allowed, lambda v: 0 < v < 1)


def check_level(owner: str, value: object) -> Level:
    """One of ``"INFO"``, ``"WARN"``, ``"ERROR"``."""
    if value not in LEVELS:
        raise ValueError(f"{owner}: level must be one of {', '.join(LEVELS)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_name(owner: str, value: object) -> str:
    """A rule name usable in a metric key: letters, digits, ``_``, ``.``, ``-``."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{owner}: name must be a non-empty string of letters, digits, '_', '.' or '-' "
            f"(it becomes the counter key geomon/alerts/<name>), got {value!r}"
        )
    return value


def check_pattern(owner: str, value: object) -> str:
    """A non-empty fnmatch pattern over value keys."""
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"{owner}: pattern must be a non-empty fnmatch pattern over keys (one string), e.g. 'geomon/rankme/*', "
            f"got {value!r}"
        )
    return value


class Rule:
    """The interface every rule implements (subclass it, or duck-type it, for a rule of your own).

    ``evaluate`` must be a deterministic function of the steps and values it has seen, so that every DDP rank,
    seeing the same (collectively computed) values, returns the same events at the same step. An
    :class:`~geomon.alerts.AlertEngine` works on a ``copy.deepcopy`` of each rule, so a rule must be copyable.
    """

    name: str = "rule"

    def evaluate(self, step: int, scalars: Scalars, heads: Heads | None = None) -> list[AlertEvent]:
        """The events (fired or recovered) that this evaluation produces; usually an empty list."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Baselines, patience counters and open episodes, as plain Python containers (checkpoint-safe)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Episode:
    """Patience and recovery of one watched unit (a value, or one head of a per-head value), plus its baseline.

    Example:
        >>> unit = Episode()
        >>> [unit.update(bad=True, clear=False, patience=2) for _ in range(3)]
        [None, 'fired', None]
        >>> [unit.update(bad=False, clear=True, patience=2) for _ in range(2)]
        [None, 'recovered']
    """

    __slots__ = ("active", "clear", "streak", "window")

    def __init__(self) -> None:
        self.streak = 0  # consecutive bad evaluations while idle
        self.clear = 0  # consecutive clear evaluations while active
        self.active = False
        self.window: list[float] = []  # the last healthy values, for the running baseline

    def update(self, *, bad: bool, clear: bool, patience: int) -> str | None:
        """Count one evaluation; ``"fired"`` / ``"recovered"`` on the evaluation that changes the state."""
        if not self.active:
            self.streak = self.streak + 1 if bad else 0
            if self.streak >= patience:
                self.active, self.clear = True, 0
                return "fired"
            return None
        self.clear = self.clear + 1 if clear else 0
        if self.clear >= patience:
            self.active, self.streak, self.clear = False, 0, 0
            return "recovered"
        return None

    def baseline(self, size: int) -> float | None:
        """Median of the last ``size`` healthy values, once there are ``size`` of them."""
        return statistics.median(self.window) if len(self.window) >= size else None

    def remember(self, value: float, size: int) -> None:
        """Add a healthy value to the baseline window (keeps the last ``size``)."""
        self.window.append(value)
        del self.window[:-size]

    def to_list(self) -> list[Any]:
        return [self.streak, self.clear, self.active, list(self.window)]

    @classmethod
    def from_list(cls, state: Sequence[Any]) -> Episode:
        unit = cls()
        unit.streak, unit.clear, unit.active, window = int(state[0]), int(state[1]), bool(state[2]), state[3]
        unit.window = [float(v) for v in window]
        return unit
