"""EntropyCollapse, MaxLogitAbove, RankCollapse on constructed sequences: events where predicted by hand."""

import pytest

from geomon.alerts import EntropyCollapse, MaxLogitAbove, RankCollapse
from tests.alerts.sequences import ENT, LOGIT, RANK, heads_frames, run, summary

HEALTHY = [0.6, 0.7, 0.5, 0.8]


def _layer(t_values: dict[int, list[float]], n: int) -> list[list[float]]:
    """Healthy heads at every evaluation except those given in ``t_values``."""
    return [t_values.get(t, HEALTHY) for t in range(n)]


def test_entropy_collapse_fires_after_patience_once_per_layer_and_recovers():
    collapsed = {t: [0.6, 0.7, 0.05, 0.8 if t < 6 else 0.04] for t in range(5, 13)}
    frames = heads_frames([_layer(collapsed, 20), _layer({}, 20)])
    rule = EntropyCollapse(relative_drop=None, patience=3)
    events = run(rule, heads=frames)
    # head 2 is bad at evaluations 5, 6, 7 -> fires at 7 (1 of 4 heads of the layer: INFO); head 3 (bad from 6)
    # joins at 8: half the layer -> the episode grows to WARN (fired again, once); both are clear (>= 0.15) from
    # 13: 13, 14, 15 -> recovered at 15, naming both heads
    assert summary(events) == [
        (7, "fired", ENT.format(0), (2,)),
        (8, "fired", ENT.format(0), (2, 3)),
        (15, "recovered", ENT.format(0), (2, 3)),
    ]
    fired, grown, recovered = events
    assert grown.level == "WARN" and grown.details["escalated_from"] == "INFO" and "grown from INFO" in grown.text
    assert grown.title == "Entropy collapse (grown from INFO): blocks.0.attn"
    assert fired.step == 350 and fired.level == "INFO" and fired.threshold == 0.1 and fired.value == 0.05
    assert fired.details["active_units"] == 1 and fired.details["units_seen"] == 8
    assert "layer blocks.0.attn" in fired.text and "step 350" in fired.text and "head 2 of 4" in fired.text
    assert "0.05" in fired.text and "threshold 0.1" in fired.text and "1 of 8 heads (12.5%)" in fired.text
    assert fired.title == "Entropy collapse: blocks.0.attn"
    assert recovered.level == "INFO" and recovered.details["fired_step"] == 350
    assert recovered.title == "Entropy collapse cleared: blocks.0.attn" and "heads 2, 3 of 4" in recovered.text


def test_entropy_collapse_hysteresis_and_flapping():
    # bad at 2, 3 (patience 2) -> fires at 3; 0.12 is above the threshold but below the clear level 0.15:
    # hovering there (and dipping again) neither recovers nor fires again; 0.2 twice -> recovered at 11
    head = [0.5, 0.5, 0.05, 0.05, 0.12, 0.09, 0.12, 0.13, 0.12, 0.09, 0.2, 0.2, 0.2]
    events = run(EntropyCollapse(relative_drop=None, patience=2), heads=[{ENT.format(0): [v]} for v in head])
    assert summary(events) == [(3, "fired", ENT.format(0), (0,)), (11, "recovered", ENT.format(0), (0,))]
    # patience debounces: bad every other evaluation never fires
    alternating = [0.05 if t % 2 else 0.5 for t in range(30)]
    rule = EntropyCollapse(relative_drop=None, patience=2)
    assert run(rule, heads=[{ENT.format(0): [v]} for v in alternating]) == []


def test_entropy_collapse_level_grows_with_the_share_of_collapsed_heads():
    def first_event(collapsed_per_layer):
        layers = [[[0.01 if h in bad else 0.6 for h in range(4)]] * 3 for bad in collapsed_per_layer]
        events = run(EntropyCollapse(patience=3), heads=heads_frames(layers))
        return [(event.key, event.level) for event in events]

    assert first_event([{1}, set(), set()]) == [(ENT.format(0), "INFO")]  # 1 of 12 heads: 8%, 1 of 4 in the layer
    assert first_event([{1, 2}, set(), set()]) == [(ENT.format(0), "WARN")]  # half the layer (2 of 12 model-wide)
    spread = first_event([{1}, {1}, {1}])  # one head in each layer, but 3 of 12 = 25% of the model
    assert spread == [(ENT.format(i), "WARN") for i in range(3)]
    both = first_event([{0, 1, 2}, {0, 1, 2}, set()])  # 6 of 12: 50%
    assert both == [(ENT.format(0), "ERROR"), (ENT.format(1), "ERROR")]
    custom = EntropyCollapse(patience=1, share_levels=(0.0, 0.9))
    assert custom.evaluate(0, {}, {ENT.format(0): [0.01, 0.5]})[0].level == "WARN"


def test_entropy_collapse_relative_baseline_does_not_chase_the_collapse():
    rule = EntropyCollapse(threshold=0.05, relative_drop=0.5, patience=2, baseline_steps=5)
    head = [0.8] * 5 + [0.35] * 60 + [0.55, 0.65, 0.65]
    events = run(rule, heads=[{ENT.format(0): [v]} for v in head])
    # baseline 0.8 (median of 5 healthy values); 0.35 < 0.4 at 5, 6 -> fires at 6, and 60 evaluations at 0.35
    # neither move the baseline nor refire; recovery needs >= min(0.4 * 1.5, 0.8) = 0.6 twice: 66, 67
    assert summary(events) == [(6, "fired", ENT.format(0), (0,)), (67, "recovered", ENT.format(0), (0,))]
    assert events[0].baseline == pytest.approx(0.8) and events[0].threshold == pytest.approx(0.4)  # 0.35 > 0.05
    assert "more than 50% below its running baseline 0.8" in events[0].text
    # an EMA-style baseline would have chased 0.35 down; ours still reads 0.8 after the episode (0.55 and the 0.65
    # that ended it arrived while the head was active: none of them joined it)
    window = rule.state_dict()["units"][ENT.format(0)]["0"][3]
    assert window == [0.8] * 5


def test_entropy_slow_specialisation_does_not_trip_the_relative_test():
    head = [0.9 * 0.98**t for t in range(55)]  # 0.9 -> 0.30: heads sharpening over training, never sharply
    assert run(EntropyCollapse(relative_drop=0.5), heads=[{ENT.format(0): [v]} for v in head]) == []
    steps = [0.9] * 10 + [0.3] * 3
    sharp = run(EntropyCollapse(relative_drop=0.5), heads=[{ENT.format(0): [v]} for v in steps])
    assert run(EntropyCollapse(), heads=[{ENT.format(0): [v]} for v in steps]) == []  # off by default
    assert summary(sharp) == [(12, "fired", ENT.format(0), (0,))] and "baseline 0.9" in sharp[0].text


def test_entropy_collapse_falls_back_to_the_layer_scalar():
    scalars = [{ENT.format(0): v, ENT.format(1): 0.5} for v in [0.5, 0.04, 0.03, 0.02, 0.5, 0.5, 0.5]]
    heads = [{ENT.format(1): [0.5, 0.5]}] * 7  # layer 1 has a per-head vector: its scalar is not used
    events = run(EntropyCollapse(patience=3), scalars=scalars, heads=heads)
    assert summary(events) == [(3, "fired", ENT.format(0), ()), (6, "recovered", ENT.format(0), ())]
    assert "in layer blocks.0.attn at step 150: normalised attention entropy 0.02, below" in events[0].text
    assert events[0].details["units_seen"] == 3


def test_non_finite_values_are_skipped_not_counted():
    head = [0.05, float("nan"), 0.05, 0.05]  # NaN neither breaks nor extends the bad streak
    events = run(EntropyCollapse(patience=3), heads=[{ENT.format(0): [v]} for v in head])
    assert summary(events) == [(3, "fired", ENT.format(0), (0,))]


def test_max_logit_fires_recovers_below_the_band_and_refires():
    values = [50.0, 120.0, 130.0, 95.0, 85.0, 110.0]
    events = run(MaxLogitAbove(), scalars=[{LOGIT.format(0): v} for v in values])
    assert summary(events) == [
        (1, "fired", LOGIT.format(0), ()),
        (4, "recovered", LOGIT.format(0), ()),
        (5, "fired", LOGIT.format(0), ()),
    ]
    assert events[0].text == (
        "Max attention logit in layer blocks.0.attn at step 50: max attention logit 120, above the threshold 100, "
        "for 1 consecutive evaluation. Try a lower learning rate or a longer warm-up, QK-layernorm, or σReparam "
        "(geomon.reparam.sigma_reparam); see docs/guides/alerts.md#the-rules."
    )  # what crossed, where, since when, and what to try
    per_head = run(MaxLogitAbove(patience=2), heads=[{LOGIT.format(3): [10.0, 140.0, 101.0]}] * 2)
    assert summary(per_head) == [(1, "fired", LOGIT.format(3), (1, 2))] and per_head[0].value == 140.0
    assert "heads 1, 2 of 3" in per_head[0].text and "(head 1)" in per_head[0].text


def test_rank_collapse_relative_drop_ratio_and_floor():
    key = RANK.format("ln_f")
    values = [120.0, 125.0, 118.0, 122.0, 121.0, 50.0, 48.0, 2.0, 100.0, 100.0]
    events = run(RankCollapse(dims={"ln_f": 256}), scalars=[{key: v} for v in values])
    # baseline = median(120, 125, 118, 122, 121) = 121; 50 < 60.5 at 5, 6 -> fired at 6; clear (>= 66.55) at 8, 9
    assert summary(events) == [(6, "fired", key, ()), (9, "recovered", key, ())]
    assert events[0].baseline == 121.0 and "probe ln_f" in events[0].text and "RankMe 48" in events[0].text
    assert events[0].threshold == pytest.approx(60.5)  # the bar crossed: half the baseline (not 1% of D, 2.56)
    ratio_only = RankCollapse(relative_drop=None, dims={"geomon/rankme/proj": 128})
    assert summary(run(ratio_only, scalars=[{RANK.format("proj"): 1.1}] * 2)) == [(1, "fired", RANK.format("proj"), ())]
    by_probe = RankCollapse(relative_drop=None, patience=1, dims={"proj": 128})
    assert "below 1% of its width D = 128 (1.28)" in run(by_probe, scalars=[{RANK.format("proj"): 1.1}])[0].text


def test_rank_collapse_ratio_needs_the_width():
    rule = RankCollapse(relative_drop=None, patience=1)
    assert rule.evaluate(0, {RANK.format("z"): 1.0}) == []  # D unknown: the ratio test does not apply
    rule.set_dims({"z": 256})
    assert [event.kind for event in rule.evaluate(50, {RANK.format("z"): 1.0})] == ["fired"]
    floor = RankCollapse(min_ratio=None, floor=4.0, relative_drop=None, patience=1)
    assert floor.evaluate(0, {RANK.format("z"): 3.0})[0].threshold == 4.0


DEFAULT_NAMES = ("entropy_collapse", "non_finite")


def test_two_rules_of_one_class_give_distinct_titles():
    """W&B rate-limits and merges alerts by title: two rules of one class must never share one."""
    from geomon.alerts import AlertEngine, NonFinite
    from geomon.alerts.events import MAX_TITLE

    long_layer = "model.transformer.encoder.layers.11.self_attention.core"
    keys_ = [ENT.format(0), f"geomon/attention/entropy_normalized/{long_layer}"]
    rules = [
        EntropyCollapse(patience=1),
        EntropyCollapse(threshold=0.3, patience=1, name="entropy_collapse_strict_threshold"),
        EntropyCollapse(threshold=0.2, patience=1, name="entropy_collapse_strict_layers"),
        NonFinite(),
        NonFinite(ignore=(), name="non_finite_everything"),
    ]
    engine = AlertEngine(rules)
    fired = engine.evaluate(0, {"geomon/rankme/z": float("nan")}, {key: [0.05, 0.6] for key in keys_})
    recovered = engine.evaluate(1, {}, {key: [0.6, 0.6] for key in keys_})
    for events in (fired, recovered):
        titles = [event.title for event in events]
        assert len(events) == 8 and len(set(titles)) == 8, titles
        assert all(len(title) <= MAX_TITLE for title in titles)
        # a rule with a name of its own carries it whole, however long the layer's name
        assert all(f"({event.rule}" in event.title for event in events if event.rule not in DEFAULT_NAMES)
    # the rule with the default name keeps the short title the guide shows
    assert fired[0].title == "Entropy collapse: blocks.0.attn"
    assert fired[1].title.startswith("Entropy collapse: model.transfor") and fired[1].title.endswith("attention.core")
    strict = EntropyCollapse(patience=1, name="strict")  # 1 of 8 heads collapsed: INFO; 2 of 8: WARN
    events = run(strict, heads=[{ENT.format(0): [0.05] + [0.6] * 7}, {ENT.format(0): [0.05, 0.05] + [0.6] * 6}])
    assert [(e.level, e.title) for e in events] == [
        ("INFO", "Entropy collapse (strict): blocks.0.attn"),
        ("WARN", "Entropy collapse (strict, grown from INFO): blocks.0.attn"),
    ]
    assert recovered[0].title == "Entropy collapse cleared: blocks.0.attn"
    assert [e.title for e in fired if e.rule.startswith("non_finite")] == [
        "Non-finite values",
        "Non-finite values (non_finite_everything)",
    ]


def test_entropy_collapse_escalates_only_the_layer_whose_own_heads_collapsed():
    """Other layers collapsing raise the model-wide share, hence the level a new event gets; a layer whose own heads
    did not change must not fire again for that (it was reported, at its level, when its heads collapsed)."""
    ok, gone = 0.6, 0.02
    layer0 = [[ok] * 4, [gone, ok, ok, ok], [gone, ok, ok, ok], [gone, ok, ok, ok], [gone, gone, ok, ok]]
    layer1 = [[ok] * 4, [ok] * 4, [gone] * 4, [gone] * 4, [gone] * 4]
    layer2 = [[ok] * 4, [ok] * 4, [ok] * 4, [gone] * 4, [gone] * 4]
    events = run(EntropyCollapse(patience=1), heads=heads_frames([layer0, layer1, layer2]))
    # 1: one head of 12 (8%, a quarter of layer 0): INFO. 2: layer 1 goes, 5 of 12 (42%): layer 1 fires WARN,
    # layer 0 is unchanged. 3: layer 2 goes, 9 of 12 (75%): layer 2 fires ERROR, layers 0 and 1 are unchanged.
    # 4: a second head of layer 0 goes: its own episode got worse, and its level now is ERROR: it grows from INFO
    assert [(t, kind, key, heads, e.level, e.details.get("escalated_from")) for e, (t, kind, key, heads) in
            zip(events, summary(events), strict=True)] == [
        (1, "fired", ENT.format(0), (0,), "INFO", None),
        (2, "fired", ENT.format(1), (0, 1, 2, 3), "WARN", None),
        (3, "fired", ENT.format(2), (0, 1, 2, 3), "ERROR", None),
        (4, "fired", ENT.format(0), (0, 1), "ERROR", "INFO"),
    ]  # fmt: skip
