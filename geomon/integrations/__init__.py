"""Adapters for training frameworks other than Lightning (each imports its framework only when it is used).

- :mod:`geomon.integrations.huggingface`: ``GeomonTrainerCallback`` for the Hugging Face ``Trainer``.
- :mod:`geomon.integrations.wandb_dashboard`: the W&B side of a run (exact summaries, overview keys, per-head
  tables, configuration) that the Lightning and Trainer callbacks drive, and the recommended workspace.
"""
