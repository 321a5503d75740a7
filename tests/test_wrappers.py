"""Wrappers never reach keys: a Monitor attached to what DDP, DataParallel, Lightning Fabric or torch.compile return
logs the module names of the unwrapped model, and the values of a Monitor on the unwrapped model over the same data.

The expected names are read off the unwrapped model's own ``named_modules()``; the expected values come from a
second Monitor attached to the unwrapped model (in one process, on the whole global batch for the 2-rank run). The
model has a submodule literally called ``module``, which must keep its name while DDP's ``module.`` goes.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from geomon import Monitor
from geomon._tiny_gpt import Block, CausalSelfAttention
from geomon.probes.plan import unwrap
from tests.ranks import spawn

VOCAB, D, T, BATCH, STEPS = 19, 16, 8, 8, 2
FAMILIES = ("entropy", "entropy_normalized", "max_logit")


class Nest(nn.Module):
    """A small decoder whose only block is a submodule named ``module`` (as DDP calls the model it wraps)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(VOCAB, D)
        self.module = Block(D, 4)
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        return self.head(self.ln_f(self.module(self.tok(idx))))


def _monitor():
    return Monitor(every_n_steps=1, spectral_modules=["module.attn.qkv", "head"], window_rows=BATCH * T, alerts=(),
                   strict=True)  # fmt: skip


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, T + 1), generator=g) for _ in range(STEPS)]


def _train(model, monitor, rows=slice(None)):
    """``STEPS`` SGD steps of ``model`` (perhaps wrapped) on ``rows`` of each global batch; the values per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    logged = []
    for step, data in enumerate(_batches()):
        x, y = data[rows, :-1], data[rows, 1:]
        with monitor.step(step, labels=y):
            logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        logged.append({key: float(value) for key, value in monitor.compute(step).items()})
    return logged


def _expected_keys(model):
    """The attention, spectral and head keys spelled from the unwrapped model's own module names."""
    names = dict(model.named_modules())
    attention = [name for name, module in names.items() if isinstance(module, CausalSelfAttention)]
    assert attention == ["module.attn"] and "head" in names and "module.attn.qkv" in names
    keys = {f"geomon/attention/{family}/{name}" for family in FAMILIES for name in attention}
    keys |= {f"geomon/spectral/logit_sigma/{name}" for name in attention}
    keys |= {
        f"geomon/spectral/{stat}/{name}" for stat in ("sigma", "stable_rank") for name in ("module.attn.qkv", "head")
    }
    keys |= {"geomon/rankme/head.input", "geomon/nc/nc1/head.input"}
    return keys


def _assert_same(logged, reference, rel):
    assert len(logged) == len(reference) == STEPS
    expected = _expected_keys(Nest())
    for got, want in zip(logged, reference, strict=True):
        assert got.keys() == want.keys()
        assert expected <= got.keys(), sorted(expected - got.keys())
        assert not any("_forward_module" in key or "module.module" in key or "/module.head" in key for key in got)
        for key, value in want.items():
            if math.isnan(value):  # nc4: no previous window yet
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(value, rel=rel, abs=1e-6), key


def test_unwrap_removes_the_wrappers_around_the_model_only():
    model = Nest()
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(torch.compile(nn.DataParallel(model))) is model  # layer after layer; nothing is compiled here
    assert unwrap(model.module) is model.module  # a Block, whatever its attribute is called in its parent
    holder = nn.Sequential(model)  # a container is not a wrapper: its names stay
    assert unwrap(holder) is holder


def test_data_parallel_model_logs_the_unwrapped_names_and_values():
    plain = Nest()
    reference = _train(plain, _monitor().attach(plain))
    wrapped = nn.DataParallel(Nest())  # on a CPU it calls the model it wraps
    assert any(name.startswith("module.module.") for name, _ in wrapped.named_modules())
    _assert_same(_train(wrapped, _monitor().attach(wrapped)), reference, rel=1e-12)


def test_fabric_module_logs_the_unwrapped_names_and_values():
    fabric_module = pytest.importorskip("lightning.fabric")
    plain = Nest()
    reference = _train(plain, _monitor().attach(plain))
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(Nest())
    assert type(model).__name__ == "_FabricModule"
    assert any(name.startswith("_forward_module.module.") for name, _ in model.named_modules())
    _assert_same(_train(model, _monitor().attach(model)), reference, rel=1e-12)


def test_names_given_with_a_wrapper_prefix_fail_at_attach_listing_the_real_ones():
    with pytest.raises(ValueError, match=r"'module\.head' matches no module; the candidates are: .*\bhead\b"):
        Monitor(spectral_modules=["module.head"]).attach(nn.DataParallel(Nest()))


def _ddp_rank(rank, world):
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(Nest())
    assert any(name == "module.module.attn" for name, _ in model.named_modules())
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return _train(model, _monitor().attach(model), rows)


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo")
def test_ddp_wrapped_model_on_two_ranks_logs_the_one_process_unwrapped_values(tmp_path):
    plain = Nest()
    reference = _train(plain, _monitor().attach(plain))  # one process, the whole global batch
    for logged in spawn(_ddp_rank, tmp_path, world=2):
        _assert_same(logged, reference, rel=1e-4)
