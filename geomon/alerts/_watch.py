"""The engine room of the threshold-like rules: values matched by a pattern, compared with bars, grouped per key.

Every matched key is watched per *unit*: each head of its per-head vector when one is given, else the scalar.
A unit is bad when its value crosses a bar (an absolute threshold, or a fraction of its running baseline) and clear
when it is back beyond the bar by the hysteresis band. The episode that the user sees is per *key* (one layer, one
probe; a *group* in the code): it fires when the first unit of the key has been bad for ``patience`` evaluations,
naming every unit that is collapsed at that step, and recovers when no unit of the key is active any more.

Escalation: the level of an event may depend on the whole model (:meth:`WatchRule.level_for` sees the model-wide
share of active units). An open episode fires again, at the higher level, only at an evaluation where one of *its
own* units became active and the level is then above the one it last fired at. Units of other keys becoming
active raise the level of *their* events, never re-fire a key whose own units did not change: so the event that
tips the model into ERROR is the one of the layer that tipped it.

Running baseline: the median of the last ``baseline_steps`` *healthy* values of the unit. A value that is bad, or
arrives while the unit's episode is open, is never added, so the baseline cannot follow a collapse down; it does
follow slow drift (heads specialising during training), which the absolute threshold is there to catch. The
relative test is armed only once the window is full.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

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
    check_pattern,
)
from geomon.alerts.events import AlertEvent, Level, as_floats, fmt, join_heads, make_title, subject

Direction = Literal["below", "above"]


class Bar(NamedTuple):
    """A value crossing ``value`` in ``direction`` is bad; it is clear once beyond ``clear`` the other way."""

    direction: Direction
    value: float
    clear: float
    reason: str
    relative: bool = False  # a fraction of the running baseline, not a fixed threshold

    def violated(self, x: float) -> bool:
        return x < self.value if self.direction == "below" else x > self.value

    def cleared(self, x: float) -> bool:
        return x >= self.clear if self.direction == "below" else x <= self.clear

    def excess(self, x: float) -> float:
        gap = self.value - x if self.direction == "below" else x - self.value
        return gap / max(abs(self.value), 1e-12)


class WatchRule(Rule):
    """Base of the pattern rules; subclasses give the bars, the wording and the level."""

    title_text = "Alert"  # "Entropy collapse"
    default_name = ""  # the name the rule has unless given one; other names appear in the titles
    noun = "value"  # "normalised attention entropy"
    where = "key"  # how a key is named in texts: "layer", "probe" (its last segment) or "key" (in full)
    low_is_bad = True  # which end is "worst" when several heads are involved
    advice = ""  # what to try, appended to fired texts

    def __init__(
        self,
        owner: str,
        *,
        name: str,
        pattern: str,
        patience: int,
        hysteresis: float,
        relative_drop: float | None,
        baseline_steps: int,
        cooldown: int,
        level: Level,
    ) -> None:
        self.name = check_name(owner, name)
        self.pattern = check_pattern(owner, pattern)
        self.patience = check_int(owner, "patience", patience, 1)
        self.hysteresis = check_float(owner, "hysteresis", hysteresis, "a number >= 0", lambda v: v >= 0)
        self.relative_drop = check_fraction(owner, "relative_drop", relative_drop, optional=True)
        self.baseline_steps = check_int(owner, "baseline_steps", baseline_steps, 1)
        self.cooldown = check_int(owner, "cooldown", cooldown, 0)
        self.level = check_level(owner, level)
        self._units: dict[str, dict[str, Episode]] = {}  # key -> head label ("" for the scalar) -> unit
        self._groups: dict[str, list[Any]] = {}  # key -> [active, fired step, heads, cooldown until, fired level]

    # -- what subclasses override ------------------------------------------------------------------------------
    def absolute_bars(self, key: str) -> list[tuple[Direction, float, str]]:
        """``(direction, value, reason)`` of the fixed thresholds that apply to ``key``."""
        return []

    def level_for(self, share: float, key_share: float) -> Level:
        """The level of a fired event: ``share`` = active units / units seen by this rule at this step (model-wide),
        ``key_share`` = active units / units of the key (e.g. collapsed heads of one layer)."""
        return self.level

    def summary(self, active: int, seen: int) -> str:
        """A model-wide clause appended to fired texts (e.g. the share of collapsed heads)."""
        return ""

    # -- evaluation ---------------------------------------------------------------------------------------------
    def bars(self, key: str, baseline: float | None) -> list[Bar]:
        h, out = self.hysteresis, []
        for direction, value, reason in self.absolute_bars(key):
            clear = value + h * abs(value) if direction == "below" else value - h * abs(value)
            out.append(Bar(direction, value, clear, reason))
        if self.relative_drop is not None and baseline is not None and baseline > 0:
            value = (1 - self.relative_drop) * baseline
            reason = f"more than {self.relative_drop:.0%} below its running baseline {fmt(baseline)}"
            out.append(Bar("below", value, min(value * (1 + h), baseline), reason, relative=True))
        return out

    def evaluate(self, step: int, scalars: Scalars, heads: Heads | None = None) -> list[AlertEvent]:
        scalars, vectors = as_floats(scalars, heads)
        keys = sorted(key for key in {*scalars, *vectors} if fnmatch.fnmatchcase(key, self.pattern))
        now: dict[str, dict[str, tuple[float, list[Bar], float | None]]] = {}
        newly: dict[str, bool] = {}  # key -> a unit of it became active at this evaluation
        for key in keys:
            values = list(enumerate(vectors[key])) if key in vectors else [(None, scalars[key])]
            units, now[key] = self._units.setdefault(key, {}), {}
            for head, value in values:
                if not math.isfinite(value):  # NaN / inf are the NonFinite rule's business
                    continue
                label = "" if head is None else str(head)
                unit = units.setdefault(label, Episode())
                baseline = unit.baseline(self.baseline_steps) if self.relative_drop is not None else None
                bars = self.bars(key, baseline)
                bad = any(bar.violated(value) for bar in bars)
                was_active = unit.active  # a value arriving while active never joins the baseline, even the last
                change = unit.update(bad=bad, clear=all(bar.cleared(value) for bar in bars), patience=self.patience)
                newly[key] = newly.get(key, False) or change == "fired"
                if self.relative_drop is not None and not bad and not was_active and not unit.active:
                    unit.remember(value, self.baseline_steps)
                now[key][label] = (value, bars, baseline)
        seen = sum(len(present) for present in now.values())
        active = sum(self._units[key][label].active for key, present in now.items() for label in present)
        events = []
        for key, present in now.items():
            if not present:  # no finite value for this key at this step: its episode waits for one
                continue
            group = self._groups.setdefault(key, [False, None, [], 0, None])
            active_now = sorted((lb for lb, unit in self._units[key].items() if unit.active), key=_label_order)
            key_share = sum(self._units[key][label].active for label in present) / len(present)
            level = self.level_for(active / seen if seen else 0.0, key_share)
            if not group[0] and active_now and step >= group[3]:
                self._groups[key] = [True, step, active_now, 0, level]
                events.append(self._fired(step, key, active_now, present, level, active, seen))
            elif group[0]:
                group[2] = sorted(set(group[2]) | set(active_now), key=_label_order)
                if not active_now:
                    group[0], group[3] = False, step + self.cooldown
                    events.append(self._recovered(step, key, group, present))
                elif newly[key] and _RANK[level] > _RANK.get(group[4], 0):  # its own heads got worse: a new level
                    escalated_from, group[4] = group[4], level
                    events.append(self._fired(step, key, active_now, present, level, active, seen, escalated_from))
        return events

    # -- events -------------------------------------------------------------------------------------------------
    def _subject(self, key: str) -> str:
        return key if self.where == "key" else f"{self.where} {subject(key)}"

    def _title(self, key: str, *, notes: tuple[str, ...] = (), cleared: bool = False) -> str:
        """``"<title text> (<rule name>, <notes>)[ cleared]: <layer>"``: W&B rate-limits and merges alerts by title,
        so two rules of one class (different thresholds, layers) must not share titles; the rule's name is left out
        only where it is the class's default (at most one rule of an engine has it) or already the title text."""
        named = (self.name,) if self.name not in (self.default_name, self.title_text) else ()
        tags = ", ".join((*named, *notes))
        prefix = f"{self.title_text}{f' ({tags})' if tags else ''}{' cleared' if cleared else ''}: "
        return make_title(prefix + (subject(key) if self.where != "key" else key), keep=len(prefix))

    def _heads_clause(self, key: str, labels: list[str]) -> str:
        heads = [int(label) for label in labels if label]
        if not heads:
            return ""
        total = sum(1 for label in self._units[key] if label)
        return f"head{'s' if len(heads) > 1 else ''} {join_heads(heads)} of {total}, "

    def _fired(self, step, key, labels, present, level, active, seen, escalated_from=None) -> AlertEvent:
        candidates = [label for label in labels if label in present] or list(present)  # present is never empty
        worst = max(candidates, key=lambda lb: max((b.excess(present[lb][0]) for b in present[lb][1]), default=0))
        value, bars, baseline = present[worst]
        crossed = [bar for bar in bars if bar.violated(value)] or bars
        which = f" (head {worst})" if len([lb for lb in labels if lb]) > 1 else ""
        patience = f"{self.patience} consecutive evaluation{'s' if self.patience > 1 else ''}"
        grown = "" if escalated_from is None else f" (grown from {escalated_from})"
        text = (
            f"{self.title_text}{grown} in {self._subject(key)} at step {step}: {self._heads_clause(key, labels)}"
            f"{self.noun} {fmt(value)}{which}, {' and '.join(bar.reason for bar in crossed)}, for {patience}"
            f"{self.summary(active, seen)}.{' ' + self.advice if self.advice and level != 'INFO' else ''}"
        )
        # the bar crossed: a fixed threshold where one was, else the level the relative test set
        threshold = next((b.value for b in sorted(crossed, key=lambda b: b.relative) if b.violated(value)), None)
        details = {
            "values": {label or "value": present[label][0] for label in present},
            "active": labels,
            "patience": self.patience,
            "active_units": active,
            "units_seen": seen,
            "share": active / seen if seen else 0.0,
            "bars": [{"direction": b.direction, "value": b.value, "clear": b.clear} for b in bars],
        }
        if escalated_from is not None:
            details["escalated_from"] = escalated_from
        return AlertEvent(
            rule=self.name, key=key, step=step, kind="fired", level=level,
            title=self._title(key, notes=(grown[2:-1],) if grown else ()), text=text,
            value=value, threshold=threshold, baseline=baseline,
            heads=tuple(int(label) for label in labels if label), details=details,
        )  # fmt: skip

    def _recovered(self, step: int, key: str, group: list[Any], present: Mapping[str, Any]) -> AlertEvent:
        members = [label for label in group[2] if label in present] or list(present)
        pick = min if self.low_is_bad else max
        worst = pick(members, key=lambda label: present[label][0])
        value, _, baseline = present[worst]
        patience = f"{self.patience} consecutive evaluation{'s' if self.patience > 1 else ''}"
        text = (
            f"{self.title_text} in {self._subject(key)} cleared at step {step} (fired at step {group[1]}): "
            f"{self._heads_clause(key, group[2])}{self.noun} back to {fmt(value)}"
            f" ({'lowest' if self.low_is_bad else 'highest'}) for {patience}."
        )
        details = {"fired_step": group[1], "fired_level": group[4], "values": {lb: present[lb][0] for lb in members}}
        return AlertEvent(
            rule=self.name, key=key, step=step, kind="recovered", level="INFO",
            title=self._title(key, cleared=True),
            text=text, value=value, baseline=baseline, heads=tuple(int(lb) for lb in group[2] if lb), details=details,
        )  # fmt: skip

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "units": {
                key: {label: unit.to_list() for label, unit in units.items()} for key, units in self._units.items()
            },
            "groups": {key: list(group) for key, group in self._groups.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._units = {
            key: {label: Episode.from_list(unit) for label, unit in units.items()}
            for key, units in state.get("units", {}).items()
        }
        self._groups = {
            key: [bool(g[0]), g[1], list(g[2]), int(g[3]), g[4]] for key, g in state.get("groups", {}).items()
        }


_RANK = {"INFO": 0, "WARN": 1, "ERROR": 2}


def _label_order(label: str) -> tuple[int, int]:
    return (0, 0) if not label else (1, int(label))
