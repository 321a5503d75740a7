"""The alert engine: rules in, events out, sinks called, counters kept, all of it checkpointable.

It does not know about Lightning or W&B. A training loop (or geomon's callback) calls :meth:`AlertEngine.evaluate`
on every logging step, on every rank, with the values the monitor computed collectively; every rank gets the same
events, rank zero notifies, and actions (sinks with ``all_ranks=True``) run everywhere at the same step.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from geomon import keys
from geomon._guard import Guard
from geomon.alerts._base import Heads, Rule, Scalars, is_integer
from geomon.alerts.events import AlertEvent, as_floats
from geomon.alerts.rules import default_rules
from geomon.alerts.sinks import Sink as SinkBase
from geomon.functional import GeomonWarning

Sink = Callable[[AlertEvent], Any]

COUNTER_PREFIX = keys.prefix(keys.ALERTS)


class AlertEngine:
    """Runs rules over each step's values and hands their events to sinks.

    Args:
        rules: the rules (unique names); ``None``: :func:`~geomon.alerts.default_rules`. The engine works on its own
            copies of them (:attr:`rules`): the objects passed in never change, so a list of rules reused for another
            run (another engine, monitor or callback) starts fresh, without the first run's episodes and baselines.
        sinks: callables ``(event) -> None``; those with ``all_ranks = True`` run on every rank, the others only
            where ``is_rank_zero``. A :class:`~geomon.alerts.Sink` whose ``rules`` filter names a rule that this
            engine does not have is a ValueError (here, and when :attr:`sinks` is set later).
        is_rank_zero: whether this process is global rank zero (settable later, e.g. at the trainer's setup).
        strict: raise what a rule or sink raises, instead of warning and skipping it (for tests).

    Example:
        >>> from geomon.alerts import MaxLogitAbove
        >>> engine = AlertEngine([MaxLogitAbove(threshold=50.0)])
        >>> events = engine.evaluate(10, {"geomon/attention/max_logit/blocks.0.attn": 80.0})
        >>> events[0].title, engine.counters()
        ('Max attention logit: blocks.0.attn', {'geomon/alerts/max_logit': 1})
    """

    def __init__(
        self,
        rules: Iterable[Rule] | None = None,
        sinks: Iterable[Sink] = (),
        *,
        is_rank_zero: bool = True,
        strict: bool = False,
    ) -> None:
        if rules is not None and (isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable)):
            raise ValueError(
                f"AlertEngine: rules must be a list of rules (or None for default_rules()), got {type(rules).__name__}"
            )
        given = default_rules() if rules is None else list(rules)
        names: list[str] = []
        for rule in given:
            if not callable(getattr(rule, "evaluate", None)) or not isinstance(getattr(rule, "name", None), str):
                raise ValueError(f"AlertEngine: every rule needs a str name and an evaluate() method, got {rule!r}")
            if rule.name in names:
                raise ValueError(
                    f"AlertEngine: rule names must be unique (they key the counters and the saved state), "
                    f"{rule.name!r} appears twice; pass name=... to tell the rules apart"
                )
            names.append(rule.name)
        self.rules: list[Rule] = [_own_copy(rule) for rule in given]
        self._sinks: list[Sink] = []
        self.sinks = sinks
        self.is_rank_zero = bool(is_rank_zero)
        self.strict = bool(strict)
        self._counts = dict.fromkeys(names, 0)
        self._skipped: set[str] = set()
        self._failures = Guard(strict)  # the rules and sinks that raised: each is warned about once

    @property
    def sinks(self) -> list[Sink]:
        """Where events go; set it to replace them (e.g. once the trainer's loggers are known): checked as in
        ``__init__``."""
        return self._sinks

    @sinks.setter
    def sinks(self, sinks: Iterable[Sink]) -> None:
        if isinstance(sinks, (str, bytes)) or callable(sinks) or not isinstance(sinks, Iterable):
            raise ValueError(f"AlertEngine: sinks must be a list of callables sink(event), got {type(sinks).__name__}")
        sinks = list(sinks)
        known = [rule.name for rule in self.rules]
        for sink in sinks:
            if not callable(sink):
                raise ValueError(f"AlertEngine: every sink must be callable as sink(event), got {sink!r}")
            unknown = sorted(set(sink.rules) - set(known)) if isinstance(sink, SinkBase) and sink.rules else []
            if unknown:
                raise ValueError(
                    f"AlertEngine: {type(sink).__name__} filters on rules that no rule of this engine is named: "
                    f"{', '.join(map(repr, unknown))} (the rules are {', '.join(map(repr, known)) or 'none'})"
                )
        self._sinks = sinks

    def evaluate(self, step: int, scalars: Scalars, heads: Heads | None = None) -> list[AlertEvent]:
        """Run every rule on this step's values; call the sinks; return the events (same on every rank).

        Args:
            step: the global step the values were measured on (an int or NumPy integer).
            scalars: ``{key: value}``; floats or one-element tensors (copied to the host here, once per device).
            heads: ``{key: per-head values}``; sequences of floats or 1-D tensors.
                A value that is neither is left out, with a warning (once per key).
        """
        if not is_integer(step):
            raise ValueError(
                f"AlertEngine.evaluate: step must be an integer (int or numpy integer, not bool), got {step!r}"
            )
        step = int(step)  # type: ignore[call-overload]  # events carry a Python int, whatever the loop counts in
        skipped: list[str] = []
        scalars, vectors = as_floats(scalars, heads, skipped=skipped)
        if skipped:
            message = f"AlertEngine: values of {', '.join(map(repr, skipped))} are not numbers; rules do not see them"
            if self.strict:
                raise ValueError(message)
            if not set(skipped) <= self._skipped:  # once per key, not on every step
                self._skipped.update(skipped)
                warnings.warn(message, GeomonWarning, stacklevel=2)
        events: list[AlertEvent] = []
        for rule in self.rules:
            try:
                found = list(rule.evaluate(step, scalars, vectors))
            except Exception as error:
                if self.strict:
                    raise
                self._failures.warn_once(
                    f"rule:{rule.name}",
                    f"geomon alert rule {rule.name!r} raised {type(error).__name__}: {error}; skipped at step {step} "
                    "(and at every later step where it raises, without another warning)",
                )
                continue
            self._counts[rule.name] += sum(event.kind == "fired" for event in found)
            events.extend(found)
        for event in events:
            for sink in self.sinks:
                if self.is_rank_zero or getattr(sink, "all_ranks", False):
                    self._call(sink, event)
        return events

    def _call(self, sink: Sink, event: AlertEvent) -> None:
        try:
            sink(event)
        except Exception as error:
            if self.strict:
                raise
            self._failures.warn_once(
                f"sink:{id(sink)}",
                f"geomon alert sink {sink!r} raised {type(error).__name__}: {error} on {event.title!r} (later "
                "failures of this sink are skipped without another warning)",
            )

    def counters(self) -> dict[str, int]:
        """``{"geomon/alerts/<rule>": fired events so far}`` for every rule (zeros included), to log as metrics."""
        return {COUNTER_PREFIX + name: count for name, count in self._counts.items()}

    def state_dict(self) -> dict[str, Any]:
        """Every rule's baselines, patience counters and open episodes, and the counters (plain containers)."""
        return {
            "rules": {rule.name: rule.state_dict() for rule in self.rules if hasattr(rule, "state_dict")},
            "counters": dict(self._counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Rules absent from ``state`` start fresh; state of unknown rules is ignored
        with a warning (the configuration changed between the runs)."""
        saved = dict(state.get("rules", {}))
        for rule in self.rules:
            if rule.name in saved and hasattr(rule, "load_state_dict"):
                rule.load_state_dict(saved.pop(rule.name))
        if saved:
            warnings.warn(
                f"AlertEngine.load_state_dict: no rule named {', '.join(map(repr, sorted(saved)))} here; "
                "their saved state is ignored",
                GeomonWarning,
                stacklevel=2,
            )
        counts = state.get("counters", {})
        self._counts = {name: int(counts.get(name, 0)) for name in self._counts}


def _own_copy(rule: Rule) -> Rule:
    """A deep copy of ``rule``, so that no state is shared with its other users (another engine, the caller)."""
    try:
        return copy.deepcopy(rule)
    except Exception as error:
        raise TypeError(
            f"AlertEngine: rule {rule.name!r} ({type(rule).__name__}) cannot be copied ({type(error).__name__}: "
            f"{error}); an engine works on its own copy of each rule, so that rules reused for another run start "
            "fresh: keep what cannot be copied (locks, files, clients) out of the rule, or give it a __deepcopy__"
        ) from error
