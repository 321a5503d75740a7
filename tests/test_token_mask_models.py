"""End to end on a tiny Hugging Face causal LM fine-tuned on right-padded batches (30-60% padding): the RankMe of the
head's input that ``GeomonCallback`` (Lightning) and ``GeomonTrainerCallback`` (Hugging Face Trainer) log equals a
float64 reference over the real tokens' rows alone, read by the callbacks' default from the batch's
``attention_mask``; with ``token_mask_fn=None`` it is the value over every position, padding included."""

from __future__ import annotations

import csv

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.reference import ref_rankme  # noqa: E402

VOCAB, WIDTH, SEQ, BATCH, ROWS = 50, 32, 16, 8, 64
RANKME, RANKME_COV = "geomon/rankme/lm_head.input", "geomon/rankme_cov/lm_head.input"


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def lengths() -> torch.Tensor:
    """One length per sequence: every batch of ``BATCH`` holds the same lengths in another order, 45% padding."""
    pattern = torch.tensor([16, 3, 12, 5, 9, 14, 4, 8])
    return torch.cat([pattern.roll(batch) for batch in range(ROWS // BATCH)])


def padded(index: int, length: int) -> dict[str, torch.Tensor]:
    """A right-padded sequence as ``DataCollatorWithPadding`` makes it (pad id 0, labels -100 at padding)."""
    ids = torch.randint(1, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(index))
    mask = (torch.arange(SEQ) < length).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def record(model: torch.nn.Module) -> list[torch.Tensor]:
    """The head's input rows ``[B, N, D]`` of every forward (a hook of the test's own)."""
    rows: list[torch.Tensor] = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].detach().clone()))
    return rows


def expected(rows: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
    z = (rows.reshape(-1, WIDTH) if mask is None else rows[mask.bool()]).double().numpy()
    return ref_rankme(z), ref_rankme(z, centered=True)


# -- Lightning ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [True, False], ids=["default-attention-mask", "token-mask-fn-none"])
def test_lightning_fit_logs_the_rankme_of_the_real_tokens(masked, tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from geomon.callback import GeomonCallback
    from geomon.labels import default_token_mask

    class Lit(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt2()
            self.masks: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            self.masks.append(batch["attention_mask"].clone())
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    module = Lit()
    rows = record(module.model)
    callback = GeomonCallback(every_n_steps=2, window_rows=WIDTH, media=False, alerts=(), strict=True,
                              token_mask_fn=default_token_mask if masked else None)  # fmt: skip
    trainer = lightning.Trainer(
        max_steps=5, logger=lightning.loggers.CSVLogger(tmp_path, name="run"), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    data = [padded(i, int(n)) for i, n in enumerate(lengths())]
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False))
    key, cov_key = (k.replace("/lm_head", "/model.lm_head") for k in (RANKME, RANKME_COV))  # under the module
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        logged = {int(row["step"]): row for row in csv.DictReader(handle) if row.get(key)}
    assert sorted(logged) == [0, 2, 4]
    for step, row in logged.items():  # batch `step` is the forward of logging step `step`
        mask = module.masks[step]
        assert 0.3 <= 1 - float(mask.float().mean()) <= 0.6
        rankme, cov = expected(rows[step], mask if masked else None)
        assert float(row[key]) == pytest.approx(rankme, rel=1e-6)
        assert float(row[cov_key]) == pytest.approx(cov, rel=1e-6)
        everything = expected(rows[step], None)
        assert masked == (abs(everything[1] - cov) > 1e-3 * cov)  # padding moves the value: it is left out


# -- Hugging Face Trainer -------------------------------------------------------------------------------------------


def test_hf_trainer_logs_the_rankme_of_the_real_tokens(tmp_path):
    pytest.importorskip("accelerate")
    from geomon.integrations.huggingface import GeomonTrainerCallback

    class Sequences(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.items = [padded(i, int(n)) for i, n in enumerate(lengths())]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return self.items[index]

    model = gpt2()
    rows = record(model)
    masks: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: masks.append(kwargs["attention_mask"].clone()),
                                    with_kwargs=True)  # fmt: skip
    callback = GeomonTrainerCallback(every_n_steps=2, window_rows=WIDTH, alerts=(), strict=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        lr_scheduler_type="constant", logging_steps=2, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=[callback])
    trainer.train()
    logged = {row["step"]: row for row in trainer.state.log_history if RANKME in row}
    assert sorted(logged) == [2, 4]
    for step, row in logged.items():  # the forward of the optimizer step that completes `step`
        mask = masks[step - 1]
        assert 0.3 <= 1 - float(mask.float().mean()) <= 0.6
        rankme, cov = expected(rows[step - 1], mask.cpu())
        assert row[RANKME] == pytest.approx(rankme, rel=1e-6)
        assert row[RANKME_COV] == pytest.approx(cov, rel=1e-6)
