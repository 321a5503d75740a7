"""A Hugging Face transformers model trained with Lightning and ``GeomonCallback``, neural collapse included.

Run: ``python examples/huggingface.py`` (400 steps, about a minute and a half on a 2-core CPU;
``--steps 20 --every 10`` for seconds; ``--arch gpt2`` for GPT-2 instead of Llama). The model is built from a small
config with random weights (``LlamaForCausalLM``: 2 layers, hidden 64, 4 query heads sharing 2 key/value heads,
rotary positions), so nothing is downloaded; it learns Python's documentation text one character at a time (the
characters are the vocabulary, no tokenizer to fetch). Batches are what a transformers data collator makes:
``{"input_ids", "labels"}``.

What geomon does with it, all by default:

- attention is seen inside every ``LlamaAttention`` through transformers' attention interface, *after* rotary
  embeddings, with the grouped-query layout (``geomon/attention/*/model.model.layers.{i}.self_attn``);
- the output head is the model's ``get_output_embeddings()`` (``lm_head``): RankMe of its input
  (``geomon/rankme/model.lm_head.input``, 1 to 64);
- neural collapse of that input against the head, with labels from ``batch["labels"]`` shifted as the model shifts
  them (position ``t`` predicts label ``t + 1``; the last position has none): ``geomon/nc/*/model.lm_head.input``.
  ``nc4`` is not logged in the first window (it needs the previous window's class means).

Values go to ``<out>/csv/version_*/metrics.csv``; the run ends with the last measured values.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import transformers

from geomon import GeomonCallback
from geomon._tiny_gpt import CharTokenizer, load_corpus, random_batch

TEXT = load_corpus()
TOKENIZER = CharTokenizer(TEXT)
CONTEXT = 64


def build_model(arch: str = "llama") -> transformers.PreTrainedModel:
    """A small causal LM from a config, random weights (a factory ``geomon inspect`` can call too)."""
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=0,
            eos_token_id=0, pad_token_id=0,
        )  # fmt: skip
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(TOKENIZER), n_embd=64, n_layer=2, n_head=4,
                                         n_positions=CONTEXT, bos_token_id=0, eos_token_id=0)  # fmt: skip
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    return transformers.AutoModelForCausalLM.from_config(config)


class Windows(torch.utils.data.IterableDataset):
    """Endless ``{"input_ids", "labels"}`` batches of the corpus (labels = input_ids: the model shifts them)."""

    def __init__(self, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = TOKENIZER.encode(TEXT), batch_size, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            ids, _ = random_batch(self.data, self.batch_size, CONTEXT, generator)
            yield {"input_ids": ids, "labels": ids.clone()}


class CausalLM(pl.LightningModule):
    def __init__(self, arch: str, lr: float) -> None:
        super().__init__()
        self.model, self.lr = build_model(arch), lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="A transformers causal LM with GeomonCallback (CPU, no download).")
    parser.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50, help="measure every N steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/huggingface"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    module = CausalLM(args.arch, args.lr)
    logger = pl.loggers.CSVLogger(args.out, name="csv")
    callback = GeomonCallback(every_n_steps=args.every)  # labels_fn=default_labels reads batch["labels"]
    trainer = pl.Trainer(
        max_steps=args.steps, callbacks=[callback], logger=logger, log_every_n_steps=min(10, args.steps),
        accelerator="cpu", enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(Windows(args.batch_size, args.seed), batch_size=None))

    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("geomon/")}
    print(f"\n{type(module.model).__name__}: what geomon measured last")
    for key in sorted(values):
        print(f"  {key:<62} {values[key]:.4f}")
    csv = Path(logger.log_dir) / "metrics.csv"
    print(f"\nevery measured step: {csv}")
    return {"values": values, "csv": csv, "model": module.model, "head": callback.monitor.head,
            "loss": float(trainer.callback_metrics.get("train_loss", math.nan))}  # fmt: skip


if __name__ == "__main__":
    main()
