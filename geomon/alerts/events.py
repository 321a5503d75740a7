"""What a rule returns: :class:`AlertEvent`, plus the small helpers that turn values into events and text.

Rules never act; they return events. An event is a plain, frozen record, so the same list can go to a log line,
a W&B alert and a user's action, and two DDP ranks that saw the same values hold equal events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Level = Literal["INFO", "WARN", "ERROR"]
Kind = Literal["fired", "recovered"]

#: Levels from least to most severe (the order ``min_level`` filters use).
LEVELS: tuple[Level, ...] = ("INFO", "WARN", "ERROR")
KINDS: tuple[Kind, ...] = ("fired", "recovered")

#: W&B refuses alert titles of 64 characters or more.
MAX_TITLE = 63


@dataclass(frozen=True)
class AlertEvent:
    """One alert: an episode that started (``kind="fired"``) or ended (``kind="recovered"``).

    Attributes:
        rule: name of the rule that produced it (also its counter, ``geomon/alerts/<rule>``).
        key: the value key the episode is about (e.g. ``geomon/attention/entropy_normalized/blocks.3.attn``);
            for rules over the whole model (non-finite values, custom rules), the first offending key or the rule name.
        step: the global step of the evaluation that fired or cleared it.
        kind: ``"fired"`` or ``"recovered"``.
        level: ``"INFO"``, ``"WARN"`` or ``"ERROR"``; recovered events are always ``"INFO"`` (the level of the
            episode they close is in ``details["fired_level"]``).
        title: short, under 64 characters (W&B's limit), and distinct per rule and key.
        text: one human sentence naming the layer or probe, the heads, the step, the value and the threshold.
        value: the worst value involved (the lowest entropy, the highest logit...), or ``None``.
        threshold: the bar the value crossed: a fixed threshold where one was crossed, else the level the
            relative test set (``(1 - relative_drop) x`` the baseline).
        baseline: the running baseline the value was compared with, for relative rules.
        heads: the head indices involved, for per-head values (empty for scalars).
        details: everything else, JSON-friendly (per-head values, model-wide share, fired step...).

    Example:
        >>> event = AlertEvent(rule="demo", key="geomon/x", step=3, kind="fired", level="WARN", title="t", text="x")
        >>> event.kind, event.heads
        ('fired', ())
    """

    rule: str
    key: str
    step: int
    kind: Kind
    level: Level
    title: str
    text: str
    value: float | None = None
    threshold: float | None = None
    baseline: float | None = None
    heads: tuple[int, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)


def make_title(text: str, keep: int = 0) -> str:
    """``text`` cut to W&B's title limit, keeping both ends (module names carry their meaning at the end).

    ``keep``: how many leading characters to keep whole (the part that tells rules apart, e.g.
    ``"Entropy collapse (strict): "``); at most ``MAX_TITLE - 16``, so that the rest keeps both of its ends.

    Example:
        >>> make_title("Entropy collapse: model.transformer.encoder.layers.11.self_attention.core")
        'Entropy collapse: model.transfor….layers.11.self_attention.core'
        >>> make_title("Entropy collapse (entropy_strict): model.transformer.encoder.layers.11.core", keep=35)
        'Entropy collapse (entropy_strict): model.transfor…ayers.11.core'
    """
    if len(text) <= MAX_TITLE:
        return text
    keep = max(0, min(keep, MAX_TITLE - 16))
    room = MAX_TITLE - 1 - keep  # characters left for the rest, besides the ellipsis
    head = keep + room // 2 + 1
    tail = MAX_TITLE - 1 - head
    return text[:head] + "…" + text[-tail:]


def subject(key: str) -> str:
    """The module or probe a key is about: its last ``/`` segment (module names use dots, never slashes).

    Example:
        >>> subject("geomon/attention/max_logit/blocks.0.attn")
        'blocks.0.attn'
    """
    return key.rsplit("/", 1)[-1]


def fmt(value: float | None) -> str:
    """A value as it appears in alert texts (4 significant digits)."""
    return "n/a" if value is None else f"{value:.4g}"


def join_heads(heads: Sequence[int], limit: int = 16) -> str:
    """``"0, 3, 5"``; long lists are cut with a count of the rest."""
    shown = ", ".join(str(h) for h in heads[:limit])
    return shown if len(heads) <= limit else f"{shown} and {len(heads) - limit} more"


def to_float(value: object) -> float:
    """A Python float from a float, int or NumPy scalar (tensors go through :func:`as_floats`)."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)  # type: ignore[arg-type]


def to_floats(values: object) -> tuple[float, ...]:
    """A tuple of floats from a sequence of numbers."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"expected a sequence of per-head numbers, got {type(values).__name__}")
    return tuple(to_float(v) for v in values)


def as_floats(
    scalars: Mapping[str, object], heads: Mapping[str, object] | None = None, *, skipped: list[str] | None = None
) -> tuple[dict[str, float], dict[str, tuple[float, ...]]]:
    """``(scalars, heads)`` as Python floats; the tensors of one device are copied to the host together, once.

    Scalars may be numbers or one-element tensors; per-head values sequences of numbers or 1-D tensors. A value
    that is neither raises ValueError, or, when ``skipped`` is a list, is left out and its key appended to it.

    Example:
        >>> as_floats({"a": torch.tensor(2.0), "b": 3}, {"a": torch.tensor([0.5, 1.0])})
        ({'b': 3.0, 'a': 2.0}, {'a': (0.5, 1.0)})
    """
    floats: dict[str, float] = {}
    vectors: dict[str, tuple[float, ...]] = {}
    pending: dict[torch.device, list[tuple[str, bool, torch.Tensor]]] = {}
    for is_vector, mapping in ((False, scalars), (True, heads or {})):
        for key, value in mapping.items():
            try:
                if isinstance(value, torch.Tensor):
                    shape_ok = value.ndim == 1 if is_vector else value.numel() == 1
                    if value.is_complex() or not shape_ok:
                        wanted = "a real 1-D tensor" if is_vector else "a real one-element tensor"
                        raise ValueError(f"expected {wanted}, got {value.dtype} of shape {tuple(value.shape)}")
                    pending.setdefault(value.device, []).append((key, is_vector, value.detach().reshape(-1)))
                elif is_vector:
                    vectors[key] = to_floats(value)
                else:
                    floats[key] = to_float(value)
            except ValueError as error:
                if skipped is None:
                    raise ValueError(f"{'per-head values' if is_vector else 'value'} of {key!r}: {error}") from None
                skipped.append(key)
    for group in pending.values():
        flat = torch.cat([t.to(torch.float64) for _, _, t in group]).cpu().tolist()  # one copy per device
        offset = 0
        for key, is_vector, t in group:
            part, offset = flat[offset : offset + t.numel()], offset + t.numel()
            if is_vector:
                vectors[key] = tuple(part)
            else:
                floats[key] = part[0]
    return floats, vectors
