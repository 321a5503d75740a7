"""The front-door examples (quickstart, plain loop, Hugging Face) run in their fast mode and log what they say:
every attention layer the model has, entropies within [0, log n], the head's RankMe and neural collapse, the CSV rows
at the measured steps, printed values equal to the monitor's; the plain loop's first measurement against an
explicit float64 softmax and SVD of the same model and batch."""

from __future__ import annotations

import csv
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

from geomon._tiny_gpt import CausalSelfAttention
from geomon.capture.extra_forward import can_force_eager

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["--steps", "11", "--every", "10", "--batch-size", "8"]  # measured at steps 0 and 10


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"geomon_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv_rows(path: Path) -> dict[int, dict[str, float]]:
    """Lightning's wide CSV: ``{step: {key: value}}`` over the non-empty cells."""
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            cells = {k: float(v) for k, v in row.items() if v not in ("", None) and k.startswith("geomon/")}
            if cells:
                rows.setdefault(int(row["step"]), {}).update(cells)
    return rows


def _check_attention(values: dict[str, float], layers: list[str], n_keys: int) -> None:
    for layer in layers:
        entropy = values[f"geomon/attention/entropy/{layer}"]
        normalised = values[f"geomon/attention/entropy_normalized/{layer}"]
        assert 0.0 <= entropy <= math.log(n_keys) + 1e-6, (layer, entropy)
        assert 0.0 <= normalised <= 1.0 + 1e-6 and math.isfinite(values[f"geomon/attention/max_logit/{layer}"])


def test_quickstart_logs_every_layer_to_the_csv(tmp_path, capsys):
    pytest.importorskip("lightning.pytorch")
    example = _load("quickstart")
    result = example.main([*FAST, "--out", str(tmp_path)])
    model = example.build_model()
    layers = [f"model.{name}" for name, m in model.named_modules() if isinstance(m, CausalSelfAttention)]
    assert len(layers) == 2
    rows = _csv_rows(result["csv"])
    assert sorted(rows) == [0, 10]
    for values in rows.values():
        _check_attention(values, layers, result["context"])
        assert 1.0 <= values["geomon/rankme/model.head.input"] <= 128
        assert math.isfinite(values["geomon/nc/nc1/model.head.input"])
    assert math.isfinite(rows[10]["geomon/nc/nc4/model.head.input"])  # the second window has reference means
    assert set(result["values"]) == set(rows[10])  # the callback's last values are the CSV's last row
    for key, value in result["values"].items():
        assert value == pytest.approx(rows[10][key], rel=1e-6, abs=1e-12)
    printed = capsys.readouterr().out
    for key, value in result["values"].items():
        assert re.search(rf"{re.escape(key)}\s+{value:.4f}\n", printed), key
    assert str(result["csv"]) in printed


def _reference_attention(model, x: torch.Tensor) -> tuple[float, float, float]:
    """Entropy, normalised entropy and max logit of layer 0, by an explicit float64 causal softmax."""
    model = model.double()
    with torch.no_grad():
        h = model.tok(x) + model.pos(torch.arange(x.shape[1]))
        block = model.blocks[0]
        q, k, _ = block.attn.qkv(block.ln1(h)).split(h.shape[-1], dim=2)
        b, n, d = q.shape
        heads = block.attn.n_head
        q, k = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, -math.inf)
        p = torch.softmax(scores, dim=-1)
        entropy = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1)  # [B, H, n]
        n_keys = torch.arange(1, n + 1, dtype=torch.float64)
        normalised = entropy[..., 1:] / torch.log(n_keys[1:])  # rows with at least two keys
        return entropy.mean().item(), normalised.mean().item(), scores[..., causal].max().item()


def _reference_rankme(model, x: torch.Tensor) -> float:
    features = []
    handle = model.head.register_forward_hook(lambda m, args, out: features.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    z = features[0].reshape(-1, features[0].shape[-1]).double().numpy()
    import numpy as np

    sigma = np.linalg.svd(z, compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def test_plain_loop_prints_the_monitors_values_and_measures_them_right(capsys):
    example = _load("plain_loop")
    result = example.main(FAST)
    history = result["history"]
    assert sorted(history) == [0, 10]
    layers = ["blocks.0.attn", "blocks.1.attn"]
    for values in history.values():
        _check_attention(values, layers, example.CONTEXT)
        assert 1.0 <= values["geomon/rankme/head.input"] <= 64
        assert all(math.isfinite(v) for k, v in values.items() if not k.startswith("geomon/nc/nc4/"))
    assert "geomon/nc/nc4/head.input" not in history[0] and math.isfinite(history[10]["geomon/nc/nc4/head.input"])

    printed: dict[int, dict[str, float]] = {}  # what the example printed, read back
    step = None
    for line in capsys.readouterr().out.splitlines():
        if match := re.match(r"step (\d+)  loss", line):
            step = int(match.group(1))
            printed[step] = {}
        elif match := re.match(r"  (geomon/\S+) = (\S+)$", line):
            printed[step][match.group(1)] = float(match.group(2))
    assert set(printed) == set(history)
    for s, values in history.items():
        assert set(printed[s]) == set(values)
        for key, value in values.items():
            assert printed[s][key] == pytest.approx(value, rel=1e-5, abs=1e-12, nan_ok=True)

    # step 0 measured the initial model on the first batch: rebuild both and measure them independently
    torch.manual_seed(0)
    model = example.build_model()
    x, _ = next(example.batches(8, 0))
    rankme = _reference_rankme(model, x)
    entropy, normalised, max_logit = _reference_attention(model, x)
    assert history[0]["geomon/attention/entropy/blocks.0.attn"] == pytest.approx(entropy, rel=1e-4)
    assert history[0]["geomon/attention/entropy_normalized/blocks.0.attn"] == pytest.approx(normalised, rel=1e-4)
    assert history[0]["geomon/attention/max_logit/blocks.0.attn"] == pytest.approx(max_logit, rel=1e-4)
    assert history[0]["geomon/rankme/head.input"] == pytest.approx(rankme, rel=1e-3)

    # the checkpointed state reloads into a fresh monitor as it was
    resumed = result["resumed"].state_dict()
    planned = {pid for pid in result["state"]["plan"] if pid.startswith(("embedding:", "collapse:"))}
    assert planned == {"embedding:head.input", "collapse:head.input"}
    torch.testing.assert_close(resumed, result["state"], equal_nan=True)


def test_huggingface_llama_watches_every_attention_layer_and_collapse(tmp_path):
    pytest.importorskip("lightning.pytorch")
    transformers = pytest.importorskip("transformers")
    example = _load("huggingface")
    result = example.main([*FAST, "--out", str(tmp_path)])
    model = result["model"]
    assert isinstance(model, transformers.LlamaForCausalLM)
    attention_class = transformers.models.llama.modeling_llama.LlamaAttention
    layers = [f"model.{name}" for name, m in model.named_modules() if isinstance(m, attention_class)]
    assert len(layers) == 2 and result["head"] == "model.lm_head"
    rows = _csv_rows(result["csv"])
    assert sorted(rows) == [0, 10]
    for values in rows.values():
        _check_attention(values, layers, example.CONTEXT)
        assert 1.0 <= values["geomon/rankme/model.lm_head.input"] <= 64
        for stat in ("nc1", "nc2_equinorm", "nc3", "cdnv"):  # labels came from batch["labels"]
            assert math.isfinite(values[f"geomon/nc/{stat}/model.lm_head.input"])
    assert "geomon/nc/nc4/model.lm_head.input" not in rows[0]  # no previous window's means to compare with
    assert 0.0 <= rows[10]["geomon/nc/nc4/model.lm_head.input"] <= 1.0
    assert result["values"] == pytest.approx(rows[10], rel=1e-6, nan_ok=True)
    assert math.isfinite(result["loss"])


@pytest.mark.skipif(not can_force_eager(), reason="torch.compiler.set_stance needs torch >= 2.6")
def test_compiled_model_example_measures_what_the_plain_loop_measures_on_the_same_model():
    """The compiled model, measured by an extra forward, logs at step 0 (same initial weights, same batch) what the
    plain loop's hook-based probes log on the uncompiled model; training goes on to the same loss as without it."""
    compiled = _load("compiled_model").main([*FAST, "--backend", "aot_eager"])
    plain = _load("plain_loop").main(FAST)
    assert sorted(compiled["history"]) == sorted(plain["history"]) == [0, 10]
    layers = ["blocks.0.attn", "blocks.1.attn"]
    _check_attention(compiled["history"][10], layers, _load("plain_loop").CONTEXT)
    for key, value in plain["history"][0].items():
        if not key.startswith("geomon/spectral/"):  # weights read at compute, after each loop's own update
            assert compiled["history"][0][key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
    assert compiled["loss"] == pytest.approx(plain["loss"], rel=1e-4)  # aot_eager and eager round apart a little
