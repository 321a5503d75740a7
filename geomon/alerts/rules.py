"""The rules for the failures the literature names: attention-entropy collapse, runaway attention logits, dimensional
collapse of embeddings; and :func:`default_rules`, the standard set.

Each is a :class:`~geomon.alerts._watch.WatchRule` over geomon's keys: it fires once per episode and per layer
(or probe) after ``patience`` consecutive bad evaluations and recovers after ``patience`` consecutive clear ones.
See ``docs/guides/alerts.md`` for why the defaults are what they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from geomon import keys
from geomon.alerts._base import Rule, check_float, check_fraction, check_int, is_real
from geomon.alerts._watch import Direction, WatchRule
from geomon.alerts.events import Level, fmt, subject
from geomon.alerts.generic import NonFinite

_ATTENTION_ADVICE = (
    "Try a lower learning rate or a longer warm-up, QK-layernorm, or σReparam (geomon.reparam.sigma_reparam); "
    "see docs/guides/alerts.md#the-rules."
)


class EntropyCollapse(WatchRule):
    """Attention-entropy collapse (Zhai et al., 2023) per layer, from per-head normalised entropy.

    A head is bad when its normalised entropy (1 = uniform, 0 = one-hot) is below ``threshold``, or more than
    ``relative_drop`` below its running baseline (median of its last ``baseline_steps`` healthy values). One event
    per layer and episode names every collapsed head of the layer. The level says how much of the model is gone:
    ERROR once ``share_levels[1]`` of all heads are collapsed; WARN once ``share_levels[0]`` of all heads, or
    ``layer_share`` of one layer's heads, are; otherwise INFO (a few sharp heads - previous-token, first-token,
    induction heads - are normal in healthy models). An episode that grows to a higher level fires again at that
    level (``details["escalated_from"]``), but only when heads of *its own* layer collapse: a layer whose heads did
    not change is not reported again because other layers collapsed (their events carry the higher level, and the
    layer that tips the model into ERROR fires at ERROR). Without a per-head vector for a layer, its scalar (the
    mean over heads) is watched as one unit.

    Args:
        threshold: absolute bar on normalised entropy. Collapsed heads sit near 0 (Zhai et al.); healthy heads of
            trained LMs are mostly above 0.2, so 0.1 leaves room for sharp but sane heads.
        relative_drop: fire when a head falls below ``(1 - relative_drop) x`` its baseline; ``None`` (the default)
            switches it off: healthy heads halve their entropy while they learn (benchmarks/alerts: at the sweep's
            best learning rate, 0.5 fired a false WARN on early sharpening), and collapse reaches the threshold.
        patience: consecutive bad evaluations before firing (and clear ones before recovering).
        baseline_steps: size of the baseline window; the relative test is armed once it is full.
        hysteresis: a head is clear again once ``hysteresis x`` above the bar it crossed (0.1 -> 0.15), capped at
            the baseline for the relative bar.
        share_levels: ``(warn, error)`` shares of collapsed heads model-wide (benchmarks/alerts: healthy runs keep
            at most one sharp head per layer; the unstable ones lose every head of a layer).
        layer_share: share of one layer's heads collapsed that makes the event a WARN.
        cooldown: steps after a recovery before the same layer may fire again.
        pattern: the keys watched.
        name: the rule's name (counter ``geomon/alerts/<name>``).

    Example:
        >>> rule = EntropyCollapse(patience=2)
        >>> key = "geomon/attention/entropy_normalized/blocks.0.attn"
        >>> [len(rule.evaluate(step, {}, {key: [0.8, h1]})) for step, h1 in enumerate([0.7, 0.02, 0.01, 0.01])]
        [0, 0, 1, 0]
    """

    title_text = "Entropy collapse"
    default_name = "entropy_collapse"
    noun = "normalised attention entropy"
    where = "layer"
    advice = _ATTENTION_ADVICE

    def __init__(
        self,
        threshold: float = 0.1,
        relative_drop: float | None = None,
        patience: int = 3,
        *,
        baseline_steps: int = 10,
        hysteresis: float = 0.5,
        share_levels: tuple[float, float] = (0.25, 0.5),
        layer_share: float = 0.5,
        cooldown: int = 0,
        pattern: str = keys.pattern(keys.ENTROPY_NORMALIZED),
        name: str = "entropy_collapse",
    ) -> None:
        owner = "EntropyCollapse"
        super().__init__(
            owner, name=name, pattern=pattern, patience=patience, hysteresis=hysteresis, relative_drop=relative_drop,
            baseline_steps=baseline_steps, cooldown=cooldown, level="WARN",
        )  # fmt: skip
        allowed = "a normalised entropy in (0, 1) (1 = uniform attention, 0 = one-hot)"
        self.threshold = check_float(owner, "threshold", threshold, allowed, lambda v: 0 < v < 1)
        if (
            not isinstance(share_levels, (tuple, list))
            or len(share_levels) != 2
            or not all(is_real(s) for s in share_levels)
            or not 0 <= share_levels[0] <= share_levels[1] <= 1
        ):
            raise ValueError(
                f"{owner}: share_levels must be (warn, error) with 0 <= warn <= error <= 1 (shares of collapsed heads "
                f"model-wide at which the level becomes WARN and ERROR), got {share_levels!r}"
            )
        self.share_levels = (float(share_levels[0]), float(share_levels[1]))
        self.layer_share = check_float(owner, "layer_share", layer_share, "a share in (0, 1]", lambda v: 0 < v <= 1)

    def absolute_bars(self, key: str) -> list[tuple[Direction, float, str]]:
        return [("below", self.threshold, f"below the threshold {fmt(self.threshold)}")]

    def level_for(self, share: float, key_share: float) -> Level:
        warn, error = self.share_levels
        return "ERROR" if share >= error else "WARN" if share >= warn or key_share >= self.layer_share else "INFO"

    def summary(self, active: int, seen: int) -> str:
        return f"; {active} of {seen} heads ({active / seen:.1%}) across the model are collapsed" if seen else ""


class MaxLogitAbove(WatchRule):
    """The largest attention logit of a layer (or of each head) above ``threshold``.

    Logits that keep growing precede entropy collapse and loss spikes; Megatron monitors the max logit and Kimi K2's
    QK-clip caps it at 100, the default here.

    Args:
        threshold: the bar (logit units: ``scale x q.k``).
        patience: consecutive evaluations above it before firing (and below ``threshold x (1 - hysteresis)``
            before recovering).
        hysteresis: relative band for recovery (0.1: clear again below 90).
        level: level of the fired events.
        cooldown: steps after a recovery before the same layer may fire again.
        pattern: the keys watched.
        name: the rule's name.

    Example:
        >>> rule = MaxLogitAbove()
        >>> [e.kind for e in rule.evaluate(7, {"geomon/attention/max_logit/blocks.0.attn": 130.0})]
        ['fired']
    """

    title_text = "Max attention logit"
    default_name = "max_logit"
    noun = "max attention logit"
    where = "layer"
    low_is_bad = False
    advice = _ATTENTION_ADVICE

    def __init__(
        self,
        threshold: float = 100.0,
        patience: int = 1,
        *,
        hysteresis: float = 0.1,
        level: Level = "WARN",
        cooldown: int = 0,
        pattern: str = keys.pattern(keys.MAX_LOGIT),
        name: str = "max_logit",
    ) -> None:
        owner = "MaxLogitAbove"
        super().__init__(
            owner, name=name, pattern=pattern, patience=patience, hysteresis=hysteresis, relative_drop=None,
            baseline_steps=1, cooldown=cooldown, level=level,
        )  # fmt: skip
        self.threshold = check_float(owner, "threshold", threshold, "a positive number", lambda v: v > 0)

    def absolute_bars(self, key: str) -> list[tuple[Direction, float, str]]:
        return [("above", self.threshold, f"above the threshold {fmt(self.threshold)}")]


class RankCollapse(WatchRule):
    """Dimensional collapse: RankMe of a probe below a floor, below a share of its width D, or sharply down.

    Args:
        min_ratio: fire when ``RankMe < min_ratio x D``; applies to probes whose ``D`` is in ``dims`` (by probe
            name or full key). RankMe of a rank-1 embedding is about 1; the uncentred RankMe of healthy but
            anisotropic LM features stays well above 1% of D. ``None`` switches it off.
        floor: fire when ``RankMe < floor`` whatever D is (``None``: off).
        relative_drop: fire when RankMe falls more than this fraction below its running baseline (``None``: off).
        patience: consecutive bad evaluations before firing (RankMe comes once per window of 4 x D rows, so
            evaluations are sparse and each is already an average over many rows).
        dims: ``{probe or key: D}``; more can be added later with :meth:`set_dims`.
        baseline_steps: size of the baseline window (in RankMe values).
        hysteresis: relative band for recovery.
        level: level of the fired events.
        cooldown: steps after a recovery before the same probe may fire again.
        pattern: the keys watched.
        name: the rule's name.

    Example:
        >>> rule = RankCollapse(patience=1, dims={"ln_f": 256})
        >>> rule.evaluate(0, {"geomon/rankme/ln_f": 1.4})[0].text.split(":")[0]
        'Rank collapse in probe ln_f at step 0'
    """

    title_text = "Rank collapse"
    default_name = "rank_collapse"
    noun = "RankMe"
    where = "probe"
    advice = (
        "Dimensional collapse: check the learning rate and the regulariser that keeps the features spread (e.g. "
        "VICReg's variance/covariance terms); see docs/guides/alerts.md#the-rules."
    )

    def __init__(
        self,
        min_ratio: float | None = 0.01,
        floor: float | None = None,
        relative_drop: float | None = 0.5,
        patience: int = 2,
        *,
        dims: Mapping[str, int] | None = None,
        baseline_steps: int = 5,
        hysteresis: float = 0.1,
        level: Level = "WARN",
        cooldown: int = 0,
        pattern: str = keys.pattern(keys.RANKME),
        name: str = "rank_collapse",
    ) -> None:
        owner = "RankCollapse"
        super().__init__(
            owner, name=name, pattern=pattern, patience=patience, hysteresis=hysteresis, relative_drop=relative_drop,
            baseline_steps=baseline_steps, cooldown=cooldown, level=level,
        )  # fmt: skip
        self.min_ratio = check_fraction(owner, "min_ratio", min_ratio, optional=True)
        self.floor = None if floor is None else check_float(owner, "floor", floor, "a positive number or None", _pos)
        if self.min_ratio is None and self.floor is None and self.relative_drop is None:
            raise ValueError(f"{owner}: every test is off; set at least one of min_ratio, floor or relative_drop")
        self.dims: dict[str, int] = {}
        self.set_dims({} if dims is None else dims)

    def set_dims(self, dims: Mapping[str, int]) -> None:
        """Add or replace embedding widths, ``{probe name or full key: D}`` (for ``min_ratio``)."""
        if not isinstance(dims, Mapping) or not all(isinstance(key, str) and key for key in dims):
            raise ValueError(
                f"RankCollapse: dims must be a mapping {{probe or key: D}} with probe names or keys as strings, "
                f"e.g. {{'ln_f': 768}}, got {dims!r}"
            )
        checked = {key: check_int("RankCollapse", f"dims[{key!r}]", dim, 1) for key, dim in dims.items()}
        self.dims.update(checked)  # all or nothing: a bad width leaves the widths as they were

    def absolute_bars(self, key: str) -> list[tuple[Direction, float, str]]:
        bars: list[tuple[Direction, float, str]] = []
        if self.floor is not None:
            bars.append(("below", self.floor, f"below the floor {fmt(self.floor)}"))
        dim = self.dims.get(key, self.dims.get(subject(key)))
        if self.min_ratio is not None and dim is not None:
            bar = self.min_ratio * dim
            bars.append(("below", bar, f"below {self.min_ratio:.0%} of its width D = {dim} ({fmt(bar)})"))
        return bars

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dims": dict(self.dims)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.set_dims(state.get("dims", {}))


def _pos(value: float) -> bool:
    return value > 0


def default_rules() -> list[Rule]:
    """The standard set: entropy collapse, max attention logit, rank collapse, non-finite values (all defaults).

    Example:
        >>> [rule.name for rule in default_rules()]
        ['entropy_collapse', 'max_logit', 'rank_collapse', 'non_finite']
    """
    return [EntropyCollapse(), MaxLogitAbove(), RankCollapse(), NonFinite()]
