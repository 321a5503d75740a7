import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomon.functional import GeomonWarning, neural_collapse
from geomon.functional import _class_tiles as class_tiles
from geomon.functional._common import sum_stats
from geomon.functional.neural_collapse import (
    HEAD_STATISTICS,
    STATISTICS,
    _neural_collapse_compute,
    _neural_collapse_update,
    means_from_stats,
)
from tests.conftest import to_np
from tests.reference import ref_neural_collapse, ref_simplex_etf


def _clustered(rng, n, c, d, spread=0.5, weights=None):
    """Features around random class centres; labels drawn with the given class weights (unseen classes possible)."""
    centres = rng.standard_normal((c, d)) * 2
    labels = rng.choice(c, size=n, p=weights)
    features = centres[labels] + spread * rng.standard_normal((n, d))
    return torch.from_numpy(features), torch.from_numpy(labels)


def _assert_matches(values, expected, rel=1e-8, abs_=1e-10):
    assert set(values) == set(expected)
    for key, value in expected.items():
        assert float(values[key]) == pytest.approx(value, rel=rel, abs=abs_), key


@pytest.mark.parametrize(("n", "c", "d"), [(120, 5, 8), (300, 12, 20), (400, 30, 10)])  # the last: C > D
def test_matches_float64_reference_with_head(n, c, d, rng):
    features, labels = _clustered(rng, n, c, d)
    weight = torch.from_numpy(rng.standard_normal((c, d)))
    bias = torch.from_numpy(rng.standard_normal(c))
    values = neural_collapse(features, labels, weight, bias)
    expected = ref_neural_collapse(features.numpy(), labels.numpy(), weight.numpy(), bias.numpy())
    _assert_matches(values, expected)


def test_matches_reference_without_head_and_with_unseen_classes(rng):
    weights = np.array([0.3, 0.0, 0.3, 0.2, 0.0, 0.2])
    features, labels = _clustered(rng, 200, 6, 7, weights=weights)
    values = neural_collapse(features, labels, num_classes=6)
    assert set(values) == set(STATISTICS)
    _assert_matches(values, ref_neural_collapse(features.numpy(), labels.numpy(), num_classes=6))
    weight = torch.from_numpy(rng.standard_normal((6, 7)))
    # nc4's classifier may pick an unseen class: the reference takes argmax over all rows too
    values = neural_collapse(features, labels, weight)
    _assert_matches(values, ref_neural_collapse(features.numpy(), labels.numpy(), weight.numpy()))


@pytest.mark.parametrize("exponent", [2.0, 4.0])
def test_cdnv_exponent(exponent, rng):
    features, labels = _clustered(rng, 150, 4, 6)
    value = neural_collapse(features, labels, cdnv_exponent=exponent)["cdnv"]
    expected = ref_neural_collapse(features.numpy(), labels.numpy(), cdnv_exponent=exponent)["cdnv"]
    assert float(value) == pytest.approx(expected, rel=1e-9)


def test_given_class_means_drive_nc4(rng):
    features, labels = _clustered(rng, 90, 5, 6)
    weight = torch.from_numpy(rng.standard_normal((5, 6)))
    means = torch.from_numpy(rng.standard_normal((5, 6)))
    means[3] = float("nan")  # an unknown class takes no part in the nearest-centre search
    value = neural_collapse(features, labels, weight, class_means=means)["nc4"]
    expected = ref_neural_collapse(features.numpy(), labels.numpy(), weight.numpy(), class_means=means.numpy())
    assert float(value) == pytest.approx(expected["nc4"], abs=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_a_nan_in_the_head_leaves_nc4_undefined(where, backend, rng):
    # torch.argmax, the tiled torch search and the kernel each skip a NaN class differently: nc4 reads NaN, the
    # statistics that do not use the head stay as they were
    features, labels = _clustered(rng, 90, 5, 6)
    features = features.float()  # the kernel searches float32 features (float64 ones take the torch path)
    weight, bias = torch.from_numpy(rng.standard_normal((5, 6))).float(), torch.zeros(5)
    means = torch.from_numpy(rng.standard_normal((5, 6))).float()
    clean = neural_collapse(features, labels, weight, bias, class_means=means, backend=backend)
    assert math.isfinite(float(clean["nc4"]))
    (weight if where == "weight" else bias)[3, ...] = math.nan
    broken = neural_collapse(features, labels, weight, bias, class_means=means, backend=backend)
    assert math.isnan(float(broken["nc4"]))
    for key in ("nc1", "nc2_equinorm", "cdnv"):
        assert float(broken[key]) == pytest.approx(float(clean[key]), rel=1e-12), key
    # reference means with no finite row (a window that saw only NaN) leave no centre: NaN, not class 0 for all
    unknown = neural_collapse(features, labels, weight.nan_to_num(), class_means=means * math.nan, backend=backend)
    assert math.isnan(float(unknown["nc4"]))


@pytest.mark.parametrize(("c", "d"), [(3, 3), (5, 12), (10, 10), (40, 64)])
def test_exact_simplex_etf_is_fully_collapsed(c, d, rng):
    offset = rng.standard_normal(d)
    means = ref_simplex_etf(c, d, rng) * 3.0 + offset  # any scale and global offset
    labels = np.repeat(np.arange(c), 4)
    features = torch.from_numpy(means[labels])
    weight = torch.from_numpy(means - offset)  # W = Mᵀ; the bias removes the offset from the decision
    values = neural_collapse(features, torch.from_numpy(labels), weight, -weight @ torch.from_numpy(offset))
    for key in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4", "cdnv"):
        assert abs(float(values[key])) < 1e-9, key
    assert float(values["gnc2_mean"]) == pytest.approx(-0.5 * math.log(2 * c / (c - 1)), abs=1e-12)
    assert abs(float(values["gnc2_var"])) < 1e-12
    assert float(values["nc3_cos_mean"]) == pytest.approx(1.0, abs=1e-12)


def test_gnc2_mean_is_bounded_below_by_the_etf_value(rng):
    for c in (3, 7, 15):
        features, labels = _clustered(rng, 40 * c, c, 20)
        assert float(neural_collapse(features, labels)["gnc2_mean"]) >= -0.5 * math.log(2 * c / (c - 1)) - 1e-12


@given(seed=st.integers(0, 2**31 - 1), c=st.integers(2, 6), d=st.integers(2, 6))
@settings(max_examples=40, deadline=None)
def test_invariant_to_global_rotation_and_translation(seed, c, d):
    rng = np.random.default_rng(seed)
    features, labels = _clustered(rng, 12 * c, c, d)
    if len(np.unique(labels.numpy())) < 2:
        return
    weight = torch.from_numpy(rng.standard_normal((c, d)))
    rotation = torch.from_numpy(np.linalg.qr(rng.standard_normal((d, d)))[0])
    shift = torch.from_numpy(rng.standard_normal(d) * 5)
    before = neural_collapse(features, labels, weight)
    # features rotate and translate; the head rotates with them and its bias absorbs the translation
    after = neural_collapse(features @ rotation.T + shift, labels, weight @ rotation.T, -(weight @ rotation.T) @ shift)
    for key in STATISTICS + HEAD_STATISTICS:
        if key == "gnc2_var" and len(np.unique(labels.numpy())) == 2:  # one pair: no variance
            assert math.isnan(before[key]) and math.isnan(after[key])
            continue
        assert float(after[key]) == pytest.approx(float(before[key]), rel=1e-6, abs=1e-9), key


def test_streaming_equals_one_shot(rng):
    features, labels = _clustered(rng, 230, 7, 9)
    weight = torch.from_numpy(rng.standard_normal((7, 9)))
    whole = neural_collapse(features, labels, weight)
    means = means_from_stats(_neural_collapse_update(features, labels, num_classes=7))
    stats = None
    for part_f, part_l in zip(features.split(37), labels.split(37), strict=True):
        part = _neural_collapse_update(part_f, part_l, weight, num_classes=7, class_means=means)
        stats = part if stats is None else sum_stats(stats, part)
    streamed = _neural_collapse_compute(stats, weight)
    for key, value in whole.items():
        assert float(streamed[key]) == pytest.approx(float(value), rel=1e-9, abs=1e-12), key


def test_tiles_do_not_change_the_result(rng, monkeypatch):
    features, labels = _clustered(rng, 64, 9, 5)
    weight = torch.from_numpy(rng.standard_normal((9, 5)))
    whole = neural_collapse(features, labels, weight)
    monkeypatch.setattr(class_tiles, "TILE_ELEMENTS", 100)  # 1 class per decision tile, 11 rows per pair tile
    tiled = neural_collapse(features, labels, weight)
    for key, value in whole.items():
        assert float(tiled[key]) == pytest.approx(float(value), rel=1e-10, abs=1e-12), key


def test_ties_go_to_the_lowest_class_like_argmax():
    features = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    rows = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    offset = torch.zeros(4, dtype=torch.float64)
    assert int(class_tiles.tiled_argmax(features, rows, offset)) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_features(dtype, rng):
    features, labels = _clustered(rng, 160, 4, 6)
    features = features.to(dtype)
    values = neural_collapse(features, labels)
    expected = ref_neural_collapse(to_np(features), labels.numpy())
    _assert_matches(values, expected, rel=1e-6, abs_=1e-9)


def test_degenerate_inputs_warn_and_return_nan(rng):
    with pytest.warns(GeomonWarning, match="only 1 class"):
        values = neural_collapse(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64), torch.randn(2, 3))
    assert set(values) == set(STATISTICS + HEAD_STATISTICS) and all(math.isnan(v) for v in values.values())
    with pytest.warns(GeomonWarning, match="only 0 class"):
        neural_collapse(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), num_classes=3)
    features, labels = _clustered(rng, 30, 3, 4)
    features[4, 1] = float("inf")
    with pytest.warns(GeomonWarning, match="NaN or Inf"):
        assert math.isnan(neural_collapse(features, labels)["nc1"])


def test_labels_out_of_range_are_rejected_in_both_paths():
    features, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 1, -1])
    with pytest.raises(ValueError, match=r"2 labels are outside \[0, num_classes = 3\) \(labels span -1..3\)"):
        neural_collapse(features, labels, num_classes=3)
    stats = _neural_collapse_update(features, labels, num_classes=3)  # no sync in update: counted, not indexed
    with pytest.raises(ValueError, match="2 labels were outside"):
        _neural_collapse_compute(stats)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.randn(4, 3), torch.tensor([0, 1, 0, 1.0])), {}, TypeError, "labels must be an integer tensor"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 0])), {}, ValueError, "disagree on N: 4 vs 3"),
        ((torch.randn(4), torch.tensor([0, 1, 0, 1])), {}, ValueError, r"features must have shape \[N, D\]"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 4)), {}, ValueError, r"weight must have"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), {"bias": torch.randn(2)}, ValueError, "without weight"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), {"num_classes": 0}, ValueError, "positive integer"),
        (
            (torch.randn(4, 3).to(torch.complex64), torch.tensor([0, 1, 0, 1])),
            {},
            TypeError,
            "features must be a real",
        ),
        (
            (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])),
            {"num_classes": 2, "class_means": torch.randn(3, 3)},
            ValueError,
            "class_means must have shape",
        ),
    ],
)
def test_bad_input_is_rejected(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        neural_collapse(*args, **kwargs)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_classes_with_coinciding_means_are_counted_not_averaged_as_infinite(scale, rng):
    # Two next tokens seen only after the same prefix share one feature vector: their CDNV is infinite. Regression:
    # cdnv read inf and gnc2_var NaN, which raised the non-finite alert on healthy language-model runs.
    features, labels = _clustered(rng, 200, 6, 8)
    features = features * scale
    shared = features[0].clone()
    twins = torch.tensor([6, 7, 6, 7, 6, 7])  # equal counts: bit-identical means, so nc4's tie goes to class 6 in both
    features = torch.cat([features, shared.expand(len(twins), -1)])
    labels = torch.cat([labels, twins])
    weight = torch.from_numpy(rng.standard_normal((8, 8)))
    with pytest.warns(GeomonWarning, match="coinciding means"):
        values = neural_collapse(features, labels, weight)
    assert all(math.isfinite(float(v)) for v in values.values())
    assert float(values["coincident_pairs"]) == pytest.approx(1 / math.comb(8, 2))
    expected = ref_neural_collapse(features.numpy(), labels.numpy(), weight.numpy())
    _assert_matches(values, expected)
    # the other pairs' CDNV, computed directly: the 6 distinct classes plus each twin against them
    means = torch.stack([features[labels == c].mean(dim=0) for c in range(8)])
    variances = torch.stack([((features[labels == c] - means[c]) ** 2).sum(dim=1).mean() for c in range(8)])
    direct = [
        (variances[a] + variances[b]) / (2 * (means[a] - means[b]).norm() ** 2)
        for a in range(8)
        for b in range(a + 1, 8)
        if (a, b) != (6, 7)
    ]
    assert float(values["cdnv"]) == pytest.approx(float(torch.stack(direct).mean()), rel=1e-8)


def test_means_apart_report_no_coincident_pairs(rng):
    features, labels = _clustered(rng, 150, 5, 6, spread=1e-9)  # near-perfect within-class collapse, means apart
    values = neural_collapse(features, labels)
    assert float(values["coincident_pairs"]) == 0.0
    assert math.isfinite(float(values["cdnv"])) and math.isfinite(float(values["gnc2_var"]))


def test_all_means_coinciding_leaves_cdnv_undefined(rng):
    features = torch.from_numpy(rng.standard_normal(5)).expand(12, -1).clone()
    labels = torch.arange(12) % 3
    with pytest.warns(GeomonWarning, match="coinciding means"):
        values = neural_collapse(features, labels)
    assert float(values["coincident_pairs"]) == 1.0
    assert math.isnan(float(values["cdnv"])) and math.isnan(float(values["gnc2_mean"]))


def test_coinciding_means_near_the_origin_beside_far_classes_are_found(rng):
    # regression: the coincidence test scaled with |μ_c|² only, while the rounding of the distance (computed from the
    # centred means) scales with |μ_c - μ_G|²: twins near the origin beside classes near 1000 went unflagged about
    # half the time, and cdnv spiked to ~1e3
    for _ in range(8):
        far, labels_far = _clustered(rng, 120, 4, 6)
        far = far * 500 + 1000
        shared = torch.from_numpy(rng.standard_normal((3, 6))) * 1e-2
        features = torch.cat([far, shared, shared])  # classes 4 and 5: the same three rows
        labels = torch.cat([labels_far, torch.full((3,), 4), torch.full((3,), 5)])
        with pytest.warns(GeomonWarning, match="coinciding means"):
            values = neural_collapse(features, labels)
        assert float(values["coincident_pairs"]) == pytest.approx(1 / math.comb(6, 2))
        _assert_matches(values, ref_neural_collapse(features.numpy(), labels.numpy()))


@pytest.mark.parametrize("offset", [0.0, 1e-17, 1e-12])
def test_a_mean_at_the_global_mean_to_rounding_has_no_direction(offset):
    # regression: only a mean exactly at μ_G had no direction; one 1e-17 from it (the rounding of μ_G itself) gave
    # finite nc2_equiangular 0.616 and no warning, while coincident pairs already had a relative tolerance
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    centres[0] = offset  # the others sum to 0: class 0 sits at μ_G, up to the offset
    labels = torch.arange(5).repeat(3)
    spread = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.0]], dtype=torch.float64).repeat_interleave(5, 0)
    features = centres[labels] + spread
    weight = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 2)))
    with pytest.warns(GeomonWarning, match="has no direction"):
        values = neural_collapse(features, labels, weight)
    expected = ref_neural_collapse(features.numpy(), labels.numpy(), weight.numpy())
    for key in ("nc2_equiangular", "nc2_maxangle", "nc3_cos_mean", "unc3"):
        assert math.isnan(expected[key]) and math.isnan(float(values[key])), key
    _assert_matches({k: v for k, v in values.items() if not math.isnan(float(v))},
                    {k: v for k, v in expected.items() if not math.isnan(v)})  # fmt: skip


def test_a_mean_well_apart_from_the_global_mean_keeps_its_direction():
    centres = torch.tensor([[1e-5, 2e-5], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    labels = torch.arange(5).repeat(2)
    features = centres[labels] + torch.tensor([[0.1, 0.0], [-0.1, 0.0]], dtype=torch.float64).repeat_interleave(5, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeomonWarning)
        values = neural_collapse(features, labels)
    _assert_matches(values, ref_neural_collapse(features.numpy(), labels.numpy()))
    assert math.isfinite(float(values["nc2_equiangular"]))


@pytest.mark.parametrize("scale", [1e200, 1e-170, 2.0**-1040])
def test_float64_features_of_extreme_scale_match_the_unscaled_reference(scale, rng):
    # regression: a float64 Gram of finite features above ~1e154 overflowed (NaN, "the features contain NaN or Inf")
    # and below ~1e-162 underflowed (nc1 read 0); the statistics are scale-invariant, nc4 without a bias too
    features, labels = _clustered(rng, 120, 5, 6)
    weight = torch.from_numpy(rng.standard_normal((5, 6)))
    expected = ref_neural_collapse(features.numpy(), labels.numpy(), weight.numpy())
    values = neural_collapse(features * scale, labels, weight)
    _assert_matches(values, expected)


def test_extreme_features_decide_nc4_with_the_bias_as_given(rng):
    # nc4's classifier decision is not scale-invariant with a bias: it sees the features as given, the nearest-centre
    # search (scale-invariant) the rescaled ones
    features, labels = _clustered(rng, 150, 4, 5, spread=2.0)
    scale = 1e-170
    weight = torch.from_numpy(rng.standard_normal((4, 5))) * 1e170
    bias = torch.from_numpy(rng.standard_normal(4)) * 3
    values = neural_collapse(features * scale, labels, weight, bias)
    h, y = features.numpy(), labels.numpy()
    means = np.stack([h[y == c].mean(axis=0) for c in range(4)])
    decision = np.argmax((h * scale) @ weight.numpy().T + bias.numpy(), axis=1)
    nearest = np.argmin(((h[:, None, :] - means[None]) ** 2).sum(axis=2), axis=1)
    assert 0 < float(values["nc4"]) == pytest.approx(np.mean(decision != nearest), abs=1e-15)
    assert float(values["nc4"]) != pytest.approx(np.mean(np.argmax(h @ weight.numpy().T + bias.numpy(), 1) != nearest))


def test_extreme_scale_undoes_the_rescaling_of_cdnv_with_exponent_4(rng):
    features, labels = _clustered(rng, 100, 4, 5)
    expected = ref_neural_collapse(features.numpy(), labels.numpy(), cdnv_exponent=4.0)["cdnv"]
    value = neural_collapse(features * 1e-100, labels, cdnv_exponent=4.0)["cdnv"]  # V / d^4 scales as 1e200
    assert float(value) == pytest.approx(expected * 1e200, rel=1e-9)


@pytest.mark.parametrize(("scale", "match"), [(1e200, "squares overflow"), (1e-170, "squares underflow")])
def test_the_streaming_metric_names_extreme_scale_as_the_cause(scale, match, rng):
    from geomon.metrics import NeuralCollapse

    features, labels = _clustered(rng, 60, 3, 4)
    metric = NeuralCollapse(3, 4)
    metric.update(features * scale, labels)
    with pytest.warns(GeomonWarning, match=f"{match}.*cannot rescale"):
        assert math.isnan(float(metric.compute()["nc1"]))


def test_ignore_index_leaves_rows_out_of_everything(rng):
    features, labels = _clustered(rng, 150, 5, 6)
    weight = torch.from_numpy(rng.standard_normal((5, 6)))
    bias = torch.from_numpy(rng.standard_normal(5))
    padded = labels.clone()
    padded[::4] = -100
    features[::4] = float("nan")  # padding rows may hold anything
    keep = padded != -100
    values = neural_collapse(features, padded, weight, bias, ignore_index=-100)
    expected = ref_neural_collapse(features[keep].numpy(), labels[keep].numpy(), weight.numpy(), bias.numpy())
    _assert_matches(values, expected)
    # without a weight the class count comes from the labels other than ignore_index (here one above them all)
    values = neural_collapse(features, torch.where(keep, labels, 7), ignore_index=7)
    _assert_matches(values, ref_neural_collapse(features[keep].numpy(), labels[keep].numpy()))


@pytest.mark.parametrize(
    ("ignore_index", "error", "match"),
    [
        (0, ValueError, "must lie outside"),
        ("pad", TypeError, "ignore_index must be an integer"),
        (True, TypeError, "got bool"),
    ],
)
def test_ignore_index_is_checked(ignore_index, error, match):
    from geomon.metrics import NeuralCollapse

    features, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(error, match=match):
        neural_collapse(features, labels, num_classes=2, ignore_index=ignore_index)
    with pytest.raises(error, match=match):
        NeuralCollapse(2, 3, ignore_index=ignore_index)


@pytest.mark.parametrize(
    ("value", "error"),
    [("4", TypeError), (None, TypeError), ([2.0], TypeError), (0.0, ValueError), (math.inf, ValueError)],
)
def test_a_bad_cdnv_exponent_is_named(value, error):
    from geomon.metrics import NeuralCollapse

    with pytest.raises(error, match="cdnv_exponent must be"):
        neural_collapse(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), cdnv_exponent=value)
    with pytest.raises(error, match="cdnv_exponent must be"):
        NeuralCollapse(2, 3, cdnv_exponent=value)
