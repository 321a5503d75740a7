"""Rules over any key: non-finite values, user thresholds, relative drops, and user functions."""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from geomon import keys
from geomon.alerts._base import (
    Episode,
    Heads,
    Rule,
    Scalars,
    check_float,
    check_fraction,
    check_int,
    check_level,
    check_name,
)
from geomon.alerts._watch import Direction, WatchRule
from geomon.alerts.events import AlertEvent, Level, as_floats, fmt, make_title

#: Neural-collapse statistics that are NaN by definition in healthy runs (docs/metrics/neural_collapse.md):
#: ``nc4`` needs the class means of a previous window (NaN in the first, or with a NaN in the head's weight);
#: ``gnc2_var`` is a variance over pairs of classes, so a binary classifier (one pair) has none; ``nc3_cos_mean``
#: and ``unc3`` divide by the norm of each classifier row (a zero row gives NaN), ``nc3`` by the norm of the whole
#: head (an all-zero head, e.g. a zero-initialised one, gives NaN).
NAN_BY_DEFINITION_NC: tuple[str, ...] = ("nc4", "gnc2_var", "nc3", "nc3_cos_mean", "unc3")

#: Keys that are NaN by definition at times, so :class:`NonFinite` ignores them by default: the neural-collapse
#: statistics of :data:`NAN_BY_DEFINITION_NC`, and alpha-ReQ, NaN while the covariance has fewer non-zero
#: eigenvalues than its fit range needs. Non-finite features (or fewer than 2 classes in a window) still make
#: ``nc1``, ``cdnv`` and the others NaN, which stay watched, as do losses, entropies, logits and RankMe.
DEFAULT_IGNORE: tuple[str, ...] = (
    *(keys.pattern(keys.nc(stat)) for stat in NAN_BY_DEFINITION_NC),
    keys.pattern(keys.ALPHA_REQ),
)


class _Latch:
    """One model-wide episode: patience, recovery and cooldown of a single bad/clear signal."""

    def __init__(self) -> None:
        self.unit, self.open, self.since, self.until, self.level = Episode(), False, None, 0, None

    def update(self, step: int, bad: bool, patience: int, cooldown: int) -> str | None:
        self.unit.update(bad=bad, clear=not bad, patience=patience)
        if not self.open and self.unit.active and step >= self.until:
            self.open, self.since = True, step
            return "fired"
        if self.open and not self.unit.active:
            self.open, self.until = False, step + cooldown
            return "recovered"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"unit": self.unit.to_list(), "open": self.open, "since": self.since, "until": self.until}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.unit = Episode.from_list(state["unit"])
        self.open, self.since, self.until = bool(state["open"]), state["since"], int(state["until"])


class NonFinite(Rule):
    """Any NaN or inf among the values (scalars and per-head entries): one ERROR episode naming the keys.

    Args:
        ignore: fnmatch patterns of keys allowed to be non-finite (matched against the key and, for per-head
            values, against ``<key>/head<h>``); default :data:`DEFAULT_IGNORE`.
        patience: consecutive evaluations with a non-finite value before firing (and finite ones to recover).
        level: level of the fired events.
        cooldown: steps after a recovery before it may fire again.
        name: the rule's name.

    Example:
        >>> rule = NonFinite()
        >>> values = {"geomon/rankme/ln_f": float("nan"), "geomon/alpha_req/ln_f": float("nan")}
        >>> [(e.title, e.details["keys"]) for e in rule.evaluate(5, values)]
        [('Non-finite values', ['geomon/rankme/ln_f'])]
    """

    def __init__(
        self,
        ignore: Sequence[str] = DEFAULT_IGNORE,
        patience: int = 1,
        *,
        level: Level = "ERROR",
        cooldown: int = 0,
        name: str = "non_finite",
    ) -> None:
        owner = "NonFinite"
        valid = isinstance(ignore, Iterable) and not isinstance(ignore, (str, bytes))
        patterns = tuple(ignore) if valid else ()  # read once: an iterator passes the check and keeps its patterns
        if not valid or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(
                f"{owner}: ignore must be a sequence of non-empty fnmatch patterns (e.g. DEFAULT_IGNORE, or () to "
                f"watch every key), got {ignore!r}"
            )
        self.ignore = patterns
        self.name = check_name(owner, name)
        self.patience = check_int(owner, "patience", patience, 1)
        self.level = check_level(owner, level)
        self.cooldown = check_int(owner, "cooldown", cooldown, 0)
        self._latch = _Latch()

    def _title(self, cleared: bool = False) -> str:
        """``"Non-finite values"``, with the rule's name where it is not the default one (W&B merges by title)."""
        named = "" if self.name == "non_finite" else f" ({self.name})"
        return make_title(f"Non-finite values{named}{' cleared' if cleared else ''}")

    def _ignored(self, *keys: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for key in keys for pattern in self.ignore)

    def evaluate(self, step: int, scalars: Scalars, heads: Heads | None = None) -> list[AlertEvent]:
        scalars, vectors = as_floats(scalars, heads)
        bad = [(k, v) for k, v in sorted(scalars.items()) if not math.isfinite(v) and not self._ignored(k)]
        for key, values in sorted(vectors.items()):
            for h, value in enumerate(values):
                if not math.isfinite(value) and not self._ignored(key, f"{key}/head{h}"):
                    bad.append((f"{key}/head{h}", value))
        change = self._latch.update(step, bool(bad), self.patience, self.cooldown)
        if change == "fired":
            listed = ", ".join(f"{key} ({value})" for key, value in bad[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            text = f"Non-finite values at step {step} in {len(bad)} key{'s' if len(bad) > 1 else ''}: {listed}{more}."
            details = {"keys": [key for key, _ in bad], "values": {key: str(value) for key, value in bad}}
            event = AlertEvent(
                rule=self.name, key=bad[0][0], step=step, kind="fired", level=self.level, title=self._title(),
                text=text, value=bad[0][1], details=details,
            )  # fmt: skip
            return [event]
        if change == "recovered":
            text = f"All watched values are finite again at step {step} (non-finite since step {self._latch.since})."
            details = {"fired_step": self._latch.since, "fired_level": self.level}
            event = AlertEvent(
                rule=self.name, key=self.name, step=step, kind="recovered", level="INFO",
                title=self._title(cleared=True), text=text, details=details,
            )  # fmt: skip
            return [event]
        return []

    def state_dict(self) -> dict[str, Any]:
        return self._latch.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._latch.load_state_dict(state)


class Threshold(WatchRule):
    """Any key matched by ``pattern`` above ``above`` or below ``below`` for ``patience`` evaluations.

    Args:
        pattern: fnmatch pattern over keys, e.g. ``"geomon/spectral/sigma/*"``.
        above: fire above this value (``None``: no upper bar).
        below: fire below this value (``None``: no lower bar).
        patience: consecutive bad evaluations before firing (and clear ones before recovering).
        hysteresis: relative band for recovery: clear again once ``hysteresis x |bar|`` back inside.
        level: level of the fired events.
        cooldown: steps after a recovery before the same key may fire again.
        name: the rule's name (give each rule of an engine its own).

    Example:
        >>> rule = Threshold("geomon/spectral/sigma/*", above=50.0, name="sigma")
        >>> rule.evaluate(3, {"geomon/spectral/sigma/blocks.0.qkv": 64.0})[0].text
        'sigma in geomon/spectral/sigma/blocks.0.qkv at step 3: value 64, above 50, for 1 consecutive evaluation.'
    """

    noun = "value"
    where = "key"

    def __init__(
        self,
        pattern: str,
        above: float | None = None,
        below: float | None = None,
        patience: int = 1,
        *,
        hysteresis: float = 0.0,
        level: Level = "WARN",
        cooldown: int = 0,
        name: str = "threshold",
    ) -> None:
        owner = "Threshold"
        super().__init__(
            owner, name=name, pattern=pattern, patience=patience, hysteresis=hysteresis, relative_drop=None,
            baseline_steps=1, cooldown=cooldown, level=level,
        )  # fmt: skip
        if above is None and below is None:
            raise ValueError(f"{owner}: give above=, below= or both (the value range outside of which it fires)")
        self.above = None if above is None else check_float(owner, "above", above, "a finite number or None")
        self.below = None if below is None else check_float(owner, "below", below, "a finite number or None")
        if self.above is not None and self.below is not None and not self.below < self.above:
            raise ValueError(f"{owner}: below must be smaller than above, got below={below!r}, above={above!r}")
        self.title_text = name
        self.low_is_bad = self.below is not None

    def absolute_bars(self, key: str) -> list[tuple[Direction, float, str]]:
        bars: list[tuple[Direction, float, str]] = []
        if self.below is not None:
            bars.append(("below", self.below, f"below {fmt(self.below)}"))
        if self.above is not None:
            bars.append(("above", self.above, f"above {fmt(self.above)}"))
        return bars


class Drop(WatchRule):
    """Any key matched by ``pattern`` falling more than ``fraction`` below its running baseline.

    The baseline is the median of the unit's last ``baseline_steps`` healthy values (never updated by a dropped
    value or during an episode, so it does not chase the drop). Meant for positive quantities: a key whose
    baseline is not positive is not tested.

    Args:
        pattern: fnmatch pattern over keys, e.g. ``"geomon/alpha_req/*"``.
        fraction: relative drop that counts as bad, in (0, 1).
        patience: consecutive bad evaluations before firing (and clear ones before recovering).
        baseline_steps: size of the baseline window; the rule is armed once it is full.
        hysteresis: clear again once ``(1 + hysteresis) x`` the bar (at most the baseline).
        level: level of the fired events.
        cooldown: steps after a recovery before the same key may fire again.
        name: the rule's name.

    Example:
        >>> rule = Drop("geomon/rankme/*", 0.5, patience=1, baseline_steps=2)
        >>> [len(rule.evaluate(s, {"geomon/rankme/ln_f": v})) for s, v in enumerate([100.0, 90.0, 30.0])]
        [0, 0, 1]
    """

    noun = "value"
    where = "key"

    def __init__(
        self,
        pattern: str,
        fraction: float,
        patience: int = 3,
        *,
        baseline_steps: int = 10,
        hysteresis: float = 0.1,
        level: Level = "WARN",
        cooldown: int = 0,
        name: str = "drop",
    ) -> None:
        check_fraction("Drop", "fraction", fraction)
        super().__init__(
            "Drop", name=name, pattern=pattern, patience=patience, hysteresis=hysteresis, relative_drop=fraction,
            baseline_steps=baseline_steps, cooldown=cooldown, level=level,
        )  # fmt: skip
        self.title_text = name


class Custom(Rule):
    """A user function as a rule: ``fn(step, scalars, heads) -> bool | str | None``.

    Truthy = bad; a string becomes the event's text. Patience, recovery and cooldown work as for every rule.
    ``scalars`` and ``heads`` arrive as Python floats. Keep ``fn`` deterministic (no wall clock, no randomness):
    every rank must reach the same decision. An engine works on a copy of the rule, but calls ``fn`` itself:
    state that ``fn`` keeps is shared by every engine given the rule.

    Args:
        name: the rule's name (counter ``geomon/alerts/<name>``).
        fn: the test.
        patience: consecutive truthy evaluations before firing (and falsy ones before recovering).
        level: level of the fired events.
        cooldown: steps after a recovery before it may fire again.

    Example:
        >>> rule = Custom("wide_logits", lambda step, s, h: s.get("geomon/attention/max_logit/a", 0) > 30)
        >>> [e.kind for e in rule.evaluate(1, {"geomon/attention/max_logit/a": 31.0})]
        ['fired']
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[int, Scalars, Heads], bool | str | None],
        *,
        patience: int = 1,
        level: Level = "WARN",
        cooldown: int = 0,
    ) -> None:
        self.name = check_name("Custom", name)
        if not callable(fn):
            raise ValueError(f"Custom: fn must be callable as fn(step, scalars, heads), got {type(fn).__name__}")
        self.fn = fn
        self.patience = check_int("Custom", "patience", patience, 1)
        self.level = check_level("Custom", level)
        self.cooldown = check_int("Custom", "cooldown", cooldown, 0)
        self._latch = _Latch()

    def __deepcopy__(self, memo: dict[int, Any]) -> Custom:
        """A copy with its own episode state that calls the same ``fn`` (the user's function, not a copy of it: a
        bound method would otherwise copy the object it is bound to, e.g. a whole model)."""
        clone = copy.copy(self)
        memo[id(self)] = clone
        for attribute, value in vars(self).items():
            if attribute != "fn":
                setattr(clone, attribute, copy.deepcopy(value, memo))
        return clone

    def evaluate(self, step: int, scalars: Scalars, heads: Heads | None = None) -> list[AlertEvent]:
        scalars, vectors = as_floats(scalars, heads)
        result = self.fn(step, scalars, vectors)
        change = self._latch.update(step, bool(result), self.patience, self.cooldown)
        if change is None:
            return []
        if change == "fired":
            text = result if isinstance(result, str) else f"Rule {self.name} fired at step {step}."
            event = AlertEvent(
                rule=self.name, key=self.name, step=step, kind="fired", level=self.level, title=make_title(self.name),
                text=text,
            )  # fmt: skip
            return [event]
        text = f"Rule {self.name} cleared at step {step} (fired at step {self._latch.since})."
        details = {"fired_step": self._latch.since, "fired_level": self.level}
        event = AlertEvent(
            rule=self.name, key=self.name, step=step, kind="recovered", level="INFO",
            title=make_title(f"{self.name} cleared"), text=text, details=details,
        )  # fmt: skip
        return [event]

    def state_dict(self) -> dict[str, Any]:
        return self._latch.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._latch.load_state_dict(state)
