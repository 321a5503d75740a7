"""``embedding_modules`` on modules whose output is not a bare tensor: a mapping or Hugging Face ``ModelOutput`` is
read at its ``last_hidden_state``, a list like a tuple (its first element); an output without such a tensor is named
in one warning instead of being skipped in silence. Values are checked against a float64 numpy RankMe."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from geomon import Monitor
from geomon.functional import GeomonWarning
from tests.reference import ref_rankme

D = 6


class Encoder(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.proj, self.wrap = nn.Linear(D, D), wrap

    def forward(self, x):
        h = self.proj(x)
        return self.wrap(h)


class Model(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.encoder = Encoder(wrap)

    def forward(self, x):
        return self.encoder(x)


def _model_output(h):
    transformers = pytest.importorskip("transformers")
    return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=h)


WRAPS = {
    "dict": lambda h: {"pooled": h.mean(1), "last_hidden_state": h},
    "list": lambda h: [h, h.mean(1)],
    "ModelOutput": _model_output,
}


@pytest.mark.parametrize("kind", sorted(WRAPS))
def test_the_hidden_state_of_a_structured_output_is_measured(kind):
    torch.manual_seed(0)
    model = Model(WRAPS[kind])
    x = torch.randn(3, 10, D)
    monitor = Monitor(every_n_steps=1, head=None, attention=False, embedding_modules=["encoder"], strict=True)
    monitor.attach(model)
    with torch.no_grad(), monitor.step(0):
        model(x)
    values = monitor.compute()
    rows = model.encoder.proj(x).detach().double().reshape(-1, D).numpy()
    assert float(values["geomon/rankme/encoder"]) == pytest.approx(ref_rankme(rows), rel=1e-6)
    assert float(values["geomon/rankme_cov/encoder"]) == pytest.approx(ref_rankme(rows, centered=True), rel=1e-6)


def test_an_output_without_embeddings_is_named_once():
    model = Model(lambda h: {"loss": h.sum()})
    monitor = Monitor(every_n_steps=1, head=None, attention=False, embedding_modules=["encoder"]).attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            with torch.no_grad(), monitor.step(step):
                model(torch.randn(2, 4, D))
            assert not [key for key in monitor.compute() if key.endswith("/encoder")]
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning) and "'encoder'" in str(w.message)]
    assert len(said) == 1, said
    assert "returned dict" in said[0] and "last_hidden_state" in said[0]


def test_the_nested_tensors_of_the_transformer_encoder_fast_path_give_their_real_tokens():
    """In eval under ``no_grad`` with a key padding mask, ``nn.TransformerEncoder`` packs the batch into a nested
    tensor (padding dropped) between its layers; a layer's output then holds the real tokens only, and so must the
    window. Reference: the same layer on the padded batch through the ordinary path, at the real tokens."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D * 2, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 7, D * 2)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:], pad[1, 2:] = True, True
    monitor = Monitor(
        every_n_steps=1, head=None, attention=False, embedding_modules=["layers.0"], window_rows=8, strict=True
    )
    monitor.attach(model)
    with torch.no_grad(), monitor.step(0):
        model(x, src_key_padding_mask=pad)
    values = monitor.compute()
    with torch.no_grad():  # the ordinary path: a hook on the layer itself turns the fast path off
        seen = []
        handle = model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
        model.train()(x, src_key_padding_mask=pad)
        handle.remove()
    rows = seen[0][~pad].double().numpy()
    assert rows.shape == (3 * 7 - 2 - 5, D * 2)
    assert float(values["geomon/rankme/layers.0"]) == pytest.approx(ref_rankme(rows), rel=1e-4)
