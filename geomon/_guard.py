"""The one guard around monitoring code that runs inside a training loop: a failure becomes a warning, said once.

DESIGN.md: monitoring never crashes training. Every hook, capture callback, probe computation and tracker call
runs through :meth:`Guard.run`; a failure is reported as a :class:`~geomon.GeomonWarning` naming what was skipped
(once per thing, so a probe that fails on every step does not flood the log), and ``strict=True`` raises instead
(for tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from geomon.functional import GeomonWarning

T = TypeVar("T")


class Guard:
    """Runs monitoring code so that it cannot break training.

    Example:
        >>> import warnings
        >>> guard = Guard()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     guard.run("a probe", lambda: 1 / 0)
        ...     guard.run("a probe", lambda: 1 / 0)
        >>> [str(w.message) for w in caught]
        ["geomon: a probe failed and was skipped: ZeroDivisionError('division by zero')"]
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.warned: set[str] = set()

    def run(self, what: str, fn: Callable[..., T], *args: Any, default: Any = None) -> T | Any:
        """``fn(*args)`` under ``no_grad``; on an exception, a warning (``strict``: the exception) and ``default``."""
        try:
            with torch.no_grad():
                return fn(*args)
        except Exception as error:  # monitoring must never break training
            if self.strict:
                raise
            self.warn_once(f"failed:{what}", f"geomon: {what} failed and was skipped: {error!r}")
            return default

    def warn_once(self, tag: str, message: str) -> None:
        """A :class:`~geomon.GeomonWarning` with ``message``, the first time ``tag`` is seen."""
        if tag not in self.warned:
            self.warned.add(tag)
            warnings.warn(message, GeomonWarning, stacklevel=3)
