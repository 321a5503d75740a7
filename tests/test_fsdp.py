"""geomon under FSDP on 2 CPU processes (gloo): FSDP2 (``fully_shard``) values equal a 1-process run on the same
global batches, σ equals the full weight's spectral norm, training is untouched, nothing hangs when ranks disagree
about labels; FSDP1 (``FullyShardedDataParallel``) says at attach what it cannot compute and computes the rest right.

Each test spawns 2 ranks that write what they saw to a file; a rank that hangs fails the test after a deadline."""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from geomon import Monitor
from geomon._tiny_gpt import Block, TinyGPT
from tests.ranks import spawn

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo backend"
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB, D, CONTEXT, BATCH, STEPS, WORLD = 19, 32, 12, 8, 4, 2
SPECTRAL = ["blocks.*.attn.qkv", "blocks.*.mlp.0", "head"]


def _model():
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, d_model=D, n_layer=2, n_head=4, context=CONTEXT)


def _batches():
    """The global batches: ``(x, y)`` of ``BATCH`` rows, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (STEPS, BATCH, CONTEXT + 1), generator=generator)
    return [(row[:, :-1], row[:, 1:]) for row in x]


def _monitor(**kwargs):
    return Monitor(every_n_steps=1, embedding_modules=["ln_f"], strict=True, **kwargs)


def _always(rank, step):
    return True


def _train(model, monitor, rank, world, labels_on=_always, states=None):
    """A plain loop over this rank's rows of each global batch; returns the losses and each step's values (and
    appends the whole weights after each step to ``states``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, values = [], []
    for step, (x, y) in enumerate(_batches()):
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        labels = y if labels_on(rank, step) else None
        with monitor.step(step, labels=labels) if monitor is not None else _nothing():
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().clone())
        if monitor is not None:
            values.append({key: value.detach().clone() for key, value in monitor.compute(step).items()})
        if states is not None:
            states.append(_full_state(model))
    return torch.stack(losses), values


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


def _spawn(body, tmp_path, timeout=120):
    return spawn(body, tmp_path, WORLD, timeout)


def _shard2(model, head_alone=True):
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    if head_alone:  # its own unit: the head's weight is a sharded DTensor again when its forward hook runs
        fully_shard(model.head)
    fully_shard(model)
    return model


def _full_state(model):
    """Every parameter whole, through torch's own state-dict gathering (not geomon's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _fsdp2_monitored(rank, world, labels_on):
    model = _shard2(_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = _monitor(spectral_modules=SPECTRAL).attach(model)
        states = []
        losses, values = _train(model, monitor, rank, world, labels_on, states)
    types = {type(value).__name__ for step in values for value in step.values()}
    return {"losses": losses, "values": values, "types": types, "states": states,
            "warnings": [str(w.message) for w in caught]}  # fmt: skip


def _rank1_unlabelled_at_odd_steps(rank, step):
    return rank == 0 or step % 2 == 0


def _fsdp2_body(rank, world):
    """Without the monitor; with it; with it while rank 1 has no labels on odd steps."""
    plain_losses, _ = _train(_shard2(_model()), None, rank, world)
    return {"plain_losses": plain_losses, "labelled": _fsdp2_monitored(rank, world, _always),
            "unlabelled": _fsdp2_monitored(rank, world, _rank1_unlabelled_at_odd_steps)}  # fmt: skip


def _reparam_refusal():
    """What fully_shard says of a σReparam model (its γ is a 0-d parameter)."""
    from torch.distributed.fsdp import fully_shard

    from geomon.reparam import sigma_reparam

    try:
        fully_shard(sigma_reparam(_model()).blocks[0])
    except ValueError as error:
        return str(error)
    return None


def _attach_on_rank0_only(rank, world):
    """Under FSDP2 attach reads shapes only: were it a collective, rank 0's would meet rank 1's barrier (an error) or
    nothing (a hang, failed by the spawn's deadline)."""
    model = _shard2(_model())
    if rank == 0:
        _monitor(spectral_modules=SPECTRAL).attach(model)
    dist.barrier()
    return True


def _body(rank, world):
    return {"attach_alone": _attach_on_rank0_only(rank, world), "fsdp2": _fsdp2_body(rank, world),
            "fsdp1": _fsdp1_body(rank, world), "reparam": _reparam_refusal()}  # fmt: skip


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of 2 ranks (a process start costs seconds) for all the plain-loop runs."""
    return _spawn(_body, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture
def fsdp2_ranks(spawned):
    return [rank["fsdp2"] for rank in spawned]


def _single(labels_for, model=None):
    """The 1-process reference on whole global batches; ``labels_for(step, y)`` gives its labels."""
    model = model or _model()
    monitor = _monitor(spectral_modules=SPECTRAL).attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, values = [], []
    for step, (x, y) in enumerate(_batches()):
        with monitor.step(step, labels=labels_for(step, y)):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        values.append(monitor.compute(step))
    return torch.stack(losses), values, model


def _close(a, b, rel=2e-4, abs=1e-5):
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=abs)


def _assert_same_as_single(ranks, single_values):
    for rank in ranks:
        assert len(rank["values"]) == len(single_values)
        for step, (got, want) in enumerate(zip(rank["values"], single_values, strict=True)):
            assert got.keys() == want.keys(), (step, sorted(got.keys() ^ want.keys()))
            for key in want:
                assert _close(got[key], want[key]), (step, key, float(got[key]), float(want[key]))
    for step0, step1 in zip(ranks[0]["values"], ranks[1]["values"], strict=True):  # the same bits on every rank
        assert step0.keys() == step1.keys()
        for key in step0:
            assert torch.equal(step0[key], step1[key]) or (step0[key].isnan() and step1[key].isnan()), key


@pytest.mark.slow
def test_fsdp2_values_equal_one_process_on_the_same_global_batches(fsdp2_ranks):
    ranks = [rank["labelled"] for rank in fsdp2_ranks]
    single_losses, single_values, single_model = _single(lambda step, y: y)
    # training is untouched: bit for bit the losses of the same FSDP run without the monitor, and (up to float
    # rounding of the sharded reductions) those of one process
    for rank, plain in zip(ranks, fsdp2_ranks, strict=True):
        assert torch.equal(rank["losses"], plain["plain_losses"])
        assert rank["types"] == {"Tensor"}  # no DTensor leaks into the values (the alert engine reads them)
        assert not [w for w in rank["warnings"] if w.startswith("geomon")]
    global_losses = (ranks[0]["losses"] + ranks[1]["losses"]) / 2  # equal shards: the mean of the shard means
    torch.testing.assert_close(global_losses, single_losses, rtol=1e-5, atol=1e-6)
    _assert_same_as_single(ranks, single_values)
    keys = set().union(*(step.keys() for step in single_values))
    for family in ("attention/entropy/", "rankme/ln_f", "rankme/head.input", "nc/nc1/", "nc/nc3/",
                   "spectral/sigma/head", "spectral/logit_sigma/blocks.1.attn"):  # fmt: skip
        assert any(family in key for key in keys), family

    # σ against the whole weight gathered by torch (not geomon) after each step, σ = |W|₂ by an SVD in float64. The
    # first measurement starts cold (100 power steps: converged); later ones take one warm step each, a lower bound
    # that trails the moving weight a little
    for step, state in enumerate(ranks[0]["states"]):
        for name in ("blocks.0.attn.qkv", "blocks.1.mlp.0", "head"):
            full = state[f"{name}.weight"].double()
            exact = float(torch.linalg.matrix_norm(full, 2))
            for rank in ranks:
                sigma = float(rank["values"][step][f"geomon/spectral/sigma/{name}"])
                low = 1e-5 if step == 0 else 1e-2
                assert exact * (1 - low) <= sigma <= exact * (1 + 1e-6), (step, name, sigma, exact)
                stable = float(rank["values"][step][f"geomon/spectral/stable_rank/{name}"])
                assert stable == pytest.approx(float(full.square().sum()) / sigma**2, rel=1e-5)
    state = ranks[0]["states"][-1]
    for name in ("blocks.0.attn.qkv", "head"):  # the run trained the one-process model's weights
        torch.testing.assert_close(state[f"{name}.weight"], single_model.get_submodule(name).weight.detach(),
                                   rtol=1e-3, atol=1e-4)  # fmt: skip
    # the logit map of each head, W_Q,hᵀ W_K,h (D x D) formed explicitly, against geomon's warm power iteration
    # (exact at the first compute, a float32 estimate from below on the later ones)
    for layer in (0, 1):
        w_q, w_k, _ = state[f"blocks.{layer}.attn.qkv.weight"].double().chunk(3)
        heads = [w_q[h * 8 : h * 8 + 8].T @ w_k[h * 8 : h * 8 + 8] for h in range(4)]
        exact = max(float(torch.linalg.matrix_norm(m, 2)) for m in heads) / math.sqrt(8)
        for rank in ranks:
            sigma = float(rank["values"][-1][f"geomon/spectral/logit_sigma/blocks.{layer}.attn"])
            assert exact * (1 - 1e-5) <= sigma <= exact * (1 + 1e-6)


@pytest.mark.slow
def test_fsdp2_a_rank_without_labels_neither_hangs_nor_disagrees(fsdp2_ranks):
    """Rank 1 passes no labels on steps 1 and 3: its rows count as unlabelled (-100), exactly as one process fed -100
    for those rows, and both ranks still compute the same values (nc3 included: the head's weight is recorded on
    every rank), so that alert rules, and the stop actions they drive, agree on every rank."""
    ranks = [rank["unlabelled"] for rank in fsdp2_ranks]

    def labels_for(step, y):
        if step % 2 == 0:
            return y
        masked = y.clone()
        masked[BATCH // 2 :] = -100  # rank 1's rows of the global batch
        return masked

    _, single_values, _ = _single(labels_for)
    _assert_same_as_single(ranks, single_values)
    assert any(key.startswith("geomon/nc/nc3/") for step in single_values for key in step)
    assert any("has no labels" in w for w in ranks[1]["warnings"])
    assert not any("has no labels" in w for w in ranks[0]["warnings"])


def _shard1(model, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"),
                                    use_orig_params=use_orig_params)  # fmt: skip


def _fsdp1_body(rank, world):
    results = {}
    for orig in (False, True):
        # spectral_modules: refused at attach, on every rank alike (no collective is left waiting)
        try:
            _monitor(spectral_modules=["*head"]).attach(_shard1(_model(), orig))
            results[f"refusal{orig}"] = None
        except ValueError as error:
            results[f"refusal{orig}"] = str(error)
    for orig, attach_first in ((False, True), (True, False)):
        # attached before wrapping (as Lightning's callbacks are) or after: the same names either way
        model = _model()
        monitor = _monitor()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if attach_first:
                monitor.attach(model)
                model = _shard1(model, orig)
            else:
                model = _shard1(model, orig)
                monitor.attach(model)
            losses, values = _train(model, monitor, rank, world)
        results[f"run{orig}"] = {"losses": losses, "values": values, "warnings": [str(w.message) for w in caught]}
    return results


@pytest.mark.slow
def test_fsdp1_refuses_weights_at_attach_and_computes_the_rest(spawned):
    ranks = [rank["fsdp1"] for rank in spawned]
    for rank in ranks:
        for orig in (False, True):
            assert rank[f"refusal{orig}"] is not None and "FSDP1" in rank[f"refusal{orig}"]
            assert "fully_shard" in rank[f"refusal{orig}"]
    _, single_values, _ = _single(lambda step, y: y, model=None)
    weight_free = [{k: v for k, v in step.items() if "/spectral/" not in k} for step in single_values]
    for orig in (False, True):
        runs = [rank[f"run{orig}"] for rank in ranks]
        _assert_same_as_single(runs, weight_free)  # same keys: no spectral value, no wrapper in any name
        for run in runs:
            assert sum("FSDP1" in w for w in run["warnings"]) == 1  # said once, at attach or at the first compute
    assert any("nc/nc3/" in key for key in weight_free[-1])


@pytest.mark.slow
def test_fsdp2_attach_communicates_nothing(spawned):
    assert [rank["attach_alone"] for rank in spawned] == [True, True]


@pytest.mark.slow
def test_fully_shard_refuses_sigma_reparam_layers(spawned):
    """A fact the distributed guide states: σReparam's scalar γ cannot be sharded by FSDP2 (FSDP1 can wrap it, but
    then geomon computes no weight-based value, σReparam's included)."""
    for rank in spawned:
        assert rank["reparam"] is not None and "scalar parameters" in rank["reparam"]


def test_lightning_refuses_its_fsdp_strategy_on_cpu():
    """The fact docs/guides/distributed.md states: Lightning's FSDPStrategy (FSDP1) needs a GPU."""
    lightning = pytest.importorskip("lightning.pytorch")
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        lightning.Trainer(accelerator="cpu", devices=2, strategy="fsdp")


# Lightning with FSDP2 (ModelParallelStrategy) on CPU ---------------------------------------------------------------
def lightning_fit(out, devices):
    """A Lightning fit on ``devices`` CPU processes: FSDP2 through ModelParallelStrategy when 2, plain when 1; run
    as ``python -m tests.test_fsdp`` (Lightning re-launches that command for the other rank)."""
    import csv

    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from geomon.callback import GeomonCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model()

        def configure_model(self):
            if devices > 1:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for block in self.model.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            rank, world = self.global_rank, self.trainer.world_size
            x = torch.cat([x.chunk(world)[rank] for x, _ in _batches()])
            y = torch.cat([y.chunk(world)[rank] for _, y in _batches()])  # batch k: this rank's rows of global k
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH // world)

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if devices > 1 else "auto"
    callback = GeomonCallback(every_n_steps=1, spectral_modules=[f"model.{p}" for p in SPECTRAL],
                              embedding_modules=["model.ln_f"], strict=True)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, callbacks=[callback],
                        logger=L.loggers.CSVLogger(out, name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)  # fmt: skip
    trainer.fit(Module())
    if trainer.is_global_zero:
        with open(Path(out, "run", "version_0", "metrics.csv")) as handle:
            rows = list(csv.DictReader(handle))
        logged = {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if k.startswith("geomon/") and v}
        torch.save(logged, Path(out, "logged.pt"))


@pytest.mark.slow
def test_lightning_fsdp2_on_cpu_logs_the_one_process_values(tmp_path):
    """Lightning's ModelParallelStrategy (FSDP2) runs on CPU with gloo; the callback logs what the plain one-process
    loop computes on the same global batches (Lightning's loop trains the same weights)."""
    pytest.importorskip("lightning.pytorch")
    child = subprocess.run([sys.executable, "-m", "tests.test_fsdp", str(tmp_path), "2"], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)  # fmt: skip
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    logged = torch.load(tmp_path / "logged.pt")
    _, single_values, _ = _single(lambda step, y: y)
    want = {(step, key.replace("/model.", "/")): float(v) for step, values in enumerate(single_values)
            for key, v in values.items()}  # fmt: skip
    got = {(step, key.replace("/model.", "/")): value for (step, key), value in logged.items()}
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())  # labels: the batch's (x, y) pair
    families = {key.split("/")[1] for _, key in got}
    assert {"attention", "rankme", "nc", "spectral", "alerts"} <= families
    assert any("spectral/sigma/head" in key for _, key in got)
    for key, value in got.items():
        assert _close(value, want[key]), (key, value, want[key])


if __name__ == "__main__":
    lightning_fit(sys.argv[1], int(sys.argv[2]))
