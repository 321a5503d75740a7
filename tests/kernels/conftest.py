"""Kernel tests run where the kernels can: on a GPU, or interpreted on the CPU (TRITON_INTERPRET=1)."""

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # pragma: no cover - triton is a dev dependency on Linux
    pytest.skip("triton is not installed (pip install -e '.[dev]' on Linux)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def device() -> str:
    return DEVICE
