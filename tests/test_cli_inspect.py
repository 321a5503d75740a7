"""``geomon inspect MODEL``: what it lists is what a real monitor watches and logs, its cost model agrees with torch's
FLOP counter and with the monitor's real state, whichever SDPA backend runs the attention, and every user error is
one line with status 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from geomon import Monitor, keys
from geomon._tiny_gpt import CausalSelfAttention, TinyGPT
from geomon.probes.base import FLOAT64, metric_bytes
from geomon.probes.collapse import STATS as NC_STATS
from geomon.probes.plan import AUTO_COLLAPSE_MAX_ELEMENTS
from geomon.tools import cli
from geomon.tools.cost import flop_counter, sdpa_backward_flops, sdpa_flops

#: key families of the head's input: RankMe, alpha-ReQ and the neural-collapse statistics
HEAD_FAMILIES = {keys.RANKME, keys.ALPHA_REQ, *(keys.nc(stat) for stat in NC_STATS)}

ROOT = Path(__file__).resolve().parents[1]
#: TinyGPT as the factory builds it: D = 128 > 100 (alpha-ReQ on), B x N = 16 x 32 = 4 x D rows (a window per step)
VOCAB, WIDTH, LAYERS, HEADS, CONTEXT, BATCH = 40, 128, 2, 4, 32, 16
FACTORY = f"""
from torch import nn
from geomon._tiny_gpt import TinyGPT

def build():
    return TinyGPT(vocab_size={VOCAB}, d_model={WIDTH}, n_layer={LAYERS}, n_head={HEADS}, context={CONTEXT})

def encoder():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

MODEL = nn.Sequential(nn.Linear(6, 6), nn.ReLU())

class HandWritten(nn.Module):  # softmax attention written by hand: seen at its softmax when a forward runs
    def __init__(self):
        super().__init__()
        self.num_heads, self.qkv = 4, nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
        return ((q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)

def hand_written():
    return nn.Sequential(nn.Embedding({VOCAB}, 32), HandWritten(), nn.Linear(32, {VOCAB}))

def not_a_model():
    return 42

def needs_arguments(width):
    return nn.Linear(width, width)

class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        raise RuntimeError("this forward always fails")
"""


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / f"inspect_models_{uuid.uuid4().hex[:8]}.py"
    path.write_text(FACTORY)
    return path


def _json(capsys, argv: list[str]) -> dict:
    assert cli.main(["inspect", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout is the JSON document


def _error_line(capsys, argv: list[str]) -> str:
    assert cli.main(["inspect", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("geomon: error: ")
    return lines[0]


def _held_bytes(probe) -> int:
    """Bytes a monitor's probe really holds: its metrics' states, their reset defaults and buffers, and the head
    weight a collapse probe copies (counted in float64, as the plan counts it)."""
    held = 0
    for metric in (getattr(probe, name, None) for name in ("metric", "rankme")):
        if metric is not None and hasattr(metric, "_defaults"):
            weight = getattr(metric, "_weight", None)
            held += metric_bytes(metric) + (0 if weight is None else weight.numel() * FLOAT64)
    return held


def _reference_counter() -> FlopCounterMode:
    """torch's own counter, no custom formulas, on the math backend: it sees the attention as the ``bmm`` calls it
    decomposes into, so its count is independent of geomon's attention formulas (and of the machine's kernels)."""
    return FlopCounterMode(display=False)


def _flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), _reference_counter() as counter:
        fn()
    return int(counter.get_total_flops())


#: SDPA backends the tests run attention on: whatever this machine picks, the math path, and the fused kernels
BACKENDS = {
    "default": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def _backend(name: str, probe: Callable[[], object] | None = None) -> AbstractContextManager:
    """The ``sdpa_kernel`` context of backend ``name``; skips the test when the backend has no kernel for ``probe``
    (default: causal float32 attention on the CPU)."""
    backend = BACKENDS[name]
    if backend is None:
        return nullcontext()
    q = torch.randn(1, 4, 8, 32)
    try:
        with sdpa_kernel(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch says why each kernel declined
            probe() if probe is not None else F.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as error:
        pytest.skip(f"no {name} SDPA kernel here: {str(error).splitlines()[0]}")
    return sdpa_kernel(backend)


def _tiny_gpt_forward_flops(batch: int, seq: int) -> int:
    """TinyGPT's forward from its configuration alone: ``2·B·N`` per weight entry (per layer ``qkv`` 3·W², ``proj``
    W², the MLP 8·W²; the head V·W) plus, per layer, ``QKᵀ`` and ``PV`` over every (query, key) pair."""
    weights = LAYERS * 12 * WIDTH**2 + VOCAB * WIDTH
    attention = LAYERS * 2 * 2 * batch * HEADS * seq * seq * (WIDTH // HEADS)
    return 2 * batch * seq * weights + attention


@pytest.mark.parametrize("backend", ["default", "math", "flash"])
def test_tiny_gpt_factory_lists_what_a_real_monitor_watches_and_costs(factory, capsys, backend):
    with _backend(backend):  # the measured FLOPs must not depend on which SDPA kernel runs
        report = _json(capsys, [f"{factory}:build", "--measure", "--seq-len", str(CONTEXT), "--batch-size",
                                str(BATCH), "--repeats", "1"])  # fmt: skip
    torch.manual_seed(0)
    model = TinyGPT(VOCAB, d_model=WIDTH, n_layer=LAYERS, n_head=HEADS, context=CONTEXT)
    attention = [name for name, module in model.named_modules() if isinstance(module, CausalSelfAttention)]
    assert [a["module"] for a in report["attention"]] == attention == ["blocks.0.attn", "blocks.1.attn"]
    assert all(a["heads"] == a["kv_heads"] == HEADS and a["head_dim"] == WIDTH // HEADS for a in report["attention"])
    assert report["measured"]["seen_attention"] == dict.fromkeys(attention, HEADS)
    assert report["class"] == "TinyGPT" and report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["head"]["module"] == "head"
    assert (report["head"]["num_classes"], report["head"]["num_features"]) == (VOCAB, WIDTH)
    assert report["neural_collapse"]["enabled"] and report["neural_collapse"]["state_elements"] == VOCAB * WIDTH

    # a default monitor on the same model, fed two windows of labels covering every class
    monitor = Monitor().attach(model)
    assert monitor.head == report["head"]["module"] and monitor.collapse is not None
    x = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(BATCH * CONTEXT).reshape(BATCH, CONTEXT) % VOCAB
    plain = _flops(lambda: model(x))
    assert plain == _tiny_gpt_forward_flops(BATCH, CONTEXT)
    logged: dict[str, Tensor] = {}
    for step in (0, 50):
        with sdpa_kernel(SDPBackend.MATH), _reference_counter() as counter:
            with monitor.step(step, labels=labels):
                model(x)
            captured = int(counter.get_total_flops()) - plain
            logged.update(monitor.compute(step))
            computed = int(counter.get_total_flops()) - plain - captured
    assert report["keys"] == sorted(logged) == report["measured"]["keys"]
    assert keys.key(keys.ALPHA_REQ, "head.input") in report["keys"]  # D > 100
    assert sum(len(probe["keys"]) for probe in report["probes"]) == len(report["keys"])

    # the cost model against torch's counter on the math backend (second window: nc4 runs) and the monitor's state
    cost = report["cost"]
    assert cost["rows_per_step"] == BATCH * CONTEXT and cost["steps_per_window"] == 1
    assert cost["model_forward"] == plain == report["measured"]["forward_flops"]
    assert cost["capture"] == captured == report["measured"]["capture_flops"]
    assert cost["compute_matmul"] + cost["window_matmul"] == computed
    planned = {probe["probe"]: probe["state_bytes"] for probe in report["probes"] if probe["kind"] != "alerts"}
    assert planned == {probe.pid: _held_bytes(probe) for probe in monitor.plan}  # what the monitor really holds
    assert report["state_bytes"]["total"] == sum(planned.values()) == monitor.plan.state_bytes()
    assert report["state_bytes"]["by_kind"]["attention"] == LAYERS * (5 * HEADS + 5) * 8  # 5 float64 sums per head
    assert report["state_bytes"]["budget"] == monitor.options.memory_budget_mib * 2**20
    measured = report["measured"]
    assert all(math.isfinite(measured[k]) and measured[k] > 0 for k in ("forward_s", "monitored_forward_s"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", ["causal", "mask", "gqa", "cross"])
def test_attention_flops_do_not_depend_on_the_sdpa_backend(device, backend, case):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    b, h, n, dh = 2, 8, 64, 32
    kv_heads, keys, sdpa = h, n, {"is_causal": True}
    if case == "mask":
        offsets = torch.arange(n, device=device)
        sdpa = {"attn_mask": (offsets[:, None] - offsets[None, :]).abs() < 16}  # a sliding window
    elif case == "gqa":
        kv_heads, sdpa = 2, {"is_causal": True, "enable_gqa": True}
    elif case == "cross":
        keys, sdpa = 48, {}
    generator = torch.Generator(device).manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32  # CUDA's fused kernels take half precision

    def tensors() -> tuple[Tensor, Tensor, Tensor]:
        q = torch.randn(b, h, n, dh, device=device, dtype=dtype, generator=generator)
        k, v = (torch.randn(b, kv_heads, keys, dh, device=device, dtype=dtype, generator=generator) for _ in "kv")
        return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def count(counter: FlopCounterMode) -> tuple[int, int]:
        q, k, v = tensors()
        with counter:
            out = F.scaled_dot_product_attention(q, k, v, **sdpa)
            forward = int(counter.get_total_flops())
            out.float().square().sum().backward()
        return forward, int(counter.get_total_flops()) - forward

    with sdpa_kernel(SDPBackend.MATH):
        reference = count(_reference_counter())  # torch's counter sees the math path's bmm calls
    with _backend(backend, lambda: F.scaled_dot_product_attention(*tensors(), **sdpa)):
        counted = count(flop_counter())
    shapes = ((b, h, n, dh), (b, kv_heads, keys, dh), (b, kv_heads, keys, dh))
    expected = (2 * b * h * n * keys * (dh + dh), 4 * b * h * n * keys * (dh + dh))
    assert (sdpa_flops(*shapes), sdpa_backward_flops((b, h, n, dh), *shapes)) == expected
    assert counted == reference == expected


def test_python_m_geomon_on_a_transformer_encoder(factory):
    module = factory.stem  # imported by name: the current directory is on the path, as with python -m
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "geomon", "inspect", f"{module}:encoder", "--json", "--measure", "--seq-len", "16",
         "--repeats", "1"],
        cwd=factory.parent, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    expected = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert [a["module"] for a in report["attention"]] == expected and len(expected) == 3
    assert all(a["kind"] == "torch_mha" and a["heads"] == 4 and a["head_dim"] == 8 for a in report["attention"])
    assert report["measured"]["seen_attention"] == dict.fromkeys(expected, 4)
    assert report["cost"]["model_forward"] == report["measured"]["forward_flops"]  # in_proj_weight counted
    assert report["cost"]["capture"] == report["measured"]["capture_flops"] > 0
    assert report["head"]["module"] is None and not report["neural_collapse"]["enabled"]
    assert "no output head" in report["neural_collapse"]["reason"]
    assert set(report["state_bytes"]["by_kind"]) == {"attention", "logit_map"}  # no embedding or collapse state
    logged = set(report["keys"])
    assert logged == set(report["measured"]["keys"])
    assert {keys.key(keys.ENTROPY, name) for name in expected} <= logged
    assert not any(keys.split(key)[0] in HEAD_FAMILIES for key in logged)
    values = report["measured"]["values"]
    for name in expected:  # the monitor really ran: entropies between 0 and log(16 keys)
        assert 0 <= values[keys.key(keys.ENTROPY, name)] <= math.log(16) + 1e-9


transformers = None


def _gpt2_config(path: Path, **sizes):
    global transformers
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **sizes)
    config.save_pretrained(path)
    return config


def test_hugging_face_gpt2_from_a_local_config(tmp_path, capsys):
    config = _gpt2_config(tmp_path, n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=64)
    report = _json(capsys, [str(tmp_path)])  # built on the meta device: no weights
    assert report["source"] == "huggingface" and "GPT2Config" in report["description"]
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    expected = [name for name, m in model.named_modules() if isinstance(m, GPT2Attention)]
    assert [a["module"] for a in report["attention"]] == expected == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(a["kind"].startswith("hf") and a["heads"] == 4 and a["head_dim"] == 16 for a in report["attention"])
    assert report["head"]["module"] == "lm_head" and "get_output_embeddings" in report["head"]["reason"]
    assert (report["head"]["num_classes"], report["head"]["num_features"]) == (300, 64)
    assert report["neural_collapse"]["enabled"]
    assert report["cost"]["seq_len"] == 64  # the model's own context, below the default cap
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    measured = _json(capsys, [str(tmp_path), "--measure", "--seq-len", "16", "--repeats", "1"])
    assert measured["measured"]["seen_attention"] == dict.fromkeys(expected, 4)
    assert measured["measured"]["input"] == "input_ids=[8, 16]"
    assert set(measured["keys"]) == set(measured["measured"]["keys"])
    assert measured["cost"]["capture"] == measured["measured"]["capture_flops"]
    assert measured["cost"]["model_forward"] == measured["measured"]["forward_flops"]  # tied lm_head counted


def test_large_vocabulary_turns_neural_collapse_off_as_the_monitor_does(tmp_path, capsys):
    config = _gpt2_config(tmp_path, n_layer=1, n_head=2, n_embd=384, vocab_size=50257, n_positions=2048)
    report = _json(capsys, [str(tmp_path), "--seq-len", "4096"])
    assert AUTO_COLLAPSE_MAX_ELEMENTS < 50257 * 384
    nc = report["neural_collapse"]
    assert not nc["enabled"] and "50257 x 384" in nc["reason"] and "neural_collapse=True" in nc["reason"]
    assert not any(keys.split(key)[0] in HEAD_FAMILIES - {keys.RANKME, keys.ALPHA_REQ} for key in report["keys"])
    assert not any(probe["kind"] == "collapse" for probe in report["probes"])
    assert report["cost"]["seq_len"] == 2048 and any("2048 positions" in note for note in report["notes"])
    with torch.device("meta"), pytest.warns(UserWarning, match="neural collapse is off"):
        monitor = Monitor().attach(transformers.GPT2LMHeadModel(config))
    assert monitor.collapse is None and monitor.head == report["head"]["module"]


def test_module_instance_and_text_output(factory, capsys, monkeypatch):
    report = _json(capsys, [f"{factory}:MODEL"])  # an nn.Module attribute is used as is
    assert report["class"] == "Sequential" and report["attention"] == []
    assert any("scaled_dot_product_attention" in note for note in report["notes"])
    assert cli.main(["inspect", f"{factory}:build"]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.attn" in text and "blocks.1.attn" in text and "neural collapse" in text and "on:" in text
    monkeypatch.setitem(sys.modules, "rich.console", None)  # without rich: plain text
    assert cli.main(["inspect", f"{factory}:build"]) == 0
    plain = capsys.readouterr().out
    assert "blocks.1.attn | tiny_gpt | 4" in plain and "┃" not in plain


def test_attention_written_by_hand_is_found_by_a_measured_forward(factory, capsys):
    report = _json(capsys, [f"{factory}:hand_written"])
    assert report["attention"] == [] and any("by hand" in note for note in report["notes"])
    measured = _json(capsys, [f"{factory}:hand_written", "--measure"])
    assert any(note.endswith("modules not in the plan: 1") for note in measured["notes"]), measured["notes"]


def test_bad_model_specs(capsys):
    for spec, words in [
        ("", "empty MODEL"),
        (":build", "nothing before the colon"),
        ("mypkg.models:", "not a Python name"),
        ("my pkg:build", "neither a module name nor a .py file"),
        ("models.py", "needs the factory"),
        ("models.py:1build", "not a Python name"),
    ]:
        line = _error_line(capsys, [spec])
        assert words in line, line
        assert "module:factory" in line


def test_modules_that_do_not_import_or_do_not_give_a_model(factory, tmp_path, capsys):
    broken = tmp_path / "broken_import.py"
    broken.write_text("import geomon_no_such_package_xyz\n")
    line = _error_line(capsys, [f"{broken}:build"])
    assert "could not import" in line and "geomon_no_such_package_xyz" in line
    line = _error_line(capsys, ["geomon_no_such_package_xyz.models:build"])
    assert "could not import module 'geomon_no_such_package_xyz.models'" in line
    assert "no such file" in _error_line(capsys, [f"{tmp_path / 'missing.py'}:build"])
    line = _error_line(capsys, [f"{factory}:not_a_model"])
    assert "returned int 42" in line and "not a torch.nn.Module" in line
    line = _error_line(capsys, [f"{factory}:needs_arguments"])
    assert "with no arguments failed" in line and "width" in line
    line = _error_line(capsys, [f"{factory}:nowhere"])
    assert "has no attribute 'nowhere'" in line and "build" in line
    line = _error_line(capsys, [f"{factory}:Broken", "--measure"])
    assert "--measure" in line and "this forward always fails" in line


def test_uncached_hugging_face_name_is_not_downloaded(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _error_line(capsys, ["geomon-tests/no-such-model-xyz"])
    assert "could not be loaded from the local cache" in line and "never downloads" in line
    (tmp_path / "notes.txt").write_text("not a config")
    assert "holds no readable Hugging Face config" in _error_line(capsys, [str(tmp_path)])


def test_bad_numbers_are_argparse_errors(capsys):
    for argv in (["--seq-len", "0"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["inspect", "torch.nn:Identity", *argv])
        assert exit_info.value.code == 2
        assert "positive integer" in capsys.readouterr().err
