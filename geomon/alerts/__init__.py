"""Alerts: small rules over the values geomon computes, that return events; sinks decide what an event does.

Rules (:class:`EntropyCollapse`, :class:`MaxLogitAbove`, :class:`RankCollapse`, :class:`NonFinite`,
:class:`Threshold`, :class:`Drop`, :class:`Custom`) fire once per episode after ``patience`` bad evaluations and
recover after ``patience`` clear ones. :class:`AlertEngine` runs them, counts fired events per rule, and calls the
sinks (:class:`LoggingSink`, :class:`WandbSink`, :class:`CsvSink`, :class:`CallableSink`, :class:`StopFlag`):
notifications on rank zero, actions on every rank. Nothing here imports Lightning or W&B.

Example:
    >>> from geomon.alerts import AlertEngine, StopFlag, default_rules
    >>> stop = StopFlag()
    >>> engine = AlertEngine(default_rules(), sinks=[stop])
    >>> _ = engine.evaluate(0, {"geomon/rankme/ln_f": float("nan")})
    >>> bool(stop), engine.counters()["geomon/alerts/non_finite"]
    (True, 1)
"""

from geomon.alerts._base import Episode, Rule
from geomon.alerts.engine import AlertEngine
from geomon.alerts.events import AlertEvent, Kind, Level
from geomon.alerts.generic import DEFAULT_IGNORE, Custom, Drop, NonFinite, Threshold
from geomon.alerts.rules import EntropyCollapse, MaxLogitAbove, RankCollapse, default_rules
from geomon.alerts.sinks import CallableSink, CsvSink, LoggingSink, Sink, StopFlag, WandbSink

__all__ = [
    "DEFAULT_IGNORE",
    "AlertEngine",
    "AlertEvent",
    "CallableSink",
    "CsvSink",
    "Custom",
    "Drop",
    "EntropyCollapse",
    "Episode",
    "Kind",
    "Level",
    "LoggingSink",
    "MaxLogitAbove",
    "NonFinite",
    "RankCollapse",
    "Rule",
    "Sink",
    "StopFlag",
    "Threshold",
    "WandbSink",
    "default_rules",
]
