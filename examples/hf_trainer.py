"""A GPT-2-shaped model trained by the Hugging Face ``Trainer``, watched by ``GeomonTrainerCallback``.

Run: ``python examples/hf_trainer.py`` (300 steps, about a minute on a 2-core CPU; ``--steps 20 --every 10`` for
seconds; ``--report-to tensorboard wandb`` to send the values there as well). The model is a ``GPT2LMHeadModel``
built from a small config with random weights (2 layers, hidden 64, 4 heads), so nothing is downloaded; it learns
Python's documentation text one character at a time (the characters are the vocabulary, no tokenizer to fetch).
Examples are what a data collator makes: ``{"input_ids", "labels"}``.

What geomon does with it, all by default:

- attention is seen inside every ``GPT2Attention`` through transformers' attention interface
  (``geomon/attention/*/transformer.h.{i}.attn``);
- the output head is the model's ``get_output_embeddings()`` (``lm_head``): RankMe of its input
  (``geomon/rankme/lm_head.input``, 1 to 64) and neural collapse against it, with labels from the forward call's
  ``labels`` shifted as the model shifts them (``geomon/nc/*/lm_head.input``);
- the values are logged through ``Trainer.log``: they are in ``trainer.state.log_history`` and reach every
  ``report_to`` integration, under these keys (no ``train/`` prefix).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from geomon._tiny_gpt import CharTokenizer, load_corpus
from geomon.integrations.huggingface import GeomonTrainerCallback

TEXT = load_corpus()
TOKENIZER = CharTokenizer(TEXT)
CONTEXT = 64


def build_model() -> transformers.GPT2LMHeadModel:
    """A small GPT-2 from a config, random weights (a factory ``geomon inspect`` can call too)."""
    config = transformers.GPT2Config(vocab_size=len(TOKENIZER), n_embd=64, n_layer=2, n_head=4, n_positions=CONTEXT,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class Windows(torch.utils.data.Dataset):
    """``rows`` windows of the corpus at seeded random offsets, as ``{"input_ids", "labels"}`` (the model shifts
    the labels itself)."""

    def __init__(self, rows: int, seed: int) -> None:
        self.data = TOKENIZER.encode(TEXT)
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, self.data.numel() - CONTEXT, (rows,), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[index] : self.starts[index] + CONTEXT]
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="A GPT-2-shaped model under the HF Trainer with geomon (CPU).")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="measure every N optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--report-to", nargs="*", default=[], help="Trainer integrations, e.g. tensorboard wandb")
    parser.add_argument("--out", type=Path, default=Path("runs/hf_trainer"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    transformers.set_seed(args.seed)
    model = build_model()
    callback = GeomonTrainerCallback(every_n_steps=args.every)
    training = transformers.TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, learning_rate=args.lr, logging_steps=args.every,
        report_to=args.report_to, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=args.seed,
    )  # fmt: skip
    rows = args.steps * args.batch_size * args.accumulation
    trainer = transformers.Trainer(model=model, args=training, train_dataset=Windows(rows, args.seed),
                                   callbacks=[callback])  # fmt: skip
    trainer.train()

    history = trainer.state.log_history
    measured = [row for row in history if any(key.startswith("geomon/") for key in row)]
    last = {key: value for key, value in measured[-1].items() if key.startswith("geomon/")} if measured else {}
    print(f"\n{type(model).__name__}: what geomon measured at step {measured[-1]['step'] if measured else '-'}")
    for key in sorted(last):
        print(f"  {key:<58} {last[key]:.4f}")
    return {"history": history, "measured": measured, "values": last, "model": model, "head": callback.monitor.head,
            "out": args.out}  # fmt: skip


if __name__ == "__main__":
    main()
