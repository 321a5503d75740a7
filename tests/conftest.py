"""Shared test helpers: seeded random inputs and numpy conversion."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels are tested in the interpreter, which must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def to_np(x: torch.Tensor) -> np.ndarray:
    """float64 numpy copy of a tensor (bf16/fp16 values are represented exactly)."""
    return x.detach().to(torch.float64).cpu().numpy()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A numpy generator seeded from the test's name: fresh inputs per test, reproducible runs."""
    # crc32, not hash(): Python salts str hashes per process, which gave every run (and xdist worker) new inputs
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def gen(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from the test's name."""
    return torch.Generator().manual_seed(int(rng.integers(2**31)))
