"""geomon.Monitor in a hand-written loop: schedule, values, windows, no perturbation, resume."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geomon import Monitor
from geomon._tiny_gpt import TinyGPT
from geomon.functional import GeomonWarning, attention_entropy, rankme

SDPA = F.scaled_dot_product_attention


def _model(seed=0, d_model=32):
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=19, d_model=d_model, n_layer=2, n_head=4, context=12)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 19, (4, 12), generator=g) for _ in range(n)]


def test_off_schedule_steps_do_nothing():
    model = _model()
    monitor = Monitor(every_n_steps=3, embedding_modules=["ln_f"]).attach(model)
    for step in (1, 2, 4):
        with monitor.step(step):
            assert F.scaled_dot_product_attention is SDPA  # nothing armed
            assert all(not m._forward_hooks for m in model.modules())
            model(_batches(1)[0])
    states = {probe.pid: probe.state_dict() for probe in monitor.plan}
    assert states["embedding:ln_f"]["rankme"]["n"] == 0  # planned and allocated at attach, never fed
    assert all(float(state["count"].sum()) == 0 for pid, state in states.items() if pid.startswith("attention:"))
    assert monitor.compute() == {}  # nothing was measured: nothing is logged, not even the weights' values


def test_attention_values_equal_the_reference_on_independently_captured_qk():
    model = _model().eval()
    x = _batches(1)[0]
    monitor = Monitor(every_n_steps=1, query_rows=5).attach(model)
    qkv = {}
    handles = [b.attn.qkv.register_forward_hook(lambda m, i, o, j=j: qkv.update({j: o})) for j, b in
               enumerate(model.blocks)]  # fmt: skip
    with torch.no_grad(), monitor.step(0):
        model(x)
    for h in handles:
        h.remove()
    values = monitor.compute()
    index = torch.linspace(0, 11, 5).round().long()
    for j in range(2):
        q, k, _ = qkv[j].split(32, dim=2)
        q, k = (t.view(4, 12, 4, 8).transpose(1, 2) for t in (q, k))
        entropy, max_logit = attention_entropy(q, k, is_causal=True, query_index=index)
        assert float(values[f"geomon/attention/entropy/blocks.{j}.attn"]) == pytest.approx(
            float(entropy.mean()), rel=1e-5
        )
        assert float(values[f"geomon/attention/max_logit/blocks.{j}.attn"]) == pytest.approx(
            float(max_logit.max()), rel=1e-5
        )


def test_embedding_window_fills_to_four_times_the_width_before_reporting():
    model = _model().eval()  # ln_f width 32: RankMe needs 128 rows; a step gives 4 x 12 = 48
    monitor = Monitor(every_n_steps=1, attention=False, embedding_modules=["ln_f"]).attach(model)
    rows, reported = [], []
    handle = model.ln_f.register_forward_hook(lambda m, i, o: rows.append(o.detach().reshape(-1, 32)))
    for step, x in enumerate(_batches(3)):
        with torch.no_grad(), monitor.step(step):
            model(x)
        reported.append(monitor.compute())
    handle.remove()
    assert not [k for k in reported[0] | reported[1] if "rankme" in k]  # windows not full yet
    assert float(reported[2]["geomon/rankme/ln_f"]) == pytest.approx(float(rankme(torch.cat(rows))), rel=1e-9)


def test_a_pattern_that_matches_nothing_fails_at_attach_listing_the_modules():
    with pytest.raises(ValueError, match=r"'nope\*' matches no module; the candidates are: tok, pos, blocks"):
        Monitor(embedding_modules=["nope*"]).attach(_model())


def test_training_is_bit_identical_with_the_monitor_on_every_step():
    def train(monitored: bool):
        model = _model(seed=3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        monitor = Monitor(every_n_steps=1, embedding_modules=["blocks.*.mlp", "ln_f"]).attach(model)
        losses = []
        for step, x in enumerate(_batches(4)):
            with monitor.step(step) if monitored else torch.enable_grad():
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if monitored:
                monitor.compute()
            losses.append(loss.detach())
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()]

    plain, watched = train(False), train(True)
    assert torch.equal(plain[0], watched[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], watched[1], strict=True))


def test_a_resumed_monitor_reports_what_an_uninterrupted_one_reports():
    batches = _batches(3)

    def run(model, monitor, steps):
        for step in steps:
            with torch.no_grad(), monitor.step(step):
                model(batches[step])

    model = _model().eval()
    whole = Monitor(every_n_steps=1, embedding_modules=["ln_f"]).attach(model)
    run(model, whole, range(3))
    first = Monitor(every_n_steps=1, embedding_modules=["ln_f"]).attach(model)
    run(model, first, range(2))
    resumed = Monitor(every_n_steps=1, embedding_modules=["ln_f"]).attach(model)
    resumed.load_state_dict(first.state_dict())
    run(model, resumed, [2])
    expected, got = whole.compute(), resumed.compute()
    assert expected.keys() == got.keys() and "geomon/rankme/ln_f" in got
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(float(value), rel=1e-9) or math.isnan(value)


def test_bad_configuration_fails_fast():
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        Monitor(every_n_steps=0)
    with pytest.raises(ValueError, match="query_rows must be a positive integer"):
        Monitor(query_rows=0)
    with pytest.raises(RuntimeError, match="before attach"):
        Monitor().step(0)


def test_spectral_norms_of_chosen_weights_follow_training():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = Monitor(every_n_steps=1, attention=False, spectral_modules=["blocks.*.attn.qkv"]).attach(model)
    for step, x in enumerate(_batches(3)):
        with monitor.step(step):
            loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values = monitor.compute()
        for j in range(2):
            exact = torch.linalg.matrix_norm(model.blocks[j].attn.qkv.weight.detach(), 2)
            sigma = float(values[f"geomon/spectral/sigma/blocks.{j}.attn.qkv"])
            assert sigma == pytest.approx(float(exact), rel=1e-3)
            frobenius_sq = float(np.square(model.blocks[j].attn.qkv.weight.detach().numpy().astype(np.float64)).sum())
            stable = float(values[f"geomon/spectral/stable_rank/blocks.{j}.attn.qkv"])
            assert stable == pytest.approx(frobenius_sq / sigma**2, rel=1e-9)
    restored = Monitor(spectral_modules=["blocks.*.attn.qkv"]).attach(model)
    restored.load_state_dict(monitor.state_dict())
    in_autocast = Monitor(every_n_steps=1, attention=False, spectral_modules=["blocks.*.attn.qkv"]).attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a loop that wraps its whole step, compute included
        with in_autocast.step(0):
            model(x)
        autocast_values = in_autocast.compute()
    for j in range(2):
        exact = float(torch.linalg.matrix_norm(model.blocks[j].attn.qkv.weight.detach().double(), 2))
        assert float(autocast_values[f"geomon/spectral/sigma/blocks.{j}.attn.qkv"]) == pytest.approx(exact, rel=1e-4)
    pid = "spectral:blocks.0.attn.qkv"
    assert torch.equal(restored.plan.probes[pid].metric.u, monitor.plan.probes[pid].metric.u)


@pytest.mark.parametrize("reparametrise", ["prune", "spectral_norm", "weight_norm"])
def test_hook_reparametrised_weights_are_not_taken_for_fsdp1_shards(reparametrise):
    # regression: prune / the hook-based spectral_norm and weight_norm leave a plain tensor as `weight`, which the
    # FSDP1 check took for a flattened shard: attach refused spectral_modules, and logit maps were dropped
    import warnings as warnings_module

    from torch.nn.utils import prune, spectral_norm

    model = _model()
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("ignore", FutureWarning)  # weight_norm's hook form is deprecated
        for block in model.blocks:
            if reparametrise == "prune":
                prune.l1_unstructured(block.attn.qkv, "weight", amount=0.3)
            elif reparametrise == "spectral_norm":
                spectral_norm(block.attn.qkv)
            else:
                torch.nn.utils.weight_norm(block.attn.qkv)
    monitor = Monitor(every_n_steps=1, attention=False, spectral_modules=["blocks.*.attn.qkv"], strict=True)
    monitor.attach(model)
    with torch.no_grad(), monitor.step(0):
        model(_batches(1)[0])
    values = monitor.compute()
    for j in range(2):
        exact = torch.linalg.matrix_norm(model.blocks[j].attn.qkv.weight.detach().double(), 2)
        assert float(values[f"geomon/spectral/sigma/blocks.{j}.attn.qkv"]) == pytest.approx(float(exact), rel=1e-3)


def test_spectral_patterns_only_match_modules_with_a_matrix_weight():
    what = r"spectral_modules \(modules with a 2-D weight, nn\.Embedding excluded\)"
    with pytest.raises(ValueError, match=what + " pattern 'ln_f'"):
        Monitor(spectral_modules=["ln_f"]).attach(_model())
    model = _model()
    assert model.tok.weight.ndim == 2  # an embedding has a 2-D weight, but is not a spectral module
    with pytest.raises(ValueError, match=what + " pattern 'tok'"):
        Monitor(spectral_modules=["tok"]).attach(model)


def _live_tensors():
    import gc

    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_memory_does_not_grow_over_500_monitored_steps():
    model = _model().eval()
    monitor = Monitor(every_n_steps=1, embedding_modules=["ln_f"], spectral_modules=["head"]).attach(model)
    x = _batches(1)[0]

    def run(steps):
        for step in range(steps):
            with torch.no_grad(), monitor.step(step):
                model(x)
            monitor.compute()

    run(20)  # warm-up: metrics are created lazily on the first measured step
    before = _live_tensors()
    run(500)
    assert _live_tensors() <= before  # nothing captured is kept across steps


def test_logit_map_sigma_is_logged_and_no_entropy_bound_on_causal_layers():
    from geomon.reparam import sigma_reparam

    model = _model().eval()
    x = _batches(1)[0]
    monitor = Monitor(every_n_steps=1, entropy_bound=True, strict=True).attach(model)
    with torch.no_grad(), monitor.step(0):
        model(x)
    with pytest.warns(GeomonWarning, match=r"no entropy bound is logged for 'blocks.1.attn'.*causal"):
        values = monitor.compute()
    w_q, w_k, _ = model.blocks[1].attn.qkv.weight.detach().double().split(32, dim=0)
    per_head = [torch.linalg.matrix_norm(w_q[h * 8 : h * 8 + 8].T @ w_k[h * 8 : h * 8 + 8], 2) / math.sqrt(8)
                for h in range(4)]  # fmt: skip
    sigma = float(values["geomon/spectral/logit_sigma/blocks.1.attn"])
    assert sigma == pytest.approx(float(max(per_head)), rel=1e-9)
    # Theorem 3.1's T-key bound is not a bound for causal rows (row i sees i keys): not logged (tests/probes/
    # test_entropy_bound_layers.py checks the layers where it is logged against every row)
    assert not [key for key in values if "entropy_bound" in key]
    sigma_reparam(model, include=["blocks.*.attn.qkv"])
    monitor = Monitor(every_n_steps=1, attention=False).attach(model)
    with torch.no_grad(), monitor.step(0):
        model(x)
    values = monitor.compute()
    assert float(values["geomon/spectral/reparam_ratio/blocks.0.attn.qkv"]) == pytest.approx(1.0)


def test_embedding_spectra_are_media_not_per_head_values_for_the_alert_rules():
    # regression: singular values filed under the RankMe key were read by RankCollapse as 32 "heads" far below 1% of D
    model = _model().eval()
    monitor = Monitor(every_n_steps=1, window_rows=48, strict=True).attach(model)
    with torch.no_grad(), monitor.step(0):
        model(_batches(1)[0])
    values = monitor.compute(0, spectra=True)
    key = "geomon/rankme/head.input"
    assert float(values[key]) > 5 and monitor.spectra[key].shape == (32,)
    assert key not in monitor.details
    assert not [event for event in monitor.events if event.rule == "rank_collapse"]


def test_next_tokens_seen_only_after_one_prefix_raise_no_non_finite_alert():
    # regression: every sequence starts with token 0, and tokens 15-18 only ever follow it, so those four classes
    # share the position-0 feature and their means coincide: cdnv read inf, gnc2_var NaN, and the non-finite rule
    # fired on a healthy run
    model = _model().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 15, (8, 12), generator=g)
    x[:, 0] = 0
    x[:, 1] = 15 + torch.arange(8) % 4
    monitor = Monitor(every_n_steps=1, window_rows=80).attach(model)
    with torch.no_grad(), monitor.step(0, labels=torch.cat([x[:, 1:], torch.full((8, 1), -100)], dim=1)):
        model(x)
    with pytest.warns(UserWarning, match="coinciding means"):
        values = monitor.compute(0)
    nc = {key.split("/")[2]: float(value) for key, value in values.items() if key.startswith("geomon/nc/")}
    assert nc["coincident_pairs"] == pytest.approx(6 / math.comb(18, 2))  # 4 classes -> 6 of the 18 seen's pairs
    assert "nc4" not in nc  # the first window has no previous window's means to decide by: not logged
    assert all(math.isfinite(value) for value in nc.values()), {k: v for k, v in nc.items() if not math.isfinite(v)}
    assert not [event for event in monitor.events if event.rule == "non_finite"]


def test_rankme_alpha_and_spectrum_of_a_window_equal_float64_references():
    # RankMe, alpha-ReQ and the spectrum media all come from one window's sums: each against its own reference
    import numpy as np

    from tests.reference import ref_alpha_req, ref_rankme

    g = torch.Generator().manual_seed(5)
    scales = torch.arange(1, 161, dtype=torch.float32) ** -0.6
    chunks = [torch.randn(3, 100, 160, generator=g) * scales for _ in range(3)]  # 900 rows of D = 160 in 3 steps
    monitor = Monitor(every_n_steps=1, attention=False, head=None, window_rows=900, strict=True)
    monitor.attach(torch.nn.Linear(1, 1))
    for step, chunk in enumerate(chunks):
        with monitor.step(step):
            monitor.observe("z", chunk)
        values = monitor.compute(step, spectra=True)
        assert ("geomon/rankme/z" in values) == (step == 2)  # reported once the window is full, not before
    z = torch.cat([c.reshape(-1, 160) for c in chunks]).double().numpy()
    assert float(values["geomon/rankme/z"]) == pytest.approx(ref_rankme(z), rel=1e-9)
    assert float(values["geomon/alpha_req/z"]) == pytest.approx(ref_alpha_req(z)[0], rel=1e-9)
    expected_spectrum = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(monitor.spectra["geomon/rankme/z"].numpy(), expected_spectrum, rtol=1e-6, atol=1e-9)
