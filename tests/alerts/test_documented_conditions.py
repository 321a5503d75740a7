"""Every rule of docs/guides/alerts.md against an independent re-implementation of its documented condition
(tests/alerts/reference.py): the same events (kind, key, level, heads, escalation) at the same steps, over random
value sequences that hover around the thresholds and their hysteresis bands, with NaN and missing values."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.alerts import Custom, Drop, EntropyCollapse, MaxLogitAbove, NonFinite, RankCollapse, Threshold
from tests.alerts.reference import RefLatch, RefWatch, entropy_level
from tests.alerts.sequences import ENT, LOGIT, RANK

SETTINGS = settings(max_examples=80, deadline=None)
STEP = 10  # global steps between evaluations: cooldowns are in global steps, patience in evaluations


def _events(rule, frames):
    out = []
    for t, (scalars, heads) in enumerate(frames):
        for e in rule.evaluate(STEP * t, scalars, heads):
            out.append((STEP * t, e.kind, e.key, e.level, e.heads, e.details.get("escalated_from")))
    return out


def _reference(ref, frames):
    return [
        (STEP * t, *event) for t, (scalars, heads) in enumerate(frames) for event in ref.step(STEP * t, scalars, heads)
    ]


def _frames(values, layers, heads_per_layer, steps, key, per_head=True):
    """Per-head vectors (or layer scalars) drawn from ``values``; a layer may be missing at an evaluation."""
    layer = st.one_of(st.none(), st.lists(values, min_size=heads_per_layer, max_size=heads_per_layer))
    frame = st.lists(layer, min_size=layers, max_size=layers)

    def build(rows):
        out = []
        for row in rows:
            present = {key.format(i): v for i, v in enumerate(row) if v is not None}
            if per_head:
                out.append(({}, present))
            else:
                out.append(({k: v[0] for k, v in present.items()}, {}))
        return out

    return st.lists(frame, min_size=1, max_size=steps).map(build)


patience = st.integers(1, 3)
cooldown = st.sampled_from([0, 15, 40])
entropy = st.sampled_from([0.0, 0.02, 0.09, 0.1, 0.12, 0.149, 0.15, 0.3, 0.6, math.nan])


@SETTINGS
@given(
    st.integers(1, 3).flatmap(lambda n: st.integers(1, 4).flatmap(lambda h: _frames(entropy, n, h, 30, ENT))),
    patience,
    cooldown,
    st.sampled_from([None, 0.5]),
    st.sampled_from([(0.25, 0.5), (0.0, 0.9), (0.1, 0.3)]),
    st.sampled_from([0.5, 1.0, 0.3]),
)
def test_entropy_collapse_fires_exactly_when_documented(frames, patience, cooldown, drop, share_levels, layer_share):
    rule = EntropyCollapse(relative_drop=drop, patience=patience, cooldown=cooldown, baseline_steps=3,
                           share_levels=share_levels, layer_share=layer_share)  # fmt: skip
    ref = RefWatch(ENT.format("*"), [("below", 0.1)], patience=patience, hysteresis=0.5, drop=drop,
                   baseline_steps=3, cooldown=cooldown, level=entropy_level(share_levels, layer_share))  # fmt: skip
    assert _events(rule, frames) == _reference(ref, frames)


logit = st.sampled_from([0.0, 50.0, 89.9, 90.0, 95.0, 100.0, 100.1, 500.0, -math.inf, math.nan])


@SETTINGS
@given(st.integers(1, 3).flatmap(lambda n: _frames(logit, n, 2, 30, LOGIT)), patience, cooldown, st.booleans())
def test_max_logit_fires_exactly_when_documented(frames, patience, cooldown, per_head):
    if not per_head:
        frames = [({k: v[0] for k, v in heads.items()}, {}) for _, heads in frames]
    rule = MaxLogitAbove(patience=patience, cooldown=cooldown, level="ERROR")
    ref = RefWatch(LOGIT.format("*"), [("above", 100.0)], patience=patience, hysteresis=0.1, cooldown=cooldown,
                   level="ERROR")  # fmt: skip
    assert _events(rule, frames) == _reference(ref, frames)


rank = st.sampled_from([1.0, 2.0, 2.5, 2.9, 3.0, 10.0, 20.0, 40.0, 60.0, 100.0, math.nan])


@SETTINGS
@given(
    _frames(rank, 2, 1, 30, RANK, per_head=False),
    patience,
    cooldown,
    st.sampled_from([None, 0.01]),
    st.sampled_from([None, 2.5]),
    st.sampled_from([None, 0.5]),
)
def test_rank_collapse_fires_exactly_when_documented(frames, patience, cooldown, ratio, floor, drop):
    if ratio is None and floor is None and drop is None:
        drop = 0.5
    frames = [({k.replace("blocks.", "p"): v for k, v in s.items()}, h) for s, h in frames]  # probes p0, p1
    rule = RankCollapse(min_ratio=ratio, floor=floor, relative_drop=drop, patience=patience, cooldown=cooldown,
                        baseline_steps=3, dims={"p0.attn": 256}, level="INFO")  # fmt: skip

    def absolute(key):
        bars = [] if floor is None else [("below", floor)]
        return bars + ([("below", ratio * 256)] if ratio is not None and key.endswith("p0.attn") else [])

    ref = RefWatch(RANK.format("*"), absolute, patience=patience, hysteresis=0.1, drop=drop, baseline_steps=3,
                   cooldown=cooldown, level="INFO")  # fmt: skip
    assert _events(rule, frames) == _reference(ref, frames)


number = st.sampled_from([-20.0, -10.0, -9.5, -9.0, 0.0, 5.0, 9.0, 9.5, 10.0, 10.5, 30.0, math.nan, math.inf])


@SETTINGS
@given(
    _frames(number, 2, 2, 30, "user/{}"),
    patience,
    cooldown,
    st.sampled_from([(None, -10.0), (10.0, None), (10.0, -10.0)]),
    st.sampled_from([0.0, 0.1]),
)
def test_threshold_fires_exactly_when_documented(frames, patience, cooldown, bounds, hysteresis):
    above, below = bounds
    rule = Threshold("user/*", above=above, below=below, patience=patience, cooldown=cooldown, hysteresis=hysteresis)
    bars = ([] if below is None else [("below", below)]) + ([] if above is None else [("above", above)])
    ref = RefWatch("user/*", bars, patience=patience, hysteresis=hysteresis, cooldown=cooldown)
    assert _events(rule, frames) == _reference(ref, frames)


positive = st.sampled_from([1.0, 4.0, 5.0, 5.4, 6.0, 8.0, 10.0, 12.0, 0.0, -3.0, math.nan])


@SETTINGS
@given(_frames(positive, 2, 1, 30, "user/{}", per_head=False), patience, cooldown, st.integers(1, 4))
def test_drop_fires_exactly_when_documented(frames, patience, cooldown, baseline_steps):
    rule = Drop("user/*", 0.5, patience=patience, cooldown=cooldown, baseline_steps=baseline_steps)
    ref = RefWatch("user/*", [], patience=patience, hysteresis=0.1, drop=0.5, baseline_steps=baseline_steps,
                   cooldown=cooldown)  # fmt: skip
    assert _events(rule, frames) == _reference(ref, frames)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([0.0, math.nan, math.inf]), st.sampled_from([0.0, math.nan])), max_size=30),
       patience, cooldown)  # fmt: skip
def test_non_finite_and_custom_fire_exactly_when_documented(rows, patience, cooldown):
    non_finite = NonFinite(patience=patience, cooldown=cooldown)
    custom = Custom("c", lambda step, s, h: s["a"] != 0.0, patience=patience, cooldown=cooldown, level="INFO")
    latches = RefLatch(patience, cooldown), RefLatch(patience, cooldown)
    for t, (a, ignored) in enumerate(rows):
        scalars = {"a": a, "geomon/alpha_req/x": ignored}  # alpha-ReQ is in DEFAULT_IGNORE
        for rule, latch in zip((non_finite, custom), latches, strict=True):
            got = [e.kind for e in rule.evaluate(STEP * t, scalars)]
            expected = latch.step(STEP * t, not math.isfinite(a) if rule is non_finite else a != 0.0)
            assert got == ([] if expected is None else [expected]), (rule, t)


def test_the_value_that_ends_an_episode_is_not_added_to_the_baseline():
    """It arrived while the unit was active: the docs keep it out of the baseline (a recovery overshoot would
    otherwise raise the baseline, and a healthy value right after the episode would fire again)."""
    rule = Drop("k", 0.5, patience=1, baseline_steps=1, hysteresis=0.1)
    kinds = [[e.kind for e in rule.evaluate(t, {"k": v})] for t, v in enumerate([4.0, 1.0, 10.0, 4.0])]
    # baseline 4: 1 is bad (fired); 10 is clear (recovered) but arrived while active; 4 is then within 50% of 4
    assert kinds == [[], ["fired"], ["recovered"], []]
    rank = RankCollapse(min_ratio=None, relative_drop=0.5, patience=2, baseline_steps=2)
    values = [10.0, 10.0, 2.0, 2.0, 30.0, 30.0, 9.0, 9.0]  # recovered at the second 30, not a baseline value
    events = [e.kind for t, v in enumerate(values) for e in rank.evaluate(t, {RANK.format("z"): v})]
    assert events == ["fired", "recovered"]
