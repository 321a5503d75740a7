"""An independent re-implementation of the alert rules, written from docs/guides/alerts.md (not from the code):
the property tests compare every rule's events with what this reference says the documented conditions give.

The documented semantics, as read here:

- a unit (a scalar, or one head of a per-head vector) is *bad* when its value crosses a bar (a fixed threshold, or
  ``(1 - drop) x`` its running baseline); it is *clear* when it is beyond every bar by the hysteresis band
  (``bar +- hysteresis x |bar|``; for the relative bar ``(1 + hysteresis) x bar``, at most the baseline);
- it becomes active after ``patience`` consecutive bad evaluations and inactive after ``patience`` consecutive clear
  ones; a NaN / inf or missing value neither counts nor breaks a streak;
- the running baseline is the median of the unit's last ``baseline_steps`` values that were neither bad nor
  arrived while the unit was active; the relative test is armed once that window is full (and the baseline > 0);
- events are per key: it fires when a unit of it becomes active (naming every unit active then), unless the key
  recovered less than ``cooldown`` global steps ago; it fires again, inside the episode, when one of its own units
  becomes active and the level is then higher than the one it last fired at; it recovers when none is active;
- EntropyCollapse's level: ERROR once ``share_levels[1]`` of all heads seen at that evaluation are active, WARN once
  ``share_levels[0]`` of them, or ``layer_share`` of the layer's heads, are; else INFO;
- NonFinite / Custom: one model-wide episode of a single bad/clear signal (clear = not bad).
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from dataclasses import dataclass, field

RANK = {"INFO": 0, "WARN": 1, "ERROR": 2}


@dataclass
class Unit:
    streak: int = 0
    clear: int = 0
    active: bool = False
    window: list = field(default_factory=list)


@dataclass
class RefWatch:
    """``bars(key, baseline) -> [(direction, bar, clear_at)]``; ``level(share, key_share) -> level``."""

    pattern: str
    absolute: list  # [(direction, value)], or a function key -> that list
    patience: int = 1
    hysteresis: float = 0.0
    drop: float | None = None
    baseline_steps: int = 1
    cooldown: int = 0
    level: object = "WARN"  # a level, or a function (share, key_share) -> level
    units: dict = field(default_factory=dict)
    open: dict = field(default_factory=dict)  # key -> (fired level, heads so far)
    until: dict = field(default_factory=dict)

    def bars(self, key, baseline):
        out = []
        absolute = self.absolute(key) if callable(self.absolute) else self.absolute
        for direction, value in absolute:
            band = self.hysteresis * abs(value)
            out.append((direction, value, value + band if direction == "below" else value - band))
        if self.drop is not None and baseline is not None and baseline > 0:
            value = (1 - self.drop) * baseline
            out.append(("below", value, min((1 + self.hysteresis) * value, baseline)))
        return out

    def step(self, step, scalars, heads):
        """``[(kind, key, level, heads, escalated_from)]`` of one evaluation."""
        values = {}
        for key in sorted({*scalars, *heads}):
            if not fnmatch.fnmatchcase(key, self.pattern):
                continue
            vector = heads.get(key)
            values[key] = {str(h): v for h, v in enumerate(vector)} if vector is not None else {"": scalars[key]}
        became = {}
        seen = {}
        for key, units in values.items():
            became[key], seen[key] = False, []
            for label, value in units.items():
                if not math.isfinite(value):
                    continue
                seen[key].append(label)
                unit = self.units.setdefault((key, label), Unit())
                full = len(unit.window) >= self.baseline_steps
                baseline = statistics.median(unit.window[-self.baseline_steps :]) if full else None
                bars = self.bars(key, baseline if self.drop is not None else None)
                bad = any(v < b if d == "below" else v > b for d, b, _ in bars for v in [value])
                clear = all(value >= c if d == "below" else value <= c for d, _, c in bars)
                was_active = unit.active
                if not unit.active:
                    unit.streak = unit.streak + 1 if bad else 0
                    if unit.streak >= self.patience:
                        unit.active, unit.clear = True, 0
                        became[key] = True
                else:
                    unit.clear = unit.clear + 1 if clear else 0
                    if unit.clear >= self.patience:
                        unit.active, unit.streak, unit.clear = False, 0, 0
                if self.drop is not None and not bad and not was_active and not unit.active:
                    unit.window.append(value)
        n_seen = sum(len(labels) for labels in seen.values())
        n_active = sum(self.units[(key, label)].active for key, labels in seen.items() for label in labels)
        out = []
        for key, labels in seen.items():
            if not labels:
                continue
            active = sorted(
                (lb for (k, lb), unit in self.units.items() if k == key and unit.active),
                key=lambda lb: -1 if lb == "" else int(lb),
            )
            key_share = sum(self.units[(key, lb)].active for lb in labels) / len(labels)
            level = self.level(n_active / n_seen, key_share) if callable(self.level) else self.level
            if key not in self.open:
                if active and step >= self.until.get(key, -math.inf):
                    self.open[key] = (level, set(active))
                    out.append(("fired", key, level, _heads(active), None))
            else:
                fired_level, members = self.open[key]
                members |= set(active)
                if not active:
                    del self.open[key]
                    self.until[key] = step + self.cooldown
                    out.append(("recovered", key, "INFO", _heads(members), None))
                elif became[key] and RANK[level] > RANK[fired_level]:
                    self.open[key] = (level, members)
                    out.append(("fired", key, level, _heads(active), fired_level))
        return out


def _heads(labels):
    return tuple(sorted(int(lb) for lb in labels if lb != ""))


@dataclass
class RefLatch:
    """One model-wide episode of a bad / not-bad signal (NonFinite, Custom)."""

    patience: int = 1
    cooldown: int = 0
    streak: int = 0
    clear: int = 0
    active: bool = False
    open: bool = False
    until: float = -math.inf

    def step(self, step, bad):
        if not self.active:
            self.streak = self.streak + 1 if bad else 0
            if self.streak >= self.patience:
                self.active, self.clear = True, 0
        else:
            self.clear = 0 if bad else self.clear + 1
            if self.clear >= self.patience:
                self.active, self.streak = False, 0
        if not self.open and self.active and step >= self.until:
            self.open = True
            return "fired"
        if self.open and not self.active:
            self.open, self.until = False, step + self.cooldown
            return "recovered"
        return None


def entropy_level(share_levels=(0.25, 0.5), layer_share=0.5):
    def level(share, key_share):
        if share >= share_levels[1]:
            return "ERROR"
        return "WARN" if share >= share_levels[0] or key_share >= layer_share else "INFO"

    return level
