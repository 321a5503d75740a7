"""Where events go: a log line, a W&B alert, a CSV file, a user function, a stop flag.

A sink is any callable ``(event) -> None``. Its ``all_ranks`` attribute (default ``False`` when absent) tells the
engine whether it runs on every DDP rank or only on rank zero: notifications (logs, W&B) run once, on rank zero;
*actions* that change the run (stop, checkpoint) must run on every rank, and they can, because every rank evaluates
the same rules on the same collectively computed values and so gets the same events at the same step.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from geomon.alerts.events import KINDS, LEVELS, AlertEvent, Kind, Level
from geomon.functional import GeomonWarning


class Sink:
    """Base of the sinks: filters by kind, level and rule, then calls :meth:`emit`.

    Args:
        kinds: the event kinds passed on (``"fired"``, ``"recovered"``).
        min_level: the least severe level passed on (recovered events are ``"INFO"``).
        rules: rule names passed on (``None``: all). An :class:`~geomon.alerts.AlertEngine` refuses a sink that
            names a rule it does not have (a typo would silently pass nothing on).
    """

    all_ranks: bool = False

    def __init__(
        self,
        *,
        kinds: Collection[Kind] = KINDS,
        min_level: Level = "INFO",
        rules: Collection[str] | None = None,
    ) -> None:
        owner = type(self).__name__
        given = _strings(kinds)  # read once: an iterator passes the checks and keeps its items
        if given is None or not given or not given <= set(KINDS):
            raise ValueError(f"{owner}: kinds must be a non-empty collection of {KINDS}, got {kinds!r}")
        if min_level not in LEVELS:
            raise ValueError(f"{owner}: min_level must be one of {', '.join(LEVELS)}, got {min_level!r}")
        names = None if rules is None else _strings(rules)
        if rules is not None and names is None:
            raise ValueError(f"{owner}: rules must be a collection of rule names or None (all rules), got {rules!r}")
        if names is not None and not names:
            message = "rules must name at least one rule, or be None for all (an empty filter passes nothing on)"
            raise ValueError(f"{owner}: {message}")
        self.kinds = given
        self.min_level = min_level
        self.rules = names

    def accepts(self, event: AlertEvent) -> bool:
        """Whether ``event`` passes the filters."""
        return (
            event.kind in self.kinds
            and LEVELS.index(event.level) >= LEVELS.index(self.min_level)
            and (self.rules is None or event.rule in self.rules)
        )

    def __call__(self, event: AlertEvent) -> None:
        if self.accepts(event):
            self.emit(event)

    def emit(self, event: AlertEvent) -> None:
        raise NotImplementedError


def _strings(values: object) -> frozenset[str] | None:
    """``values`` as a frozenset when it is a collection of strings (not a string itself), else ``None``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        return None
    items = tuple(values)
    return frozenset(items) if all(isinstance(item, str) for item in items) else None


class LoggingSink(Sink):
    """Log events at their level (``INFO``, ``WARNING`` for WARN, ``ERROR``); recovered ones as info. Rank zero only.

    Example:
        >>> sink = LoggingSink()
        >>> sink(AlertEvent(rule="r", key="k", step=1, kind="recovered", level="INFO", title="t", text="all clear"))
    """

    def __init__(self, logger: logging.Logger | None = None, **filters: Any) -> None:
        super().__init__(**filters)
        if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
            raise ValueError(f"LoggingSink: logger must be a logging.Logger or None, got {logger!r}")
        self.logger = logger if logger is not None else logging.getLogger("geomon")

    def emit(self, event: AlertEvent) -> None:
        level = "INFO" if event.kind == "recovered" else event.level
        self.logger.log({"INFO": logging.INFO, "WARN": logging.WARNING}.get(level, logging.ERROR), "%s", event.text)


class WandbSink(Sink):
    """Send events as W&B alerts: ``run.alert(title=, text=, level=wandb.AlertLevel.<LEVEL>, wait_duration=)``.

    Rank zero only. W&B does not send a second alert with the same title within ``wait_duration``; titles name the
    rule and the layer, so different layers never silence each other. Offline runs keep the alerts in their run
    file (``wandb sync`` uploads them; they are delivered only by an online run).

    Args:
        run: a ``wandb.Run`` (e.g. Lightning's ``WandbLogger.experiment``); ``None``: ``wandb.run`` at each event,
            and events are dropped (with one warning) while there is none.
        wait_duration: seconds (or a timedelta) W&B waits before another alert with the same title; must be > 0
            (W&B reads 0 as its default of one minute).
        **filters: ``kinds``, ``min_level``, ``rules`` (see :class:`Sink`).
    """

    def __init__(self, run: Any = None, *, wait_duration: float | timedelta = 60.0, **filters: Any) -> None:
        super().__init__(**filters)
        seconds = wait_duration.total_seconds() if isinstance(wait_duration, timedelta) else wait_duration
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"WandbSink: wait_duration must be positive seconds or a timedelta, got {wait_duration!r}")
        self.run = run
        self.wait_duration = timedelta(seconds=seconds)
        self._warned = False

    def emit(self, event: AlertEvent) -> None:
        import wandb  # lazily: geomon never imports wandb unless this sink is used

        run = self.run if self.run is not None else wandb.run
        if run is None:
            if not self._warned:
                message = "WandbSink: no active W&B run; alerts are dropped until there is one"
                warnings.warn(message, GeomonWarning, stacklevel=3)
                self._warned = True
            return
        run.alert(
            title=event.title, text=event.text, level=wandb.AlertLevel[event.level], wait_duration=self.wait_duration
        )


class CsvSink(Sink):
    """Append events to a CSV file with columns ``step,rule,key,kind,level,text`` (rank zero only).

    This is the ``geomon_alerts.csv`` sidecar that ``geomon report`` reads and draws as alert lines. The file is
    opened and closed per event (events are rare), so a crash loses nothing; the header is written when the file
    is new or empty.

    Args:
        path: the CSV file (its directory is created).
        **filters: ``kinds``, ``min_level``, ``rules`` (see :class:`Sink`).
    """

    COLUMNS = ("step", "rule", "key", "kind", "level", "text")

    def __init__(self, path: str | Path, **filters: Any) -> None:
        super().__init__(**filters)
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"CsvSink: path must be a file path (str or os.PathLike), got {path!r}")
        self.path = Path(path)

    def emit(self, event: AlertEvent) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            if new:
                writer.writerow(self.COLUMNS)
            writer.writerow([event.step, event.rule, event.key, event.kind, event.level, event.text])


class CallableSink(Sink):
    """A user function ``fn(event)``, on every rank by default (the form actions take).

    An action that runs on every rank must not depend on anything rank-specific, and must not start a collective
    of its own unless it is sure every rank gets there (they do: same events, same step, same order).

    Args:
        fn: called with each accepted event.
        all_ranks: run on every rank (``True``) or only on rank zero.
        **filters: ``kinds``, ``min_level``, ``rules`` (see :class:`Sink`).

    Example:
        >>> seen = []
        >>> sink = CallableSink(seen.append, min_level="ERROR")
        >>> sink(AlertEvent(rule="r", key="k", step=1, kind="fired", level="WARN", title="t", text="x"))
        >>> seen
        []
    """

    def __init__(self, fn: Callable[[AlertEvent], Any], *, all_ranks: bool = True, **filters: Any) -> None:
        super().__init__(**filters)
        if not callable(fn):
            raise ValueError(f"CallableSink: fn must be callable as fn(event), got {type(fn).__name__}")
        self.fn = fn
        self.all_ranks = bool(all_ranks)

    def emit(self, event: AlertEvent) -> None:
        self.fn(event)


class StopFlag(Sink):
    """An action with no framework behind it: remembers the first accepted event; a loop polls it and stops.

    Runs on every rank, so every rank sees ``triggered`` at the same step. Defaults: fired ``ERROR`` events only.

    Example:
        >>> stop = StopFlag()
        >>> stop(AlertEvent(rule="non_finite", key="k", step=9, kind="fired", level="ERROR", title="t", text="x"))
        >>> bool(stop), stop.event.step
        (True, 9)
    """

    all_ranks = True

    def __init__(self, *, kinds: Collection[Kind] = ("fired",), min_level: Level = "ERROR", **filters: Any) -> None:
        super().__init__(kinds=kinds, min_level=min_level, **filters)
        self.event: AlertEvent | None = None

    @property
    def triggered(self) -> bool:
        return self.event is not None

    def __bool__(self) -> bool:
        return self.triggered

    def reset(self) -> None:
        self.event = None

    def emit(self, event: AlertEvent) -> None:
        if self.event is None:
            self.event = event
