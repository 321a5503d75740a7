"""NonFinite, Threshold, Drop, Custom; constructor validation of every rule and sink."""

import math

import pytest
import torch

from geomon.alerts import (
    AlertEngine,
    CallableSink,
    CsvSink,
    Custom,
    Drop,
    EntropyCollapse,
    LoggingSink,
    MaxLogitAbove,
    NonFinite,
    RankCollapse,
    StopFlag,
    Threshold,
    WandbSink,
)
from tests.alerts.sequences import ENT, LOGIT, RANK, run, summary

NAN, INF = math.nan, math.inf


def test_non_finite_fires_once_naming_the_keys_and_recovers():
    frames = [
        {RANK.format("a"): 10.0, "geomon/alpha_req/a": NAN, "geomon/nc/nc4/head": NAN},  # NaN by definition: ignored
        {RANK.format("a"): NAN, "geomon/spectral/sigma/w": INF, "geomon/alpha_req/a": NAN},
        {RANK.format("a"): NAN, "geomon/spectral/sigma/w": 3.0},
        {RANK.format("a"): 9.0, "geomon/spectral/sigma/w": 3.0},
    ]
    events = run(NonFinite(), scalars=frames)
    assert summary(events) == [(1, "fired", RANK.format("a"), ()), (3, "recovered", "non_finite", ())]
    fired = events[0]
    assert fired.level == "ERROR" and math.isnan(fired.value)
    assert fired.details["keys"] == [RANK.format("a"), "geomon/spectral/sigma/w"]
    assert fired.text == (
        "Non-finite values at step 50 in 2 keys: geomon/rankme/a (nan), geomon/spectral/sigma/w (inf)."
    )
    assert events[1].text == "All watched values are finite again at step 150 (non-finite since step 50)."


def test_non_finite_per_head_values_and_ignore_patterns():
    heads = {ENT.format(0): [0.5, NAN, 0.4], ENT.format(1): torch.tensor([INF, 0.3])}
    (event,) = NonFinite().evaluate(0, {}, heads)
    assert event.details["keys"] == [ENT.format(0) + "/head1", ENT.format(1) + "/head0"]
    assert NonFinite(ignore=["geomon/attention/*"]).evaluate(0, {}, heads) == []
    only_head = NonFinite(ignore=[ENT.format(0) + "/head1"]).evaluate(0, {}, heads)
    assert only_head[0].details["keys"] == [ENT.format(1) + "/head0"]
    # with no ignore list, the definitional NaNs fire too
    assert NonFinite(ignore=()).evaluate(0, {"geomon/alpha_req/a": NAN}, {})[0].key == "geomon/alpha_req/a"


def test_non_finite_patience_and_cooldown():
    frames = [{"k": v} for v in [NAN, 1.0, NAN, NAN, 1.0, NAN, NAN, NAN, 1.0]]
    events = run(NonFinite(patience=2, cooldown=250), scalars=frames)
    # bad at 2, 3 -> fired at 3; recovery needs 2 finite evaluations in a row, which never come
    assert summary(events) == [(3, "fired", "k", ())]
    events = run(NonFinite(patience=1, cooldown=250), scalars=[{"k": v} for v in [NAN, 1.0, NAN, NAN, NAN, NAN, NAN]])
    # fired at 0, recovered at 1 (step 50); cooldown until step 300: NaN from 2 fires only at evaluation 6
    assert summary(events) == [(0, "fired", "k", ()), (1, "recovered", "non_finite", ()), (6, "fired", "k", ())]


def test_threshold_above_and_below_with_hysteresis():
    rule = Threshold("geomon/spectral/sigma/*", above=10.0, below=1.0, patience=2, hysteresis=0.1, name="sigma")
    key = "geomon/spectral/sigma/blocks.0.qkv"
    values = [5.0, 12.0, 11.0, 9.5, 8.9, 8.0, 0.5, 0.5, 1.05, 1.2, 1.2]
    events = run(rule, scalars=[{key: v, "geomon/other": 100.0} for v in values])
    # above 10 at 1, 2 -> fired at 2; clear (<= 9) at 4, 5 -> recovered at 5; below 1 at 6, 7 -> fired at 7;
    # 1.05 is inside the band (clear >= 1.1); clear at 9, 10 -> recovered at 10
    assert summary(events) == [
        (2, "fired", key, ()),
        (5, "recovered", key, ()),
        (7, "fired", key, ()),
        (10, "recovered", key, ()),
    ]
    assert events[0].title == "sigma: geomon/spectral/sigma/blocks.0.qkv" and "above 10" in events[0].text
    assert "below 1," in events[2].text and events[2].threshold == 1.0 and events[0].threshold == 10.0


def test_drop_fires_on_a_sharp_drop_only():
    key = "geomon/alpha_req/ln_f"
    rule = Drop("geomon/alpha_req/*", 0.4, patience=2, baseline_steps=3, name="alpha_drop")
    values = [2.0, 2.1, 1.9, 1.8, 1.0, 1.1, 1.0, 1.9, 2.0, 2.0]
    events = run(rule, scalars=[{key: v} for v in values])
    # baseline median(2.0, 2.1, 1.9) = 2.0 (1.8 then joins: median(2.1, 1.9, 1.8) = 1.9); 1.0, 1.1 < 1.14 -> fired
    # at 5; clear once >= min(1.14 * 1.1, 1.9) = 1.254: 7, 8 -> recovered at 8
    assert summary(events) == [(5, "fired", key, ()), (8, "recovered", key, ())]
    assert events[0].baseline == 1.9 and events[0].threshold == pytest.approx(1.14)  # (1 - 0.4) x 1.9
    negative = Drop("k", 0.5, patience=1, baseline_steps=1)
    assert run(negative, scalars=[{"k": v} for v in [-1.0, -5.0, 0.0]]) == []  # non-positive baselines: not tested


def test_custom_rule_text_patience_and_recovery():
    def too_wide(step, scalars, heads):
        logit = scalars.get("logit", 0.0)
        return f"logit {logit} at step {step}" if logit > 30 else None

    events = run(
        Custom("wide", too_wide, patience=2, level="ERROR"), scalars=[{"logit": v} for v in [40, 40, 40, 1, 1]]
    )
    assert summary(events) == [(1, "fired", "wide", ()), (4, "recovered", "wide", ())]
    assert events[0].text == "logit 40.0 at step 50" and events[0].level == "ERROR"
    assert run(Custom("flag", lambda step, s, h: True), scalars=[{}])[0].text == "Rule flag fired at step 0."
    assert Custom("heads", lambda step, s, h: h["x"] == (1.0, 2.0)).evaluate(0, {}, {"x": torch.tensor([1.0, 2.0])})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: EntropyCollapse(threshold=1.5),
            r"EntropyCollapse: threshold must be a normalised entropy in \(0, 1\)",
        ),
        (lambda: EntropyCollapse(patience=0), r"patience must be an integer >= 1, got 0"),
        (lambda: EntropyCollapse(patience=2.5), r"patience must be an integer >= 1, got 2.5"),
        (lambda: EntropyCollapse(relative_drop=1.0), r"relative_drop must be a number in \(0, 1\) or None"),
        (lambda: EntropyCollapse(share_levels=(0.6, 0.5)), r"share_levels must be \(warn, error\)"),
        (lambda: EntropyCollapse(hysteresis=-1), r"hysteresis must be a number >= 0"),
        (lambda: EntropyCollapse(name="my rule"), r"name must be a non-empty string of letters"),
        (lambda: MaxLogitAbove(threshold=-3), r"MaxLogitAbove: threshold must be a positive number"),
        (lambda: MaxLogitAbove(threshold=math.inf), r"threshold must be a positive number, got inf"),
        (lambda: MaxLogitAbove(level="CRITICAL"), r"level must be one of INFO, WARN, ERROR, got 'CRITICAL'"),
        (lambda: RankCollapse(min_ratio=None, relative_drop=None), r"every test is off"),
        (lambda: RankCollapse(floor=0), r"floor must be a positive number or None"),
        (lambda: RankCollapse(dims={"ln_f": 0}), r"dims\['ln_f'\] must be an integer >= 1"),
        (lambda: NonFinite(ignore="geomon/*"), r"ignore must be a sequence of non-empty fnmatch patterns"),
        (lambda: Threshold("k"), r"give above=, below= or both"),
        (lambda: Threshold("k", above=1.0, below=2.0), r"below must be smaller than above"),
        (lambda: Threshold("", above=1.0), r"pattern must be a non-empty fnmatch pattern"),
        (lambda: Drop("k", 1.5), r"Drop: fraction must be a number in \(0, 1\), got 1.5"),
        (lambda: Drop("k", 0.5, baseline_steps=0), r"baseline_steps must be an integer >= 1"),
        (lambda: Custom("c", "not callable"), r"fn must be callable as fn\(step, scalars, heads\)"),
        (lambda: Custom("c", print, cooldown=-1), r"cooldown must be an integer >= 0"),
        (lambda: CallableSink(42), r"CallableSink: fn must be callable"),
        (lambda: LoggingSink(kinds=["fired", "cleared"]), r"kinds must be a non-empty collection"),
        (lambda: StopFlag(min_level="FATAL"), r"StopFlag: min_level must be one of INFO, WARN, ERROR"),
        (lambda: WandbSink(wait_duration=0), r"wait_duration must be positive seconds or a timedelta"),
        (lambda: AlertEngine([Threshold("a", above=1.0), Threshold("b", above=2.0)]), r"'threshold' appears twice"),
        (lambda: AlertEngine([object()]), r"every rule needs a str name and an evaluate\(\) method"),
        (lambda: AlertEngine(sinks=[3]), r"every sink must be callable"),
        (lambda: AlertEngine(sinks=StopFlag()), r"sinks must be a list of callables sink\(event\), got StopFlag"),
        (lambda: AlertEngine(MaxLogitAbove()), r"rules must be a list of rules \(or None for default_rules\(\)\)"),
        (lambda: RankCollapse(dims=[("ln_f", 256)]), r"RankCollapse: dims must be a mapping \{probe or key: D\}"),
        (
            lambda: RankCollapse(dims={3: 256}),
            r"RankCollapse: dims must be a mapping \{probe or key: D\} with .*, got \{3: 256\}",
        ),
        (lambda: RankCollapse(dims={"ln_f": 256.0}), r"dims\['ln_f'\] must be an integer >= 1, got 256.0"),
        (lambda: NonFinite(ignore=None), r"ignore must be a sequence of non-empty fnmatch patterns \(.*\), got None"),
        (lambda: NonFinite(ignore=["ok/*", 3]), r"ignore must be a sequence of non-empty fnmatch patterns"),
        (lambda: EntropyCollapse(share_levels=None), r"share_levels must be \(warn, error\)"),
        (lambda: EntropyCollapse(threshold="0.1"), r"threshold must be a normalised entropy in \(0, 1\)"),
        (lambda: EntropyCollapse(patience=True), r"patience must be an integer >= 1, got True"),
        (lambda: LoggingSink(kinds=None), r"kinds must be a non-empty collection"),
        (lambda: LoggingSink(kinds=3), r"kinds must be a non-empty collection"),
        (lambda: LoggingSink(rules=[]), r"rules must name at least one rule, or be None for all"),
        (lambda: LoggingSink(rules=3), r"rules must be a collection of rule names or None"),
        (lambda: LoggingSink(logger="geomon"), r"LoggingSink: logger must be a logging.Logger or None, got 'geomon'"),
        (lambda: CsvSink(None), r"CsvSink: path must be a file path \(str or os.PathLike\), got None"),
        (
            lambda: Threshold(["geomon/rankme/*"], above=1.0),
            r"pattern must be a non-empty .*, got \['geomon/rankme/\*'\]",
        ),
        (lambda: Drop("", 0.5), r"Drop: pattern must be a non-empty fnmatch pattern .*, got ''"),
    ],
)
def test_bad_arguments_raise_value_errors_that_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _binary_collapse_values(head: str) -> dict[str, float]:
    """The neural-collapse values of a healthy binary classifier whose head is still all zeros (a zero-initialised
    head), keyed as the collapse probe logs them: ``geomon/nc/<stat>/<head>.input``."""
    from geomon.functional import neural_collapse

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % 2
    features = torch.randn(16, 8, generator=generator, dtype=torch.float64) + 3.0 * labels[:, None]
    stats = neural_collapse(features, labels, weight=torch.zeros(2, 8, dtype=torch.float64), num_classes=2)
    return {f"geomon/nc/{stat}/{head}.input": float(value) for stat, value in stats.items()}


def test_non_finite_ignores_the_neural_collapse_statistics_that_are_nan_by_definition():
    values = _binary_collapse_values("fc")
    # docs/metrics/neural_collapse.md: two classes -> gnc2_var NaN (one pair has no variance); a zero head row ->
    # nc3_cos_mean and unc3 NaN; an all-zero head -> nc3 NaN (0 / 0 in its normalisation)
    nan_stats = {key.split("/")[2] for key, value in values.items() if math.isnan(value)}
    assert {"gnc2_var", "nc3", "nc3_cos_mean", "unc3"} <= nan_stats
    values["geomon/rankme/fc.input"] = 3.5
    stop = StopFlag()
    engine = AlertEngine([NonFinite()], sinks=[stop])
    for step in range(3):
        assert engine.evaluate(10 * step, values) == []
    assert not stop
    # the rest of the statistics, and the values of a training in trouble, are still watched
    for key in ["geomon/nc/nc1/fc.input", "geomon/rankme/fc.input", ENT.format(0), "geomon/attention/entropy/x"]:
        (event,) = NonFinite().evaluate(0, {**values, key: NAN})
        assert event.details["keys"] == [key]
    heads = {ENT.format(0): [0.5, INF]}
    assert NonFinite().evaluate(0, values, heads)[0].details["keys"] == [ENT.format(0) + "/head1"]
    # the NaN-by-definition keys are exact: a probe whose name only contains a statistic's name is not ignored
    assert NonFinite().evaluate(0, {"geomon/rankme/gnc2_var": NAN})[0].key == "geomon/rankme/gnc2_var"
    # and they still fire with no ignore list
    assert NonFinite(ignore=()).evaluate(0, values)[0].details["keys"] == sorted(
        key for key, value in values.items() if math.isnan(value)
    )


def test_numpy_numbers_are_accepted_where_python_numbers_are_and_iterators_are_read_once():
    np = pytest.importorskip("numpy")
    engine = AlertEngine([MaxLogitAbove(threshold=np.float32(50.0), patience=np.int64(1))])
    (event,) = engine.evaluate(np.int64(5), {LOGIT.format(0): 80.0})
    assert event.step == 5 and type(event.step) is int
    for step in (5.0, True, "5", np.float64(5.0), None):
        with pytest.raises(ValueError, match=r"step must be an integer \(int or numpy integer, not bool\), got"):
            engine.evaluate(step, {})
    rule = RankCollapse(dims={"ln_f": np.int32(256)}, patience=np.int16(1), baseline_steps=np.int64(2))
    assert rule.dims == {"ln_f": 256} and type(rule.dims["ln_f"]) is int
    assert rule.evaluate(0, {RANK.format("ln_f"): 1.0})[0].threshold == 2.56
    # a generator is read once: its patterns and names are all kept, not used up by the checks
    assert NonFinite(ignore=(p for p in ["geomon/a/*", "geomon/b/*"])).ignore == ("geomon/a/*", "geomon/b/*")
    sink = LoggingSink(kinds=(k for k in ["fired"]), rules=(r for r in ["max_logit"]))
    assert sink.kinds == {"fired"} and sink.rules == {"max_logit"}
