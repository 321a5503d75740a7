"""``head="auto"`` on models that name their head neither ``lm_head`` nor by ``get_output_embeddings()``: Lightning's
demo Transformer (``decoder``) and x-transformers (``to_logits``) are found by their vocabulary projection, and their
head input feeds RankMe and neural collapse in a plain loop (RankMe checked against a float64 SVD of the rows the test
records itself). A model where nothing is found says so once, at attach.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomon import GeomonWarning, Monitor
from geomon.capture.modules import find_head
from tests.reference import ref_rankme

VOCAB, DIM, BATCH, SEQ = 40, 32, 4, 16  # one batch is B x T = 64 rows >= D: a window per step


def lightning_demo() -> nn.Module:
    demos = pytest.importorskip("lightning.pytorch.demos")
    return demos.Transformer(vocab_size=VOCAB, ninp=DIM, nhead=2, nhid=64, nlayers=1)


def x_transformer() -> nn.Module:
    x_transformers = pytest.importorskip("x_transformers")
    return x_transformers.TransformerWrapper(num_tokens=VOCAB, max_seq_len=SEQ,
                                             attn_layers=x_transformers.Decoder(dim=DIM, depth=1, heads=2))  # fmt: skip


def demo_logits(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model(x, y).view(BATCH, SEQ, VOCAB)  # log-probabilities of the target positions


CASES = {
    "lightning-demo": (lightning_demo, "decoder", demo_logits),
    "x-transformers": (x_transformer, "to_logits", lambda model, x, y: model(x)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auto_finds_the_vocabulary_projection_and_feeds_rankme_and_neural_collapse(case):
    build, head, forward = CASES[case]
    torch.manual_seed(0)
    model = build()
    assert find_head(model, "auto") == head
    monitor = Monitor(every_n_steps=1, attention=False, window_rows=BATCH * SEQ, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.attach(model)
    assert monitor.head == head and not [w for w in caught if "found no output head" in str(w.message)]
    rows: list[Tensor] = []
    handle = model.get_submodule(head).register_forward_hook(lambda m, i, o: rows.append(i[0].detach().clone()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(2))
        with monitor.step(step, labels=y):
            logits = forward(model, x, y)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values = monitor.compute(step)
        features = rows[-1].reshape(-1, DIM).double().numpy()
        assert float(values[f"geomon/rankme/{head}.input"]) == pytest.approx(ref_rankme(features), rel=1e-5)
        nc1 = values[f"geomon/nc/nc1/{head}.input"]
        assert bool(torch.isfinite(nc1)) and float(nc1) > 0
    handle.remove()
    assert len(rows) == 3 and np.isfinite(features).all()


class NoHead(nn.Module):
    """An encoder with no output projection: its last linear layer is square and there is no embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, DIM)
        self.mix = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(torch.relu(self.proj_in(x)))


def test_no_head_found_warns_once_at_attach_with_what_to_pass():
    monitor = Monitor(every_n_steps=1, attention=False)
    with pytest.warns(GeomonWarning, match="found no output head") as record:
        monitor.attach(NoHead())
    (message,) = [str(w.message) for w in record if "output head" in str(w.message)]
    assert "get_output_embeddings" in message and "lm_head" in message and "nn.Embedding" in message
    assert "head='<module name>'" in message and "proj_in, mix" in message and "head=None" in message
    planned = monitor.plan.keys()  # every key the plan can log
    assert monitor.head is None and not [key for key in planned if "rankme" in key or "/nc/" in key]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeomonWarning)
        Monitor(attention=False, head=None).attach(NoHead())  # head=None: nothing is looked for, nothing said
        Monitor(attention=False).attach(nn.Sequential(nn.ReLU()))  # no linear layer: no head to miss
        monitor = Monitor(attention=False, head="mix").attach(NoHead())  # named: found
    assert monitor.head == "mix"


def test_the_vocabulary_rule_takes_only_the_last_layer_and_not_a_square_one():
    emb = nn.Embedding(DIM, DIM)  # a position table as wide as the model: its rows count is not a vocabulary
    assert find_head(nn.Sequential(emb, nn.Linear(DIM, 64), nn.Linear(64, DIM)), "auto") == "2"
    assert find_head(nn.Sequential(emb, nn.Linear(64, DIM), nn.Linear(DIM, DIM)), "auto") is None  # square
    assert (
        find_head(nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB), nn.Linear(VOCAB, 3)), "auto") is None
    )
    # a named head still wins over the vocabulary rule (today's detections are kept)
    named = nn.ModuleDict(
        {"emb": nn.Embedding(VOCAB, DIM), "classifier": nn.Linear(DIM, 3), "tail": nn.Linear(DIM, VOCAB)}
    )
    assert find_head(named, "auto") == "classifier"


TORCHVISION_HEADS = {"mobilenet_v3_small": "classifier.3", "convnext_tiny": "classifier.2", "vgg11": "classifier.6",
                     "efficientnet_b0": "classifier.1", "alexnet": "classifier.6"}  # fmt: skip


@pytest.mark.parametrize("name", list(TORCHVISION_HEADS))
def test_a_torchvision_classifier_sequential_gives_its_last_linear_layer(name):
    """torchvision's classifiers end in ``classifier = nn.Sequential(..., nn.Linear)``: that last layer is the head
    (no head was found before)."""
    torchvision = pytest.importorskip("torchvision")
    assert find_head(getattr(torchvision.models, name)(num_classes=10), "auto") == TORCHVISION_HEADS[name]


def test_rankme_of_a_torchvision_classifier_reads_the_rows_entering_its_last_linear_layer():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    head = TORCHVISION_HEADS["mobilenet_v3_small"]
    monitor = Monitor(every_n_steps=1, attention=False, neural_collapse=False, window_rows=8, strict=True).attach(model)
    rows: list[Tensor] = []
    model.get_submodule(head).register_forward_hook(lambda m, i, o: rows.append(i[0].detach().clone()))
    with monitor.step(0):
        model(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    value = float(monitor.compute(0)[f"geomon/rankme/{head}.input"])
    assert value == pytest.approx(ref_rankme(rows[0].double().numpy()), rel=1e-5)


def test_a_sequential_named_like_a_head_counts_only_when_its_linear_layer_ends_it():
    inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=-1))  # not the last child
    model = nn.Sequential()
    model.add_module("classifier", inner)
    assert find_head(model, "auto") is None
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))  # not named like a head
    assert find_head(model, "auto") is None
