"""Padding left out of RankMe / alpha-ReQ: with a token mask (a Hugging Face ``attention_mask``), the rows of padding
positions do not enter the embedding windows, so the logged values are those of the real tokens alone, whatever
share of each batch is padding. References: float64 numpy over the real rows (tests/reference.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from geomon import GeomonWarning, Monitor
from geomon.metrics import RankMe
from tests.reference import ref_alpha_req, ref_rankme

VOCAB, WIDTH, BATCH, SEQ = 1024, 128, 16, 48
PROBE = "head.input"
KEYS = {"rankme": f"geomon/rankme/{PROBE}", "cov": f"geomon/rankme_cov/{PROBE}", "alpha": f"geomon/alpha_req/{PROBE}"}


class TokenModel(nn.Module):
    """Token embeddings through a nonlinear layer into a head: a padding token's rows are all the same vector."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(ids)))


def padded_batch(seed: int, padding: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, mask)``: lengths drawn so that about ``padding`` of the positions are padding (id 0)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(BATCH, generator=gen) * 2 * (1 - padding) * SEQ).long().clamp(2, SEQ)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    return torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen) * mask, mask


def head_rows(model: nn.Module) -> list[torch.Tensor]:
    rows: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda module, args, out: rows.append(args[0].detach().reshape(-1, WIDTH)))
    return rows


def measure(token_mask_of=lambda mask: mask, seeds=(0,), window_rows: int = 300, **options):
    """Values of one measured step per seed, and the head's rows and masks of each forward."""
    model = TokenModel()
    rows = head_rows(model)
    monitor = Monitor(every_n_steps=1, attention=False, neural_collapse=False, window_rows=window_rows, alerts=(),
                      strict=True, **options).attach(model)  # fmt: skip
    values, masks = [], []
    for step, seed in enumerate(seeds):
        ids, mask = padded_batch(seed)
        masks.append(mask)
        with monitor.step(step, token_mask=token_mask_of(mask)):
            model(ids)
        values.append(monitor.compute(step))
    return values, rows, masks


def test_monitor_values_equal_float64_references_over_the_real_rows():
    """RankMe, centred RankMe and alpha-ReQ of a padded batch (about half padding) equal the references over the
    real tokens' rows alone, and differ from those over every position (what was logged before)."""
    (values,), (rows,), (mask,) = measure()
    real = rows[mask.reshape(-1).bool()].double().numpy()
    assert 300 <= len(real) < 0.7 * len(rows)
    expected = {"rankme": ref_rankme(real), "cov": ref_rankme(real, centered=True), "alpha": ref_alpha_req(real)[0]}
    for name, key in KEYS.items():
        assert float(values[key]) == pytest.approx(expected[name], rel=1e-9), name
    everything = rows.double().numpy()
    assert abs(ref_rankme(everything, centered=True) - expected["cov"]) > 0.05 * expected["cov"]


def test_bool_and_integer_masks_count_the_same_rows_and_a_window_closes_on_real_rows():
    """A bool mask measures what its 0/1 integer form does; a window of more rows than one step's real tokens (but
    fewer than its positions) stays open and closes on the next step, over the real rows of both."""
    (as_int,), _, _ = measure()
    (as_bool,), _, _ = measure(lambda mask: mask.bool())
    assert as_int == as_bool
    (first, second), rows, masks = measure(seeds=(0, 1), window_rows=BATCH * SEQ * 3 // 4)
    assert KEYS["rankme"] not in first
    real = torch.cat([r[m.reshape(-1).bool()] for r, m in zip(rows, masks, strict=True)]).double().numpy()
    assert float(second[KEYS["rankme"]]) == pytest.approx(ref_rankme(real), rel=1e-9)


def test_an_all_ones_mask_gives_the_values_of_no_mask():
    """Nothing changes without padding: an all-ones mask and no mask log the same values, bit for bit."""
    (unmasked,), _, _ = measure(lambda mask: None)
    (ones,), _, _ = measure(lambda mask: torch.ones_like(mask))
    assert unmasked.keys() == ones.keys() and all(torch.equal(unmasked[k], ones[k]) for k in unmasked)


def test_a_mask_that_cannot_be_aligned_is_said_once_per_probe_and_the_rows_are_measured_whole():
    """Rows that are not ``[B, N, D]`` (here flattened to ``[B·N, D]`` before the head) cannot be masked: they are
    all measured and one warning per probe, naming it, says so, however many steps run."""
    model = TokenModel()
    flat = nn.Flatten(0, 1)
    model.mix.append(flat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(every_n_steps=1, attention=False, neural_collapse=False, window_rows=300, alerts=(),
                          embedding_modules=["mix.2"], strict=True).attach(model)  # fmt: skip
        for step in range(3):
            ids, mask = padded_batch(step)
            with monitor.step(step, token_mask=mask):
                model(ids)
            values = monitor.compute(step)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning) and "token mask" in str(w.message)]
    assert len(said) == 2 and all("padding included" in message for message in said)
    assert sorted(message.split("'")[1] for message in said) == [PROBE, "mix.2"]
    assert "geomon/rankme/mix.2" in values and KEYS["rankme"] in values


class PooledModel(TokenModel):
    """The mean over each sequence's real tokens, one row per sequence, through a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.pooled = nn.Linear(WIDTH, WIDTH)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(self.embed(ids))
        mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(self.pooled(mean))


def test_one_row_per_sequence_is_measured_whole_without_a_word():
    """A pooled embedding ``[B, D]`` has no padding row: with a token mask its rows are all measured and nothing is
    said (its RankMe equals the reference over its rows)."""
    model = PooledModel()
    pooled: list[torch.Tensor] = []
    model.pooled.register_forward_hook(lambda module, args, out: pooled.append(out.detach()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = Monitor(every_n_steps=1, attention=False, neural_collapse=False, window_rows=BATCH, alerts=(),
                          embedding_modules=["pooled"], head=None, strict=True).attach(model)  # fmt: skip
        ids, mask = padded_batch(0)
        with monitor.step(0, token_mask=mask):
            model(ids, mask)
        values = monitor.compute(0)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning) and "token mask" in str(w.message)]
    assert not said, said
    assert float(values["geomon/rankme/pooled"]) == pytest.approx(ref_rankme(pooled[0].double().numpy()), rel=1e-9)


def test_token_mask_boundary_errors():
    """Anything but ``None`` or a 2-D bool / integer tensor is refused at the call, saying what is allowed."""
    model = TokenModel()
    monitor = Monitor(every_n_steps=1, attention=False, alerts=()).attach(model)
    _, mask = padded_batch(0)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        monitor.step(0, token_mask=mask.tolist())
    with pytest.raises(TypeError, match="bool or integer"):
        monitor.step(0, token_mask=mask.float())
    with pytest.raises(ValueError, match=r"2-D, \[B, N\]"):
        monitor.step(0, token_mask=mask.reshape(-1))
    with pytest.raises(TypeError, match="bool or integer"):
        monitor.measure_forward(0, model, padded_batch(0)[0], token_mask=mask.float())
    with pytest.raises(ValueError, match="row_mask"):
        RankMe(4).update(torch.zeros(3, 4), torch.ones(2, dtype=torch.bool))


def test_callbacks_refuse_a_token_mask_fn_that_is_not_callable():
    lightning = pytest.importorskip("lightning.pytorch")  # noqa: F841
    from geomon.callback import GeomonCallback

    with pytest.raises(TypeError, match="token_mask_fn must be callable"):
        GeomonCallback(token_mask_fn="attention_mask")  # type: ignore[arg-type]
    GeomonCallback(token_mask_fn=None)  # None: every position counts


def test_default_token_mask_reads_the_mask_of_the_rows_the_head_reads():
    from geomon.labels import default_token_mask

    mask, decoder = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    batch = {"input_ids": torch.zeros(2, 5), "attention_mask": mask, "decoder_attention_mask": decoder}
    assert default_token_mask(batch) is mask and default_token_mask(batch, "causal") is mask
    assert default_token_mask(batch, "seq2seq") is decoder
    assert default_token_mask((torch.zeros(2, 5), mask)) is None
    assert default_token_mask({"attention_mask": torch.ones(2, 5, 5)}) is None  # a 4-D / 3-D mask is not per token


def test_padding_rows_with_nan_are_left_out():
    """Rows left out are zeroed, not multiplied by 0: a NaN in a padding row does not reach the sums."""
    z = torch.randn(6, 4, dtype=torch.float64)
    z[4:] = float("nan")
    metric = RankMe(4, min_samples=1)
    metric.update(z, torch.tensor([True] * 4 + [False] * 2))
    assert float(metric.n) == 4
    assert float(metric.compute()) == pytest.approx(ref_rankme(z[:4].numpy()), rel=1e-9)
    assert np.isfinite(metric.gram.numpy()).all()


def test_a_seq2seq_decoder_mask_masks_the_head_rows_alone():
    """A sequence-to-sequence model's default mask is the decoder's (here its -100 labels, as
    ``DataCollatorForSeq2Seq`` pads them): it describes the head's rows alone. An encoder module of the same length
    is measured whole, and said once, instead of being masked with the decoder's padding; the head's rows are its
    decoder's real rows. References: float64 over those rows."""
    transformers = pytest.importorskip("transformers")
    from geomon.labels import default_token_mask, label_kind, token_mask_rows

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)
    batch_size, length = 8, 24
    gen = torch.Generator().manual_seed(1)
    source = (torch.arange(length)[None] < torch.randint(4, length + 1, (batch_size,), generator=gen)[:, None]).long()
    target = torch.arange(length)[None] < torch.randint(2, 10, (batch_size,), generator=gen)[:, None]
    ids = torch.randint(1, 64, (batch_size, length), generator=gen) * source
    labels = torch.randint(1, 64, (batch_size, length), generator=gen).masked_fill(~target, -100)
    batch = {"input_ids": ids, "attention_mask": source, "labels": labels}
    kind = label_kind(model, "lm_head")
    assert kind == "seq2seq" and torch.equal(default_token_mask(batch, kind), target)
    encoder_rows, head_rows_seen = [], []
    model.encoder.register_forward_hook(lambda m, a, out: encoder_rows.append(out.last_hidden_state.detach()))
    model.lm_head.register_forward_hook(lambda m, args, out: head_rows_seen.append(args[0].detach()))
    monitor = Monitor(every_n_steps=1, attention=False, neural_collapse=False, alerts=(), window_rows=8,
                      embedding_modules=["encoder"], strict=True).attach(model)  # fmt: skip
    monitor.plan.token_mask_rows = token_mask_rows(kind, monitor.head)  # what both callbacks set
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor.step(0, token_mask=default_token_mask(batch, kind)):
            model(**batch)
        values = monitor.compute(0)
    said = [str(w.message) for w in caught if issubclass(w.category, GeomonWarning) and "token mask" in str(w.message)]
    assert len(said) == 1 and "'encoder'" in said[0] and "padding included" in said[0]
    everything = encoder_rows[0].reshape(-1, 32).double().numpy()
    assert float(values["geomon/rankme/encoder"]) == pytest.approx(ref_rankme(everything), rel=1e-9)
    decoder_real = head_rows_seen[0][target].double().numpy()
    assert float(values["geomon/rankme/lm_head.input"]) == pytest.approx(ref_rankme(decoder_real), rel=1e-9)


def test_the_fill_schedule_plans_on_the_real_rows_once_a_window_has_closed():
    """At 60% padding a window of one step's positions needs 2.5 steps of real rows: the first window takes longer
    (the schedule has only positions to go by), and once it has closed the schedule plans on its real rows' share,
    so every later period fills its window (before: one value every two to three periods)."""
    batch, length, width = 8, 32, 64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, width), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 100))
    monitor = Monitor(every_n_steps=10, attention=False, neural_collapse=False, alerts=(), head="3", strict=True)
    monitor.attach(model)
    mask = (torch.arange(length)[None] < round(length * 0.4)).long().expand(batch, length).contiguous()
    logged = []
    for step in range(200):
        with monitor.step(step, token_mask=mask):
            model(torch.randint(1, 100, (batch, length)))
        if monitor.is_scheduled(step) and monitor.compute(step):
            logged.append(step)
    assert logged[0] > 0 and logged == list(range(logged[0], 200, 10))
    assert logged[0] <= 20
