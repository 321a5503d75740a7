"""Adapters for training frameworks other than Lightning (each imports its framework only when it is used).

- :mod:`geomon.integrations.huggingface`: ``GeomonTrainerCallback`` for the Hugging Face ``Trainer``.
"""
