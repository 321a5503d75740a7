"""Labels for neural collapse: one per row of the head's input, decided by what kind of model the head belongs to.

A Hugging Face model takes ``batch["labels"]`` in the layout of its inputs and aligns them itself: a causal LM
shifts them (the row of position ``t`` predicts label ``t + 1``), a masked LM, a token classifier and a
sequence-to-sequence model (whose head reads the decoder's rows) do not. :func:`label_kind` reads the kind from what
``transformers`` says about the model (``config.is_encoder_decoder``, the auto-model mappings, the class name),
never from shapes; :func:`default_labels` aligns the labels accordingly.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from geomon.probes.collapse import IGNORE_INDEX
from geomon.probes.plan import plain_name

LabelKind = Literal["causal", "masked", "seq2seq", "token"]

#: Kinds whose ``labels`` the model shifts itself (geomon shifts them the same way); every other kind is unshifted.
SHIFTED: frozenset[str] = frozenset({"causal"})


def _auto_names() -> tuple[set[str], set[str], set[str]]:
    """Class names of transformers' causal-LM, masked-LM and seq2seq-LM auto mappings (empty if unreadable)."""
    try:
        from transformers.models.auto import modeling_auto as auto  # transformers is imported already
    except Exception:  # pragma: no cover - an unusual transformers build
        return set(), set(), set()

    def names(mapping: str) -> set[str]:
        found: set[str] = set()
        for value in getattr(auto, mapping, {}).values():
            found.update([value] if isinstance(value, str) else value)
        return found

    return (names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"), names("MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
            names("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"))  # fmt: skip


def hf_kind(model: nn.Module) -> LabelKind | None:
    """The kind of a ``transformers`` model, or ``None`` when transformers does not say it.

    ``config.is_encoder_decoder`` means sequence-to-sequence; otherwise the class's place in the auto mappings
    (a class listed both as causal and as masked LM, such as XLM's, is unknown), else its name's suffix
    (``ForCausalLM``, ``ForMaskedLM``, ``ForTokenClassification``).
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True:
        return "seq2seq"
    name = type(model).__name__
    causal, masked, seq2seq = _auto_names()
    if name in seq2seq:
        return "seq2seq"
    if name in causal or name in masked:
        return None if name in causal and name in masked else "causal" if name in causal else "masked"
    if name.endswith("ForCausalLM"):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith("ForTokenClassification"):
        return "token"
    return None


def hf_model(model: nn.Module, head: str | None = None) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the outermost ``transformers.PreTrainedModel`` in ``model`` (``model`` itself
    included, names plain) that contains the module named ``head`` (any, without a head); ``None`` if there is none.
    transformers is never imported here: without it in ``sys.modules`` no module can be one of its models."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if not isinstance(base, type):
        return None
    for name, module in model.named_modules():
        name = plain_name(name)
        if isinstance(module, base) and (head is None or not name or head == name or head.startswith(name + ".")):
            return name, module
    return None


def label_kind(model: nn.Module, head: str | None = None) -> LabelKind | None:
    """The kind of the ``transformers`` model inside ``model`` that owns the output head ``head`` (plain name; any
    transformers model when ``None``): ``"causal"``, ``"masked"``, ``"seq2seq"``, ``"token"``, or ``None`` (no
    transformers model owns the head, or transformers does not say its kind).

    Example:
        >>> label_kind(nn.Linear(2, 3)) is None  # not a transformers model
        True
    """
    found = hf_model(model, head)
    return None if found is None else hf_kind(found[1])


def default_labels(batch: Any, kind: LabelKind | None = "causal") -> Tensor | None:
    """Labels for neural collapse, one per row of the head's input.

    ``batch["labels"]`` (integer) as the model of ``kind`` uses them: a causal LM's are shifted as the model shifts
    them (position ``t`` predicts label ``t + 1``; the last position gets -100), every other kind's are taken as they
    are (a masked LM's, a token classifier's, a seq2seq model's decoder targets; labels of one dimension, one per
    sequence); ``kind=None`` (unknown) is treated as causal - :class:`geomon.GeomonCallback` warns when it does so.
    Else the second element of an ``(inputs, targets)`` tuple as is; ``None`` when the batch has neither, or its
    labels are floating point (regression or soft targets are not classes).

    Example:
        >>> default_labels({"labels": torch.tensor([[5, 6, 7]])})
        tensor([[   6,    7, -100]])
        >>> default_labels({"labels": torch.tensor([[5, 6, 7]])}, kind="masked")
        tensor([[5, 6, 7]])
    """
    if isinstance(batch, Mapping) and isinstance(batch.get("labels"), Tensor):
        labels = batch["labels"]
        if labels.is_floating_point():
            return None
        if labels.ndim < 2 or (kind is not None and kind not in SHIFTED):
            return labels
        padding = torch.full_like(labels[..., :1], IGNORE_INDEX)
        return torch.cat([labels[..., 1:], padding], dim=-1)
    pair = isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor)
    if pair and not batch[1].is_floating_point():
        return batch[1]
    return None


def shifts_unknown(batch: Any, kind: LabelKind | None) -> bool:
    """Whether :func:`default_labels` assumes a causal shift for ``batch`` without knowing the model's kind."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    return kind is None and isinstance(labels, Tensor) and labels.ndim >= 2 and not labels.is_floating_point()


def labels_of(batch: Any, labels_fn: Any, kind: LabelKind | None, guard: Any, head: str | None) -> Tensor | None:
    """The labels the callbacks give neural collapse: ``labels_fn(batch)`` when the user passed one, else
    :func:`default_labels` by the model's ``kind``, warning once (``guard.warn_once``) when a causal shift is
    assumed without knowing the kind."""
    if labels_fn is not default_labels:
        return labels_fn(batch)
    if shifts_unknown(batch, kind):
        guard.warn_once(
            "label-kind",
            f"geomon: cannot tell whether head {head!r} belongs to a causal LM, so the batch's labels are shifted "
            "as a causal LM shifts them (the row of position t gets label t + 1; the last gets -100). Only a Hugging "
            "Face model says its kind; if your model does not shift its labels (masked LM, token classification, "
            "seq2seq), pass labels_fn=lambda batch: batch['labels'] (any batch -> labels aligned with the head's "
            "input rows)",
        )
    return default_labels(batch, kind)


def default_token_mask(batch: Any, kind: LabelKind | None = None) -> Tensor | None:
    """The token mask of ``batch`` (``[B, N]``, 1 = a real token, 0 = padding) that leaves padding out of RankMe /
    alpha-ReQ: a mapping batch's 2-D ``attention_mask`` (``DataCollatorWithPadding``'s), or, for a
    sequence-to-sequence model (``kind="seq2seq"``), whose head reads the decoder's rows, its
    ``decoder_attention_mask``, else its integer ``labels`` that are not -100 (``DataCollatorForSeq2Seq`` pads them
    so; the encoder's ``attention_mask`` does not describe those rows). ``None`` when the batch has none (a tuple
    batch, an unpadded one).

    Example:
        >>> mask = torch.tensor([[1, 1, 0]])
        >>> default_token_mask({"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": mask}) is mask
        True
        >>> default_token_mask({"attention_mask": mask}, kind="seq2seq") is None
        True
        >>> default_token_mask({"labels": torch.tensor([[5, 6, -100]])}, kind="seq2seq")
        tensor([[ True,  True, False]])
    """
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("decoder_attention_mask" if kind == "seq2seq" else "attention_mask")
    if kind == "seq2seq" and not isinstance(mask, Tensor):  # DataCollatorForSeq2Seq: the targets' -100 padding
        labels = batch.get("labels")  # row t of the decoder predicts labels[t] (its inputs are them shifted right)
        mask = labels != IGNORE_INDEX if isinstance(labels, Tensor) and not labels.is_floating_point() else None
    return mask if isinstance(mask, Tensor) and mask.ndim == 2 else None


def token_mask_rows(kind: LabelKind | None, head: str | None) -> str | None:
    """The probe whose rows the default token mask describes: for a sequence-to-sequence model, the head's input
    alone (its mask is the decoder's: an encoder module's rows are another sequence, even where the lengths agree;
    without a head, no probe's); None (every probe whose rows the mask aligns with) otherwise.

    Example:
        >>> token_mask_rows("seq2seq", "lm_head"), token_mask_rows("causal", "lm_head")
        ('lm_head.input', None)
    """
    if kind != "seq2seq":
        return None
    return "" if head is None else f"{head}.input"


def defaults_for(monitor: Any, model: nn.Module, labels_fn: Any, token_mask_fn: Any) -> LabelKind | None:
    """What the callbacks' default ``labels_fn`` and ``token_mask_fn`` need, read once the monitor is attached: the
    kind of the model owning its head (:func:`label_kind`; None unless one of them is the default), and, on its
    plan, the probe whose rows the default token mask describes (:func:`token_mask_rows`)."""
    kind = None
    if labels_fn is default_labels or token_mask_fn is default_token_mask:
        kind = monitor.guard.run("the model's kind", label_kind, model, monitor.head)
    if token_mask_fn is default_token_mask and monitor.plan is not None:
        monitor.plan.token_mask_rows = token_mask_rows(kind, monitor.head)
    return kind


def token_mask_of(batch: Any, token_mask_fn: Any, kind: LabelKind | None) -> Tensor | None:
    """The token mask the callbacks give the embedding probes: none when ``token_mask_fn`` is ``None``,
    :func:`default_token_mask` by the model's ``kind`` for the default, else ``token_mask_fn(batch)``."""
    if token_mask_fn is None:
        return None
    if token_mask_fn is default_token_mask:
        return default_token_mask(batch, kind)
    return token_mask_fn(batch)
