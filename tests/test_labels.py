"""Labels by model kind: the rows neural collapse receives carry the targets the model's own loss uses.

The check is independent of geomon's rule: for each Hugging Face model (built from a small config, no download)
wrapped in a LightningModule, the test records the head-input rows and labels that reach the neural-collapse probe
during a fit, sends the rows through the model's head and recomputes the cross-entropy with those labels
(``ignore_index=-100``); it must equal the loss the model itself returned for that batch. The other alignment
(shifted for an unshifted model, unshifted for a causal LM) must not, so the test can fail.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

lightning = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from geomon import GeomonWarning  # noqa: E402
from geomon._tiny_gpt import TinyGPT  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from geomon.labels import default_labels, label_kind  # noqa: E402
from geomon.probes.collapse import CollapseProbe  # noqa: E402

VOCAB, BATCH, SEQ, TARGET = 40, 4, 10, 7


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def bert_mlm() -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)  # fmt: skip
    return transformers.BertForMaskedLM(config)


def t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def bart() -> nn.Module:
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=1,
                                     decoder_start_token_id=2)  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def causal_batch(generator: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[1, 6:] = -100  # padding: no target
    return {"input_ids": ids, "labels": labels}


def masked_batch(generator: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    masked = torch.rand(BATCH, SEQ, generator=generator) < 0.4
    masked[:, 0] = True
    labels = ids.masked_fill(~masked, -100)  # only masked positions are targets
    return {"input_ids": ids.masked_fill(masked, 2), "labels": labels}


def seq2seq_batch(generator: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(3, VOCAB, (BATCH, TARGET), generator=generator)  # the decoder has its own length
    labels[2, 5:] = -100
    return {"input_ids": ids, "labels": labels}


class Lit(lightning.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.losses: list[Tensor] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: lightning.LightningModule, batches: list[Any], tmp_path, monkeypatch, **options: Any):
    """Fit one step per batch, measuring each; returns the callback and the (rows, labels, logits) the probe
    received, the logits being the rows sent through the head's weight of that step."""
    received: list[tuple[Tensor, Tensor, Tensor]] = []
    update = CollapseProbe.update

    def spy(self, features, labels, weight, bias):
        head = F.linear(features.detach(), weight, bias)  # the head as it was at that step
        received.append((features.detach().clone(), labels.clone(), head))
        return update(self, features, labels, weight, bias)

    monkeypatch.setattr(CollapseProbe, "update", spy)
    callback = GeomonCallback(every_n_steps=1, attention=False, neural_collapse=True, media=False, **options)
    trainer = lightning.Trainer(max_steps=len(batches), callbacks=[callback], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu", num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return callback, received


def shift(labels: Tensor) -> Tensor:
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


CASES = {
    "gpt2": (gpt2, causal_batch, "causal", "model.lm_head"),
    "bert-mlm": (bert_mlm, masked_batch, "masked", "model.cls.predictions.decoder"),
    "t5": (t5, seq2seq_batch, "seq2seq", "model.lm_head"),
    "bart": (bart, seq2seq_batch, "seq2seq", "model.lm_head"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_rows_labels_are_the_models_own_loss_targets(case, tmp_path, monkeypatch):
    build, make_batch, kind, head_name = CASES[case]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    module = Lit(build())
    batches = [make_batch(generator) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, received = fit(module, batches, tmp_path, monkeypatch)
    assert callback.monitor.head == head_name and callback.label_kind == kind
    assert not [w for w in caught if "cannot tell whether" in str(w.message)]
    assert isinstance(module.get_submodule(head_name), nn.Linear)
    assert len(received) == len(module.losses) == 2
    for (features, labels, logits), loss, batch in zip(received, module.losses, batches, strict=True):
        assert features.shape[:-1] == batch["labels"].shape  # the decoder's rows for seq2seq, not the encoder's
        logits = logits.float().reshape(-1, VOCAB)
        recomputed = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
        assert float(recomputed) == pytest.approx(float(loss), rel=1e-5)
        other = batch["labels"] if kind == "causal" else shift(batch["labels"])  # the wrong alignment
        wrong = F.cross_entropy(logits, other.reshape(-1), ignore_index=-100)
        assert abs(float(wrong) - float(loss)) > 1e-3


class LitTiny(lightning.LightningModule):
    """A causal LM that is no Hugging Face model: its kind is unknown to geomon."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyGPT(VOCAB, d_model=32, n_layer=1, n_head=2, context=SEQ)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_an_unknown_kind_with_2d_labels_warns_once_and_says_what_it_assumed(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(2)
    batches = [causal_batch(generator) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, received = fit(LitTiny(), batches, tmp_path, monkeypatch)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning) and "cannot tell" in str(w.message)]
    assert len(said) == 1
    assert "shifted as a causal LM" in said[0] and "labels_fn=" in said[0] and repr(callback.monitor.head) in said[0]
    assert callback.label_kind is None and len(received) == 3
    for (_, labels, _), batch in zip(received, batches, strict=True):
        assert torch.equal(labels, shift(batch["labels"]))


def test_labels_fn_replaces_the_rule_without_a_warning(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    batches = [causal_batch(generator) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, received = fit(LitTiny(), batches, tmp_path, monkeypatch, labels_fn=lambda batch: shift(batch["labels"]))
    assert not [w for w in caught if "cannot tell" in str(w.message)]
    assert [labels.tolist() for _, labels, _ in received] == [shift(b["labels"]).tolist() for b in batches]


def test_label_kind_reads_what_transformers_says_about_the_model():
    small = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 16}  # fmt: skip
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    tokens = transformers.BertForTokenClassification(transformers.BertConfig(**small, num_labels=3))
    causal_bert = transformers.BertLMHeadModel(transformers.BertConfig(**small, is_decoder=True))
    assert label_kind(llama) == "causal" and label_kind(causal_bert) == "causal"
    assert label_kind(tokens) == "token" and label_kind(bert_mlm()) == "masked"
    assert label_kind(t5()) == label_kind(bart()) == "seq2seq"
    assert label_kind(transformers.BertModel(transformers.BertConfig(**small))) is None  # no head: no kind
    # XLM's LM head is listed both as causal and as masked LM by transformers (and does not shift): unknown
    xlm = transformers.XLMWithLMHeadModel(transformers.XLMConfig(vocab_size=VOCAB, emb_dim=32, n_layers=1, n_heads=2))
    assert label_kind(xlm) is None
    # wrapped: the model that owns the head decides, not another transformers model beside it
    wrapper = nn.ModuleDict({"teacher": bert_mlm(), "student": gpt2()})
    assert label_kind(wrapper, head="student.lm_head") == "causal"
    assert label_kind(wrapper, head="teacher.cls.predictions.decoder") == "masked"
    assert label_kind(nn.Sequential(nn.Linear(2, 3))) is None


def test_default_labels_by_kind():
    labels = torch.tensor([[5, 6, -100, 7]])
    assert default_labels({"labels": labels}, "causal").tolist() == [[6, -100, 7, -100]]
    assert default_labels({"labels": labels}, None).tolist() == [[6, -100, 7, -100]]  # unknown: as causal
    for kind in ("masked", "seq2seq", "token"):
        assert torch.equal(default_labels({"labels": labels}, kind), labels)
    assert torch.equal(default_labels({"labels": torch.tensor([3, 1])}, "causal"), torch.tensor([3, 1]))  # per sequence
    assert default_labels({"labels": torch.rand(2, 3)}) is None  # soft / regression targets are not classes
