"""Progress bars for the long parts of a report (reading many event files, drawing figures).

``rich`` draws them when it is installed and stderr is a terminal; otherwise items pass through silently.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def track(items: Sequence[T], description: str, *, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items``, with a progress bar on stderr when ``enabled``, stderr is a TTY and rich imports.

    Example:
        >>> list(track([1, 2, 3], "counting", enabled=False))
        [1, 2, 3]
    """
    iterable: Iterable[T] = items
    if enabled and len(items) > 1 and sys.stderr.isatty():
        try:
            from rich.console import Console
            from rich.progress import track as rich_track
        except ImportError:
            pass
        else:
            iterable = rich_track(items, description=description, console=Console(stderr=True), transient=True)
    yield from iterable
