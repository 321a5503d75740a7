"""Hugging Face ``model.gradient_checkpointing_enable()`` (reentrant or not) under a :class:`geomon.Monitor` in a
plain loop and under ``GeomonCallback`` in a Lightning fit: training is bit-identical to the same run without
geomon, every attention layer is measured once per step (autograd's recomputation of each checkpointed layer in
backward adds nothing: the rows counted equal the batch's real query rows), and the values equal the entropies and
max logits of the model's own attention probabilities (``output_attentions=True`` on an eager float64 copy with the
step's weights). A reentrant checkpoint runs the layers' first forward under ``no_grad``, a non-reentrant one under
saved-tensor hooks: both are covered.
"""

from __future__ import annotations

import copy

import pytest
import torch

from geomon import Monitor

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, HEADS, STEPS = 64, 12, 3, 4, 2
TOL = 1e-6  # float32 model activations against the float64 copy's probabilities


def _config(family: str):
    common = {"vocab_size": VOCAB, "initializer_range": 0.3}  # attention far from uniform
    if family == "gpt2":
        return transformers.GPT2LMHeadModel, transformers.GPT2Config(
            n_positions=32, n_embd=32, n_layer=2, n_head=HEADS, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if family == "llama":  # rotary, grouped-query heads (4 query heads read 2 key heads)
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
            num_key_value_heads=2, max_position_embeddings=32, **common,
        )  # fmt: skip
    return transformers.BertForMaskedLM, transformers.BertConfig(  # bidirectional, padded query rows left out
        hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=32, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **common,
    )  # fmt: skip


def _model(family: str, implementation: str, reentrant: bool | None):
    cls, config = _config(family)
    torch.manual_seed(0)
    model = cls(config)
    model.set_attn_implementation(implementation)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.train()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=generator)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, 8:] = 0  # right padding: 4 query rows of sequence 1 are not measured
        out.append((ids, mask))
    return out


def _attention_modules(family: str) -> list[str]:
    return {
        "gpt2": [f"transformer.h.{i}.attn" for i in range(2)],
        "llama": [f"model.layers.{i}.self_attn" for i in range(2)],
        "bert": [f"bert.encoder.layer.{i}.attention.self" for i in range(2)],
    }[family]


def _reference(model, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Mean entropy over the real query rows, per layer, of the model's own probabilities: an eager float64 copy
    with the same weights, ``output_attentions=True``."""
    reference = copy.deepcopy(model).double().eval()
    reference.gradient_checkpointing_disable()
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = reference(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()[:, None, :]
    return [float((-torch.special.xlogy(p, p).sum(-1))[real.expand(p.shape[:3])].mean()) for p in attentions]


def _train(family: str, implementation: str, reentrant: bool | None, watch: bool):
    model = _model(family, implementation, reentrant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = None
    if watch:
        monitor = Monitor(every_n_steps=1, head=None, alerts=(), query_rows=None, strict=True).attach(model)
    losses, measured = [], []
    for step, (ids, mask) in enumerate(_batches()):
        expected = _reference(model, ids, mask) if watch else None
        with monitor.step(step) if monitor is not None else torch.enable_grad():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()  # inside the block, as in a Lightning step: the recomputation runs while armed
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        if monitor is not None:
            layers = _attention_modules(family)
            counts = [monitor.plan.probes[f"attention:{name}"].metric.count.clone() for name in layers]
            values = monitor.compute(step)
            measured.append((counts, [float(values[f"geomon/attention/entropy/{name}"]) for name in layers], expected))
    return losses, [p.detach().clone() for p in model.parameters()], measured


@pytest.mark.parametrize(
    ("family", "implementation", "reentrant"),
    [("gpt2", "sdpa", True), ("gpt2", "eager", False), ("llama", "eager", True), ("bert", "sdpa", False)],
)
def test_checkpointed_training_is_unchanged_and_each_layer_measured_once(family, implementation, reentrant):
    plain = _train(family, implementation, reentrant, watch=False)
    watched = _train(family, implementation, reentrant, watch=True)
    assert all(torch.equal(a, b) for a, b in zip(plain[0], watched[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain[1], watched[1], strict=True))
    real_rows = BATCH * SEQ - 4
    for counts, entropies, expected in watched[2]:
        for count in counts:  # once: the recomputation in backward would double every head's rows
            assert count.tolist() == [real_rows] * HEADS
        assert entropies == pytest.approx(expected, rel=TOL, abs=TOL)


def test_lightning_fit_with_checkpointing_is_unchanged_and_logs_each_layer_once(tmp_path):
    """The same under ``GeomonCallback`` in a Lightning fit (reentrant checkpointing, the classic default): the
    callback keeps the capture armed through ``training_step``'s backward, where autograd recomputes each layer."""
    lightning = pytest.importorskip("lightning.pytorch")
    from geomon.callback import GeomonCallback

    layers = [f"model.{name}" for name in _attention_modules("gpt2")]

    class Lit(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model("gpt2", "sdpa", reentrant=True)
            self.losses: list[torch.Tensor] = []
            self.expected: dict[int, list[float]] = {}

        def on_train_batch_start(self, batch, batch_idx):  # the step's weights, before its forward
            self.expected[self.global_step] = _reference(self.model, *batch)

        def training_step(self, batch, batch_idx):
            ids, mask = batch
            loss = self.model(input_ids=ids, attention_mask=mask, labels=ids).loss
            self.losses.append(loss.detach())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def fit(callbacks):
        torch.manual_seed(0)
        module = Lit()
        trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, callbacks=callbacks,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False)  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(_batches(), batch_size=None))
        return module

    callback = GeomonCallback(every_n_steps=1, head=None, alerts=(), query_rows=None, media=False, strict=True)
    logged: dict[int, tuple[list, list[float]]] = {}
    compute = callback.monitor.compute

    def spy(step=None, **kwargs):
        counts = [callback.monitor.plan.probes[f"attention:{name}"].metric.count.tolist() for name in layers]
        values = compute(step, **kwargs)
        logged[step] = (counts, [float(values[f"geomon/attention/entropy/{name}"]) for name in layers])
        return values

    callback.monitor.compute = spy
    plain, watched = fit([]), fit([callback])
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, watched.losses, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters(), strict=True))
    assert sorted(logged) == list(range(STEPS))
    for step, (counts, entropies) in logged.items():
        assert counts == [[BATCH * SEQ - 4] * HEADS] * len(layers)
        assert entropies == pytest.approx(watched.expected[step], rel=TOL, abs=TOL)
