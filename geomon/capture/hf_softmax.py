"""Hugging Face attention written by hand whose softmax scores are read with a layout known by class.

Attention read at its own softmax (:mod:`geomon.capture.softmax`) is placed by its shape: the one dimension with the
module's head count holds the heads, and a call takes one softmax. Two families break that, and their classes say
what the shape cannot (:class:`~geomon.capture._session.SoftmaxStream`, one per softmax of a call, in order):

- LongT5's local and transient-global attention (``LongT5LocalAttention``, ``LongT5TransientGlobalAttention``) score
  ``[B, blocks, H, L, 3L]`` and ``[B, blocks, H, L, 3L + G]`` (``G`` global-block keys after the three local blocks):
  the heads are at dimension 2 (its ``einsum("...qhd,...khd->...hqk")``), which the shape cannot tell from the blocks
  when an input has as many blocks as heads. Its rows are read over every key its softmax normalises, global keys
  included. A padded token's row (every local key masked) may still see a global key (those of blocks holding no
  token), and so may the rows of the last block's padding past the sequence (their global bias is the zero padding
  of ``_split_into_blocks``): a row counts only when a key of its three local blocks is allowed, which every token
  has (itself).
- ProphetNet's n-gram self-attention (``ProphetNetNgramSelfAttention``, the decoder's) takes two softmaxes per call:
  the main stream ``[B, H, T, T]`` over its causal keys, then the ``ngram`` predicting streams at once,
  ``[B, ngram, H, T, 2T]`` over the main keys and their own. The main stream is reported under the module's name, its
  padded rows left out by the padding rule (a key no row may attend to); the predicting streams under
  ``<module>.ngram``, pooled as the module takes them and returns them (``ngram_attentions``: one tensor), with the
  main stream's padded positions left out of each stream (a padded position's predicting row still sees its own
  predicting key). One series for the streams keeps one extra series per layer whatever ``ngram`` is, as
  Longformer's ``<module>.global``.

Read at the softmax rather than recomputed from Q/K at the module's exit (as :mod:`geomon.capture.hf_longformer`
does): the scores each softmax takes already hold every term, exactly (ProphetNet's relative position embeddings
gathered by buckets its decoder computes, its n-gram mask built from ``max_target_positions``; LongT5's local and
global position biases, its global aggregates and their layer norm), where a recomputation would copy that code
from transformers, with each release's changes, and pay for the projections again. Only the layout comes from here.
"""

from __future__ import annotations

import sys

from torch import nn

from geomon.capture._session import SoftmaxStream

_LONGT5 = "transformers.models.longt5.modeling_longt5"
_LOCAL_BLOCKS = (SoftmaxStream("", 2, local_blocks=3),)  # [B, blocks, H, L, 3L (+ G)]

#: softmaxes of one call, in order, by (module path, class name): see the module
_LISTED = {
    (_LONGT5, "LongT5LocalAttention"): _LOCAL_BLOCKS,
    (_LONGT5, "LongT5TransientGlobalAttention"): _LOCAL_BLOCKS,
    ("transformers.models.prophetnet.modeling_prophetnet", "ProphetNetNgramSelfAttention"): (
        SoftmaxStream("", 1),  # main stream [B, H, T, T]
        SoftmaxStream(".ngram", 2, main_rows=True),  # predicting streams [B, ngram, H, T, 2T]
    ),
}


def streams_for(module: nn.Module) -> tuple[SoftmaxStream, ...] | None:
    """The softmaxes a call of ``module`` takes, if its class is listed (see the module); transformers is never
    imported here.

    Example:
        >>> from torch import nn
        >>> streams_for(nn.Linear(2, 2)) is None
        True
    """
    for (path, name), streams in _LISTED.items():
        cls = getattr(sys.modules.get(path), name, None)
        if cls is not None and isinstance(module, cls):
            return streams
    return None
