"""Backend choice: ``auto`` says once per operation and reason when CUDA tensors are left to the torch path."""

import types
import warnings

import pytest
import torch

from geomon.functional import _dispatch
from geomon.functional._common import GeomonWarning
from geomon.functional._dispatch import choose_backend


def _on(device_type: str):
    """A stand-in for a tensor on ``device_type`` (choose_backend reads only ``.device.type``): this machine may
    have no GPU."""
    return types.SimpleNamespace(device=types.SimpleNamespace(type=device_type))


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(_dispatch, "_ANNOUNCED", set())


def _choose(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = choose_backend(*args, **kwargs)
    return choice, [str(w.message) for w in caught if issubclass(w.category, GeomonWarning)]


def test_cuda_tensors_left_to_the_torch_path_are_announced_once_per_reason():
    cuda = _on("cuda")
    choice, said = _choose("auto", "attention_entropy", cuda, unsupported="head dim 512 > 256")
    assert choice == "torch"
    assert said == ["geomon: attention_entropy on CUDA runs on the torch path (same values, slower than the kernel): "
                    "head dim 512 > 256"]  # fmt: skip
    assert _choose("auto", "attention_entropy", cuda, unsupported="head dim 512 > 256") == ("torch", [])
    other = _choose("auto", "attention_entropy", cuda, unsupported="float64 inputs are computed by the torch path only")
    assert other[0] == "torch" and len(other[1]) == 1 and "float64" in other[1][0]
    assert len(_choose("auto", "nc4 decisions", cuda, unsupported="head dim 512 > 256")[1]) == 1  # another operation


def test_a_missing_triton_is_announced_on_cuda(monkeypatch):
    monkeypatch.setattr(_dispatch.importlib.util, "find_spec", lambda name: None)
    choice, said = _choose("auto", "class statistics", _on("cuda"))
    assert choice == "torch" and len(said) == 1 and "triton is not installed" in said[0]


def test_nothing_is_said_off_cuda_or_when_the_torch_path_was_asked_for():
    cpu = torch.zeros(1)
    assert _choose("auto", "attention_entropy", cpu, unsupported="head dim 512 > 256") == ("torch", [])
    assert _choose("torch", "attention_entropy", _on("cuda"), unsupported="head dim 512 > 256") == ("torch", [])
    with pytest.raises(RuntimeError, match="head dim 512 > 256"):  # asked for the kernel: an error, not a notice
        choose_backend("triton", "attention_entropy", _on("cuda"), unsupported="head dim 512 > 256")
