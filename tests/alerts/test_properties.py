"""Properties over random sequences: healthy values never fire, episodes alternate, resume is exact."""

import io
import itertools
import math
from collections import defaultdict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.alerts import AlertEngine, Drop, EntropyCollapse, MaxLogitAbove, RankCollapse, Threshold, default_rules
from tests.alerts.sequences import ENT, LOGIT, RANK

SETTINGS = settings(max_examples=60, deadline=None)


def per_head_sequences(low: float, high: float):
    """``[t][layer] -> head values`` with a fixed number of layers and heads, values in [low, high]."""
    values = st.floats(low, high, allow_nan=False)
    return st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 40)).flatmap(
        lambda shape: st.lists(
            st.lists(st.lists(values, min_size=shape[1], max_size=shape[1]), min_size=shape[0], max_size=shape[0]),
            min_size=shape[2],
            max_size=shape[2],
        )
    )


def _evaluate_heads(rule, sequence, key=ENT):
    frames = [{key.format(i): heads for i, heads in enumerate(layers)} for layers in sequence]
    return [event for t, heads in enumerate(frames) for event in rule.evaluate(t, {}, heads)]


def _evaluate_scalars(rule, values, key):
    return [event for t, value in enumerate(values) for event in rule.evaluate(t, {key: value})]


@SETTINGS
@given(per_head_sequences(0.5, 1.0))
def test_entropy_within_a_factor_two_never_fires(sequence):
    # bar = max(0.1, 0.5 x baseline) <= 0.5 <= every value
    assert _evaluate_heads(EntropyCollapse(patience=1, baseline_steps=1), sequence) == []


@SETTINGS
@given(per_head_sequences(0.1, 1.0))
def test_entropy_above_the_threshold_never_fires_without_the_relative_test(sequence):
    assert _evaluate_heads(EntropyCollapse(relative_drop=None, patience=1), sequence) == []


@SETTINGS
@given(per_head_sequences(-1e4, 100.0))
def test_logits_up_to_the_threshold_never_fire(sequence):
    assert _evaluate_heads(MaxLogitAbove(), sequence, key=LOGIT) == []


@SETTINGS
@given(st.lists(st.floats(50.0, 100.0), max_size=40))
def test_rankme_within_a_factor_two_never_fires(values):
    rule = RankCollapse(floor=10.0, patience=1, baseline_steps=1, dims={"ln_f": 256})
    assert _evaluate_scalars(rule, values, RANK.format("ln_f")) == []


@SETTINGS
@given(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3), st.data())
def test_threshold_and_drop_inside_their_bounds_never_fire(low, width, data):
    values = data.draw(st.lists(st.floats(low, low + width), max_size=40))
    assert _evaluate_scalars(Threshold("k", above=low + width, below=low, patience=1), values, "k") == []
    if low > 0:
        drop = Drop("k", 0.25, patience=1, baseline_steps=1)
        assert _evaluate_scalars(drop, [min(v, low / 0.76) for v in values], "k") == []


noisy = st.one_of(st.floats(0.0, 1.0), st.just(math.nan), st.just(0.01))


@SETTINGS
@given(st.lists(st.lists(noisy, min_size=3, max_size=3), min_size=1, max_size=60), st.integers(1, 4))
def test_each_episode_is_one_fired_then_one_recovered_event(sequence, patience):
    """An episode: one fired event, then one more per level it grows to (strictly higher each time), then one
    recovered event."""
    rule = EntropyCollapse(patience=patience, baseline_steps=3, cooldown=2)
    kinds = defaultdict(list)
    for t, heads in enumerate(sequence):
        for event in rule.evaluate(t, {}, {ENT.format(0): heads[:2], ENT.format(1): heads[2:]}):
            kinds[event.key].append((t, event.kind, event.level, event.details.get("escalated_from")))
    rank = {"INFO": 0, "WARN": 1, "ERROR": 2}
    for events in kinds.values():
        opened, level, starts = False, None, []
        for t, kind, event_level, grown_from in events:
            if kind == "recovered":
                assert opened
                opened = False
            elif not opened:
                assert grown_from is None
                opened, level = True, event_level
                starts.append(t)
            else:  # an escalation inside the open episode
                assert grown_from == level and rank[event_level] > rank[level]
                level = event_level
        assert all(b - a >= patience for a, b in itertools.pairwise(starts))


values_or_nan = st.one_of(st.floats(-10.0, 200.0), st.just(math.nan))


@SETTINGS
@given(
    st.lists(
        st.tuples(values_or_nan, values_or_nan, st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=2, max_size=40
    ),
    st.data(),
)
def test_resume_from_any_step_is_exact(rows, data):
    cut = data.draw(st.integers(1, len(rows) - 1))
    frames = [
        (10 * t, {LOGIT.format(0): a, RANK.format("z"): b}, {ENT.format(0): [c, d]})
        for t, (a, b, c, d) in enumerate(rows)
    ]

    def run(engine, part):
        return [e for step, scalars, heads in part for e in engine.evaluate(step, scalars, heads)]

    expected = run(AlertEngine(default_rules()), frames)
    first = AlertEngine(default_rules())
    before = run(first, frames[:cut])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = AlertEngine(default_rules())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [repr(e) for e in before + run(resumed, frames[cut:])] == [repr(e) for e in expected]  # NaN != NaN
