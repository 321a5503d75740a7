"""AlertEngine: rule isolation, strict mode, counters, sinks per rank, checkpoint round trip; LoggingSink."""

import dataclasses
import io
import logging
import math
import threading
import warnings

import pytest
import torch

from geomon.alerts import (
    AlertEngine,
    AlertEvent,
    CallableSink,
    CsvSink,
    Custom,
    EntropyCollapse,
    LoggingSink,
    MaxLogitAbove,
    NonFinite,
    RankCollapse,
    StopFlag,
    default_rules,
)
from geomon.functional import GeomonWarning
from tests.alerts.sequences import ENT, LOGIT, RANK


def _frames(n: int = 40):
    """A scripted run: heads 1 and 2 of layer 0 (half the layer: a WARN) collapse at 10..24, logits spike at
    15..17, RankMe halves at 20..29, a NaN at 30; every value is deterministic."""
    frames = []
    for t in range(n):
        head1 = 0.03 if 10 <= t < 25 else 0.55 + 0.01 * (t % 3)
        heads = {ENT.format(0): [0.6, head1, head1 + 0.01, 0.5], ENT.format(1): [0.6, 0.65, 0.7, 0.5 + 0.02 * (t % 2)]}
        scalars = {
            LOGIT.format(0): 140.0 if 15 <= t < 18 else 20.0 + t,
            RANK.format("ln_f"): (40.0 if 20 <= t < 30 else 100.0) + (t % 4),
            "geomon/alpha_req/ln_f": math.nan,
            "geomon/spectral/sigma/w": math.nan if t == 30 else 2.0,
        }
        frames.append((50 * t, scalars, heads))
    return frames


def _run(engine, frames):
    return [event for step, scalars, heads in frames for event in engine.evaluate(step, scalars, heads)]


def test_engine_runs_the_default_rules_and_counts_fired_events():
    engine = AlertEngine(default_rules())
    assert engine.counters() == {
        "geomon/alerts/entropy_collapse": 0, "geomon/alerts/max_logit": 0, "geomon/alerts/rank_collapse": 0,
        "geomon/alerts/non_finite": 0,
    }  # fmt: skip
    events = _run(engine, _frames())
    assert [(e.step // 50, e.rule, e.kind) for e in events] == [
        (12, "entropy_collapse", "fired"),  # patience 3: bad at 10, 11, 12
        (15, "max_logit", "fired"),
        (18, "max_logit", "recovered"),
        (
            21,
            "rank_collapse",
            "fired",
        ),  # baseline = median(103, 100, 101, 102, 103) = 102; 40-43 < half of it at 20, 21 (patience 2)
        (27, "entropy_collapse", "recovered"),  # clear at 25, 26, 27
        (30, "non_finite", "fired"),
        (31, "rank_collapse", "recovered"),  # >= 1.1 x the bar at 30, 31
        (31, "non_finite", "recovered"),
    ]
    assert engine.counters() == {
        "geomon/alerts/entropy_collapse": 1, "geomon/alerts/max_logit": 1, "geomon/alerts/rank_collapse": 1,
        "geomon/alerts/non_finite": 1,
    }  # fmt: skip


@pytest.mark.parametrize("cut", [11, 13, 16, 21, 26, 30])  # inside bad streaks, open episodes, recoveries
def test_state_dict_round_trip_mid_episode_gives_the_uninterrupted_events(cut):
    frames = _frames()
    whole = AlertEngine(default_rules())
    expected = _run(whole, frames)
    first = AlertEngine(default_rules())
    before = _run(first, frames[:cut])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what a checkpoint does; plain containers load with weights_only
    buffer.seek(0)
    resumed = AlertEngine(default_rules())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert before + _run(resumed, frames[cut:]) == expected
    assert resumed.counters() == whole.counters()


def test_load_state_dict_warns_about_unknown_rules_and_keeps_fresh_ones():
    engine = AlertEngine([MaxLogitAbove()])
    engine.evaluate(0, {LOGIT.format(0): 200.0})
    state = engine.state_dict()
    other = AlertEngine([MaxLogitAbove(name="logit_cap"), NonFinite()])
    with pytest.warns(GeomonWarning, match="no rule named 'max_logit' here"):
        other.load_state_dict(state)
    assert other.counters() == {"geomon/alerts/logit_cap": 0, "geomon/alerts/non_finite": 0}


def test_a_raising_rule_is_skipped_with_a_warning_and_raises_in_strict_mode():
    def broken(step, scalars, heads):
        raise RuntimeError("boom")

    rules = [Custom("broken", broken), MaxLogitAbove()]
    engine = AlertEngine(rules)
    with pytest.warns(GeomonWarning, match=r"rule 'broken' raised RuntimeError: boom; skipped at step 7"):
        events = engine.evaluate(7, {LOGIT.format(0): 500.0})
    assert [event.rule for event in events] == ["max_logit"]
    assert engine.counters()["geomon/alerts/broken"] == 0
    with pytest.raises(RuntimeError, match="boom"):
        AlertEngine([Custom("broken", broken)], strict=True).evaluate(0, {})


def test_sinks_notify_on_rank_zero_and_act_on_every_rank():
    frames = _frames()
    ranks = []
    for rank in (0, 1):
        notified, acted, stop = [], [], StopFlag()
        sinks = [notified.append, CallableSink(acted.append, kinds=("fired",), min_level="WARN"), stop]
        engine = AlertEngine(default_rules(), sinks, is_rank_zero=rank == 0)
        for step, scalars, heads in frames:
            engine.evaluate(step, scalars, heads)
            if stop:  # a loop polls the flag; every rank sees it at the same step
                break
        ranks.append((notified, acted, step))
    (notified0, acted0, stopped0), (notified1, acted1, stopped1) = ranks
    assert notified1 == [] and len(notified0) == 6  # a plain callable is a rank-zero notification
    assert acted0 == acted1 and [e.rule for e in acted0] == [
        "entropy_collapse",
        "max_logit",
        "rank_collapse",
        "non_finite",
    ]
    assert stopped0 == stopped1 == 50 * 30  # the NaN at 30: the first ERROR


def test_a_raising_sink_is_isolated():
    def bad_sink(event):
        raise OSError("disk full")

    seen = []
    engine = AlertEngine([MaxLogitAbove()], [bad_sink, seen.append])
    with pytest.warns(GeomonWarning, match=r"raised OSError: disk full on 'Max attention logit: blocks.0.attn'"):
        engine.evaluate(0, {LOGIT.format(0): 150.0})
    assert len(seen) == 1
    with pytest.raises(OSError):
        AlertEngine([MaxLogitAbove()], [bad_sink], strict=True).evaluate(0, {LOGIT.format(0): 150.0})


def test_engine_takes_tensors_and_checks_the_step():
    engine = AlertEngine([EntropyCollapse(patience=1), RankCollapse(floor=2.0, patience=1)])
    events = engine.evaluate(
        3, {RANK.format("z"): torch.tensor(1.5, dtype=torch.float64)}, {ENT.format(0): torch.tensor([0.02, 0.6])}
    )
    assert [(e.rule, e.heads) for e in events] == [("entropy_collapse", (0,)), ("rank_collapse", ())]
    with pytest.raises(ValueError, match="step must be an int"):
        engine.evaluate(1.5, {})


def test_logging_sink_levels(caplog):
    logger = logging.getLogger("geomon.test_alerts")
    sink = LoggingSink(logger)
    event = AlertEvent(rule="r", key="k", step=1, kind="fired", level="WARN", title="t", text="warned")
    with caplog.at_level(logging.INFO, logger="geomon.test_alerts"):
        sink(event)
        sink(AlertEvent(rule="r", key="k", step=2, kind="fired", level="ERROR", title="t", text="failed"))
        sink(AlertEvent(rule="r", key="k", step=3, kind="recovered", level="INFO", title="t", text="cleared"))
        sink(AlertEvent(rule="r", key="k", step=4, kind="fired", level="INFO", title="t", text="observed"))
        LoggingSink(logger, kinds=("fired",))(dataclasses.replace(event, kind="recovered", text="filtered out"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "warned"), ("ERROR", "failed"), ("INFO", "cleared"), ("INFO", "observed"),
    ]  # fmt: skip
    assert LoggingSink().logger.name == "geomon"


def test_values_that_are_not_numbers_are_left_out_with_one_warning():
    engine = AlertEngine([MaxLogitAbove(), NonFinite()])
    odd = {"note": "text", "geomon/x": torch.ones(3), LOGIT.format(0): torch.tensor(150.0, dtype=torch.bfloat16)}
    with pytest.warns(GeomonWarning, match=r"values of 'note', 'geomon/x', 'h' are not numbers"):
        events = engine.evaluate(0, odd, {"h": torch.ones(2, 2)})
    assert [event.rule for event in events] == ["max_logit"] and events[0].value == 150.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.evaluate(1, odd)  # the same keys again: no second warning
    with pytest.raises(ValueError, match="are not numbers"):
        AlertEngine(strict=True).evaluate(0, odd)
    with pytest.raises(ValueError, match=r"value of 'note': expected a number, got str"):
        MaxLogitAbove().evaluate(0, {"note": "text"})


def test_csv_sink_writes_the_report_sidecar(tmp_path):
    from geomon.tools.report.readers import read_alerts

    path = tmp_path / "logs" / "geomon_alerts.csv"
    engine = AlertEngine([MaxLogitAbove()], [CsvSink(path)])
    for step, value in [(10, 150.0), (20, 30.0), (30, 160.0)]:
        engine.evaluate(step, {LOGIT.format(0): value})
    AlertEngine([MaxLogitAbove()], [CsvSink(path, kinds=("fired",))]).evaluate(40, {LOGIT.format(1): 101.0})
    rows = read_alerts(path)
    assert [(a.step, a.rule, a.key, a.kind, a.level) for a in rows] == [
        (10, "max_logit", LOGIT.format(0), "fired", "WARN"),
        (20, "max_logit", LOGIT.format(0), "recovered", "INFO"),
        (30, "max_logit", LOGIT.format(0), "fired", "WARN"),
        (40, "max_logit", LOGIT.format(1), "fired", "WARN"),
    ]
    assert rows[0].text.startswith("Max attention logit in layer blocks.0.attn at step 10: max attention logit 150,")


def test_rules_reused_for_a_second_run_start_fresh():
    """A sweep builds every run's engine (or monitor) from one list of rule objects: nothing of the first run (open
    episodes, baselines, patience streaks, RankMe widths) may reach the second."""
    rules = default_rules()
    first = AlertEngine(rules)
    cut = _frames()[:22]  # stops inside the entropy episode and a RankMe episode
    _run(first, cut)
    assert first.state_dict()["rules"]["entropy_collapse"]["groups"]  # the first run did leave state behind
    second = AlertEngine(rules)
    assert _run(second, _frames()) == _run(AlertEngine(default_rules()), _frames())
    # the objects handed in are left as they were given: a third engine starts fresh as well
    assert _run(AlertEngine(rules), _frames()) == _run(AlertEngine(default_rules()), _frames())
    assert all(rule.state_dict() == fresh.state_dict() for rule, fresh in zip(rules, default_rules(), strict=True))


def test_a_custom_rule_keeps_its_function_and_an_uncopyable_rule_is_named():
    class Check:
        def __init__(self):
            self.calls = 0

        def __call__(self, step, scalars, heads):
            self.calls += 1
            return False

    check = Check()
    engine = AlertEngine([Custom("check", check)])
    engine.evaluate(0, {})
    assert check.calls == 1  # the engine's copy of the rule calls the user's own function, not a copy of it

    class Locked(Custom):
        def __init__(self):
            super().__init__("locked", lambda step, scalars, heads: False)
            self.lock = threading.Lock()

    with pytest.raises(TypeError, match=r"AlertEngine: rule 'locked' .*cannot be copied"):
        AlertEngine([Locked()])


def test_a_sink_filtering_on_an_unknown_rule_is_refused_naming_the_known_ones():
    message = (
        r"AlertEngine: CallableSink filters on rules that no rule of this engine is named: 'entropy_colapse' "
        r"\(the rules are 'entropy_collapse', 'max_logit', 'rank_collapse', 'non_finite'\)"
    )
    page = CallableSink(print, rules=["entropy_colapse", "max_logit"])
    with pytest.raises(ValueError, match=message):
        AlertEngine(default_rules(), [page])
    engine = AlertEngine(default_rules())
    with pytest.raises(ValueError, match=message):  # sinks set later (as the callback does) are checked too
        engine.sinks = [LoggingSink(), page]
    assert engine.sinks == []
    ok = CallableSink(print, rules=["entropy_collapse"])
    engine.sinks = [ok]
    assert engine.sinks == [ok]


def test_a_rule_or_sink_that_fails_on_every_step_is_said_once():
    """DESIGN.md / _guard.py: a monitoring failure is a warning said once per thing, not a flood on every step;
    the failing rule is still skipped and every other rule and sink still runs at each step."""

    def broken(step, scalars, heads):
        raise RuntimeError("boom")

    def bad_sink(event):
        raise OSError("disk full")

    seen = []
    engine = AlertEngine([Custom("broken", broken), MaxLogitAbove()], [bad_sink, seen.append])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, logit in enumerate([150.0, 10.0, 150.0, 10.0]):  # four events, all through the failing sink
            engine.evaluate(step, {LOGIT.format(0): logit})
    messages = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]
    assert len([m for m in messages if "rule 'broken' raised RuntimeError: boom" in m]) == 1, messages
    assert len([m for m in messages if "raised OSError: disk full" in m]) == 1, messages
    assert [e.kind for e in seen] == ["fired", "recovered", "fired", "recovered"]
    assert engine.counters() == {"geomon/alerts/broken": 0, "geomon/alerts/max_logit": 2}
