"""Neural collapse of penultimate features against the classifier (Papyan, Han & Donoho, PNAS 2020) and its
large-vocabulary forms (Galanti et al. 2022 CDNV; Wu & Papyan, "Linguistic Collapse", 2024: GNC2, UNC3).

Streaming form: per class the count ``n_c``, feature sum ``S_c`` and sum of squared norms ``q_c``, plus the global
``Σ h hᵀ``; all add across batches and processes. Then ``μ_c = S_c / n_c``,
``Σ_W = (Σ h hᵀ - Σ_c n_c μ_c μ_cᵀ) / N`` and ``V_c = q_c / n_c - |μ_c|²``. Only classes with samples count
(``C`` = seen classes) except in the classifier's own decision for ``nc4`` (argmax over all rows of ``W``).
``μ_G`` is the unweighted mean of the class means; variances over classes or pairs are unbiased.

``nc4`` compares the classifier's decision with the nearest class centre, which needs the class means first: the
one-shot function makes two passes; a stream (:class:`geomon.metrics.NeuralCollapse`) uses the means of the
previous window. Memory: ``O(C·D + D²)`` state; the ``N x C`` decisions and the ``C x C`` pairs run in tiles.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from geomon.functional._class_tiles import COINCIDENT, nearest_centre, pair_sums, tiled_argmax
from geomon.functional._common import (
    check_float_tensor,
    check_int_tensor,
    check_number,
    compute_dtype,
    nan,
    rescale_extreme,
    scale_by_power_of_two,
    warn,
)
from geomon.functional._dispatch import Backend, choose_backend
from geomon.functional._embedding import GRAM_UNDERFLOW, STREAMING_NOTE

STATISTICS = (
    "nc1",
    "nc2_equinorm",
    "nc2_equiangular",
    "nc2_maxangle",
    "cdnv",
    "gnc2_mean",
    "gnc2_var",
    "coincident_pairs",
)
HEAD_STATISTICS = ("nc3", "nc3_cos_mean", "unc3", "nc4")


class ClassStats(NamedTuple):
    """Sum-reducible statistics of labelled features (float64)."""

    count: Tensor  #: [C] samples per class
    feature_sum: Tensor  #: [C, D] Σ h per class
    sq_norm_sum: Tensor  #: [C] Σ |h|² per class
    gram: Tensor  #: [D, D] Σ h hᵀ over all samples
    n_invalid: Tensor  #: [] labels outside [0, C)
    nc4_mismatch: Tensor  #: [] samples whose classifier decision differs from the nearest class centre
    nc4_count: Tensor  #: [] samples decided


def _validate(features, labels, weight, bias, num_classes, class_means) -> None:
    check_float_tensor(features, "features", 2, "[N, D]")
    check_int_tensor(labels, "labels", "[N]")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"features [N, D] and labels [N] disagree on N: {features.shape[0]} vs {labels.shape[0]}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    d = features.shape[1]
    if weight is not None:
        check_float_tensor(weight, "weight", 2, "[C, D]")
        if tuple(weight.shape) != (num_classes, d):
            raise ValueError(f"weight must have shape [C, D] = {(num_classes, d)}, got {tuple(weight.shape)}")
    if bias is not None:
        if weight is None:
            raise ValueError("bias was given without weight")
        check_float_tensor(bias, "bias", 1, "[C]")
        if bias.shape[0] != num_classes:
            raise ValueError(f"bias must have shape [C] = [{num_classes}], got {tuple(bias.shape)}")
    if class_means is not None:
        check_float_tensor(class_means, "class_means", 2, "[C, D]")
        if tuple(class_means.shape) != (num_classes, d):
            raise ValueError(f"class_means must have shape [C, D] = {(num_classes, d)}, got {tuple(class_means.shape)}")


def _nc4_update(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    class_means: Tensor,
    backend: Backend = "auto",
    keep: Tensor | None = None,
    centre_features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(mismatches, samples)``: classifier argmax over all classes vs nearest finite class mean, both as
    decided by the float64 scores (no host sync on the kernel path; the torch path's float64 re-check syncs on CUDA);
    rows where ``keep`` is False are not counted. A NaN anywhere in the head's weight or bias leaves the argmax
    undefined (the search would only skip that class), and means with no finite row leave no centre: the
    mismatches are NaN then. ``centre_features``: the features the nearest-centre search reads, in the units of
    ``class_means`` (the one-shot function's rescaled float64 features), default ``features``."""
    dtype = compute_dtype(features)
    h = features.detach().to(dtype)
    w = weight.detach().to(dtype)
    offset = torch.zeros(w.shape[0], dtype=dtype, device=h.device) if bias is None else bias.detach().to(dtype)
    decision = tiled_argmax(h, w, offset, backend)
    search_h = h if centre_features is None else centre_features.detach().to(dtype)
    nearest = nearest_centre(search_h, class_means.detach().to(dtype), backend)
    undefined = w.isnan().any() | offset.isnan().any() | ~class_means.isfinite().all(dim=1).any()
    if keep is None:
        mismatch = (decision != nearest).sum().to(torch.float64)
        samples = torch.full((), float(h.shape[0]), dtype=torch.float64, device=h.device)
    else:
        mismatch, samples = ((decision != nearest) & keep).sum().to(torch.float64), keep.sum().to(torch.float64)
    return torch.where(undefined, math.nan, mismatch), samples


def zero_stats(num_classes: int, dim: int, device: torch.device | str | None = None) -> ClassStats:
    """Empty :class:`ClassStats` (float64 zeros) for ``num_classes`` classes of ``dim`` features."""

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    c, d = num_classes, dim
    return ClassStats(zeros(c), zeros(c, d), zeros(c), zeros(d, d), zeros(), zeros(), zeros())


def _check_state(into: ClassStats, num_classes: int, dim: int, device: torch.device) -> None:
    expected = zero_stats(num_classes, dim, "meta")
    for name, have, want in zip(ClassStats._fields, into, expected, strict=True):
        if have.shape != want.shape or have.dtype != torch.float64 or have.device != device:
            raise ValueError(
                f"into.{name} must be a float64 tensor of shape {tuple(want.shape)} on {device} (the features' "
                f"device), got {have.dtype} {tuple(have.shape)} on {have.device}"
            )


def _neural_collapse_update(
    features: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    num_classes: int,
    class_means: Tensor | None = None,
    backend: Backend = "auto",
    ignore_index: int | None = None,
    into: ClassStats | None = None,
) -> ClassStats:
    """Add one batch's statistics into ``into`` in place and return it (fresh zero statistics if ``into`` is None).

    Labels outside ``[0, C)`` are counted (and rejected at compute), not indexed; ``nc4`` is counted only when both
    ``weight`` and reference ``class_means`` are given. Rows labelled ``ignore_index`` (which must lie outside
    ``[0, C)``, e.g. -100 for padding) are left out of everything. No host sync (but see ``_nc4_update``), and no
    temporary of the state's ``C x D`` size: the class sums go straight into ``into.feature_sum`` (a streaming
    metric's state)."""
    _validate(features, labels, weight, bias, num_classes, class_means)
    _check_ignore_index(ignore_index, num_classes)
    if into is None:
        into = zero_stats(num_classes, features.shape[1], features.device)
    _check_state(into, num_classes, features.shape[1], features.device)
    h = features.detach().double()
    valid = (labels >= 0) & (labels < num_classes)
    kept = torch.where(valid[:, None], h, 0.0)
    if weight is not None and class_means is not None:
        kept_rows = None if ignore_index is None else labels != ignore_index
        mismatch, decided = _nc4_update(features, weight, bias, class_means, backend, kept_rows)
        into.nc4_mismatch.add_(mismatch)
        into.nc4_count.add_(decided)
    add_class_sums(into, features, labels, backend, kept)
    n_invalid = (~valid).sum()
    if ignore_index is not None:
        n_invalid = n_invalid - (labels == ignore_index).sum()
    into.n_invalid.add_(n_invalid)
    into.gram.add_(kept.T @ kept)  # D x D; rows left out are zero on both sides (NaN padding adds nothing)
    return into


def add_class_sums(
    into: ClassStats, features: Tensor, labels: Tensor, backend: Backend = "auto", kept: Tensor | None = None
) -> None:
    """``into.count``, ``into.feature_sum`` and ``into.sq_norm_sum`` += this batch's, in place (labels outside
    ``[0, C)`` add nothing); ``kept``: the float64 features with those rows zeroed, if already at hand. No host sync,
    no ``C x D`` temporary."""
    num_classes = into.count.shape[0]
    valid = (labels >= 0) & (labels < num_classes)
    # index_put_(accumulate=True), not index_add_: the same in-place sums, serial (deterministic) on the CPU and
    # sorted (deterministic) on CUDA; index_add_ into a large CPU state with 2 threads took 75-150 ms at C = 50257,
    # D = 128, N = 2048 on a shared 2-core EPYC against 0.5 ms for index_put_ (1 thread: 0.07 vs 0.14 ms)
    index = (labels.clamp(0, num_classes - 1).long(),)
    into.count.index_put_(index, valid.double(), accumulate=True)  # integer-valued float64 adds: exact in any order
    unsupported = "float64 features are reduced by the torch path only" if features.dtype == torch.float64 else None
    if choose_backend(backend, "class statistics", features, labels, unsupported=unsupported) == "triton":
        from geomon.kernels.class_stats import add_class_sums_triton

        add_class_sums_triton(into.feature_sum, into.sq_norm_sum, features.detach(), labels)
        return
    if kept is None:
        kept = torch.where(valid[:, None], features.detach().double(), 0.0)
    into.feature_sum.index_put_(index, kept, accumulate=True)
    into.sq_norm_sum.index_put_(index, (kept * kept).sum(dim=1), accumulate=True)


def means_from_stats(stats: ClassStats) -> Tensor:
    """``[C, D]`` class means, NaN rows for classes without samples (the form ``class_means=`` takes)."""
    return stats.feature_sum / stats.count[:, None]  # 0/0 = NaN for unseen classes


def _neural_collapse_compute(
    stats: ClassStats, weight: Tensor | None = None, *, cdnv_exponent: float = 2.0
) -> dict[str, Tensor]:
    """Every neural-collapse statistic from accumulated :class:`ClassStats` (float64 scalars)."""
    device = stats.count.device
    keys = STATISTICS + (HEAD_STATISTICS if weight is not None else ())
    n_invalid = int(stats.n_invalid.item())
    if n_invalid:
        raise ValueError(f"{n_invalid} labels were outside [0, num_classes = {stats.count.shape[0]})")
    seen = stats.count > 0
    n_seen = int(seen.sum().item())
    reason = f"only {n_seen} class(es) have samples" if n_seen < 2 else _sums_problem(stats)
    if reason is not None:
        warn(f"neural_collapse needs at least 2 classes with finite features: {reason}; returning NaN")
        return {key: nan(device) for key in keys}
    counts = stats.count[seen]
    sums = stats.feature_sum[seen]
    means = sums / counts[:, None]
    centred = means - means.mean(dim=0)
    sigma_w = (stats.gram - sums.T @ means) / counts.sum()
    sigma_b = centred.T @ centred / n_seen
    norms = centred.norm(dim=1)
    variances = (stats.sq_norm_sum[seen] / counts - (means * means).sum(dim=1)).clamp(min=0)
    # the scale of each class's mean for the coincidence test: the rounding of the pair distances, computed from
    # the centred means, grows with |μ_c - μ_G|², and that of the means themselves with |μ_c|²
    sq_means = (means * means).sum(dim=1)
    scales = sq_means + (centred * centred).sum(dim=1)
    # a mean at the global mean has no direction: |μ_c - μ_G|² at the rounding level of μ_c - μ_G, where μ_G (a mean
    # over every class) rounds at the scale of the mean |μ_c'|², not of this class's own (maybe tiny) |μ_c|²
    has_direction = norms**2 > COINCIDENT * (sq_means + sq_means.mean())
    pairs = pair_sums(centred, variances, cdnv_exponent, scales, has_direction)
    n_ordered = n_seen * (n_seen - 1)
    n_means_apart, n_directions_apart = int(pairs.n_means_apart.item()), int(pairs.n_directions_apart.item())
    if n_means_apart < n_ordered or n_directions_apart < n_ordered:
        warn(  # one fixed text, so that the warnings filter shows it once rather than on every step
            "neural_collapse: some pairs of classes have coinciding means (an infinite CDNV) or mean directions (a "
            "mean at the global mean, or two on one ray from it); cdnv and gnc2_* are averaged over the other pairs, "
            "coincident_pairs reports the share of pairs whose means coincide, and a mean at the global mean (to "
            "rounding) has no direction: nc2_equiangular, nc2_maxangle and, with a weight, nc3_cos_mean and unc3 "
            "read NaN"
        )
    g_shift_mean = _mean_or_nan(pairs.log_inv_dist_shifted, n_directions_apart)
    out = {
        "nc1": torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / n_seen,
        "nc2_equinorm": norms.std() / norms.mean(),
        "nc2_equiangular": _unbiased_variance(pairs.cos_shifted, pairs.cos_shifted_sq, n_ordered).sqrt(),
        "nc2_maxangle": pairs.cos_shifted_abs / n_ordered,
        "cdnv": _mean_or_nan(pairs.cdnv, n_means_apart),
        "gnc2_mean": g_shift_mean - 0.5 * torch.log(torch.tensor(2 * n_seen / (n_seen - 1), dtype=torch.float64)),
        "gnc2_var": _unbiased_variance(
            pairs.log_inv_dist_shifted / 2, pairs.log_inv_dist_shifted_sq / 2, n_directions_apart // 2
        ),
        "coincident_pairs": 1.0 - pairs.n_means_apart / n_ordered,
    }
    if weight is not None:
        w = weight.detach().double()[seen]
        out["nc3"] = ((w / w.norm() - centred / centred.norm()) ** 2).sum()
        cos = torch.where(has_direction, (w * centred).sum(dim=1) / (w.norm(dim=1) * norms), math.nan)
        out["nc3_cos_mean"] = cos.mean()
        out["unc3"] = cos.std() / cos.mean()
        out["nc4"] = stats.nc4_mismatch / stats.nc4_count if bool(stats.nc4_count > 0) else nan(device)
    return out


def _sums_problem(stats: ClassStats) -> str | None:
    """Why the sums give no statistics (non-finite features, or finite ones whose float64 squares overflow or
    underflow), or None when they are usable. Host syncs: the logging step only."""
    if not bool(stats.feature_sum.isfinite().all()):
        return "the features contain NaN or Inf (or finite values whose float64 sum overflows)"
    if not (bool(stats.sq_norm_sum.isfinite().all()) and bool(stats.gram.isfinite().all())):
        return (
            "the features are finite, but their float64 squares overflow (values of magnitude above about 1e154 / "
            f"sqrt(N)); {STREAMING_NOTE}"
        )
    top = stats.gram.diagonal().amax()
    if bool(top < GRAM_UNDERFLOW) and bool((top > 0) | (stats.feature_sum != 0).any()):
        return (
            "the features are non-zero but their float64 squares underflow (every feature's sum of squares is below "
            f"2^-960: values of magnitude below about 1e-145 / sqrt(N)); {STREAMING_NOTE}"
        )
    return None


def _mean_or_nan(total: Tensor, n: int) -> Tensor:
    return total / n if n else nan(total.device)


def _unbiased_variance(total: Tensor, total_sq: Tensor, n: int) -> Tensor:
    if n < 2:
        return nan(total.device)
    return ((total_sq - total * total / n) / (n - 1)).clamp(min=0)


def neural_collapse(
    features: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    num_classes: int | None = None,
    class_means: Tensor | None = None,
    cdnv_exponent: float = 2.0,
    backend: Backend = "auto",
    ignore_index: int | None = None,
) -> dict[str, Tensor]:
    """Neural-collapse statistics NC1-NC4 and their large-vocabulary forms, as METRICS.md defines them.

    Args:
        features: penultimate features ``[N, D]`` (the input of the classifier head).
        labels: integer class labels ``[N]`` in ``[0, num_classes)`` (or ``ignore_index``).
        weight: classifier weight ``[C, D]``; enables ``nc3``, ``nc3_cos_mean``, ``unc3`` and ``nc4``.
        bias: classifier bias ``[C]`` (used by ``nc4``'s classifier decision).
        num_classes: ``C``; default ``weight.shape[0]``, else the largest label other than ``ignore_index``, plus 1.
        class_means: ``[C, D]`` means for ``nc4``'s nearest-centre search (NaN rows = unknown classes); default
            the means of these features.
        cdnv_exponent: power of the distance in CDNV's denominator (2: Galanti et al.; 4: Linguistic Collapse code).
        backend: class statistics and ``nc4`` decisions by ``"torch"``, ``"triton"`` kernels, or ``"auto"``.
        ignore_index: rows with this label (an integer outside ``[0, num_classes)``, e.g. -100 for padding) are
            left out of every statistic, ``nc4`` included, as in :class:`geomon.metrics.NeuralCollapse`.

    Returns:
        ``nc1, nc2_equinorm, nc2_equiangular, nc2_maxangle, cdnv, gnc2_mean, gnc2_var, coincident_pairs`` and,
        with ``weight``, ``nc3, nc3_cos_mean, unc3, nc4``; float64 scalars, NaN (with a warning) when fewer than 2
        classes are seen. Pairs of classes whose means coincide (to float64 rounding, e.g. two next tokens seen only
        after the same prefix) have an infinite CDNV: ``cdnv`` and ``gnc2_*`` average over the other pairs (with a
        warning) and ``coincident_pairs`` is the share of such pairs (0 when all means are apart). Float64 features
        of extreme magnitude are rescaled by a power of two first (exact), so their squares neither overflow nor
        underflow; ``cdnv`` is scaled back for an exponent other than 2.

    Example:
        >>> import torch
        >>> means = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> stats = neural_collapse(means[labels], labels, weight=means)
        >>> float(stats["nc1"]), float(stats["nc3"]), float(stats["nc4"])
        (0.0, 0.0, 0.0)
    """
    _check_ignore_index(ignore_index)
    _check_cdnv_exponent(cdnv_exponent)
    if num_classes is None:
        if weight is not None and isinstance(weight, Tensor) and weight.ndim == 2:
            num_classes = weight.shape[0]
        else:
            check_int_tensor(labels, "labels", "[N]")
            counted = labels if ignore_index is None else labels[labels != ignore_index]
            num_classes = int(counted.max().item()) + 1 if counted.numel() else 1
    _validate(features, labels, weight, bias, num_classes, class_means)
    scaled, exponent = rescale_extreme(features)  # exact and scale-invariant but for cdnv (undone below) and nc4
    stats = _neural_collapse_update(scaled, labels, num_classes=num_classes, backend=backend, ignore_index=ignore_index)
    n_invalid = int(stats.n_invalid.item())
    if n_invalid:
        valid = labels if ignore_index is None else labels[labels != ignore_index]
        low, high = int(valid.min().item()), int(valid.max().item())
        raise ValueError(f"{n_invalid} labels are outside [0, num_classes = {num_classes}) (labels span {low}..{high})")
    if weight is not None:  # the classifier decides on the features as given, the centres in the rescaled units
        means = class_means
        if class_means is None:
            means = means_from_stats(stats)
        elif exponent:
            means = scale_by_power_of_two(class_means.double(), -exponent)
        keep = None if ignore_index is None else labels != ignore_index
        mismatch, decided = _nc4_update(features, weight, bias, means, backend, keep, centre_features=scaled)
        stats = stats._replace(nc4_mismatch=mismatch, nc4_count=decided)
    out = _neural_collapse_compute(stats, weight, cdnv_exponent=cdnv_exponent)
    if exponent and cdnv_exponent != 2:  # V_c scales as 2^(2e), the distance term as 2^(p·e)
        factor = torch.tensor(exponent * (2.0 - cdnv_exponent), dtype=torch.float64, device=out["cdnv"].device)
        out["cdnv"] = out["cdnv"] * torch.exp2(factor)
    return out


def _check_cdnv_exponent(cdnv_exponent: object) -> None:
    """The CDNV exponent is a finite number > 0 (2: Galanti et al., 4: the Linguistic Collapse code)."""
    value = check_number(cdnv_exponent, "cdnv_exponent", "a number > 0 (2 or 4)")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"cdnv_exponent must be a finite number > 0 (2 or 4), got {cdnv_exponent!r}")


def _check_ignore_index(ignore_index: object, num_classes: int | None = None) -> None:
    """``ignore_index`` must be None or an integer outside ``[0, num_classes)``."""
    if ignore_index is None:
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an integer label or None, got {type(ignore_index).__name__}")
    if num_classes is not None and 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index must lie outside [0, num_classes = {num_classes}), got {ignore_index}")
