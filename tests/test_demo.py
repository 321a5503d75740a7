"""The README's main job runs end to end (fast mode) and its numbers are the metrics' numbers."""

import csv
import math

import pytest
import torch

from geomon import demo
from geomon._tiny_gpt import TinyGPT
from geomon.functional import attention_entropy


def test_demo_runs_and_writes_every_metric(tmp_path, capsys):
    values = demo.main(["--steps", "6", "--eval-every", "3", "--batch", "8", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "blocks.1.attn" in printed and "RankMe" in printed and "neural collapse" in printed
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["step"] for row in rows} == {"3", "6"}
    keys = {row["key"] for row in rows}
    for key in (
        "geomon/attention/entropy/blocks.0.attn",
        "geomon/attention/max_logit/blocks.1.attn",
        "geomon/spectral/entropy_bound/blocks.0.attn",
        "geomon/rankme/ln_f",
        "geomon/alpha_req/ln_f",
        "geomon/nc/nc1/ln_f",
    ):
        assert key in keys
    for key, value in values.items():
        if key != "geomon/nc/nc4/ln_f":  # nc4 compares against the previous window: defined from step 6 on
            assert math.isfinite(value), key
    assert math.isfinite(values["geomon/nc/nc4/ln_f"])


def test_probe_entropy_equals_entropy_from_independently_captured_qk():
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=20, d_model=32, n_layer=1, n_head=4, context=16).eval()
    x = torch.randint(0, 20, (3, 16))
    probes = demo.DemoProbes(model)
    captured = {}
    handle = model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: captured.update(out=o.detach()))
    with torch.no_grad(), probes.capture(torch.randint(0, 20, (3, 16))):
        model(x)
    handle.remove()
    q, k, _ = captured["out"].split(32, dim=2)
    q, k = (t.view(3, 16, 4, 8).transpose(1, 2) for t in (q, k))
    entropy, _ = attention_entropy(q, k, is_causal=True)
    assert float(probes.attention["blocks.0.attn"].compute()["entropy"]) == pytest.approx(
        float(entropy.mean()), rel=1e-6
    )
