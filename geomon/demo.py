"""geomon's main job, for now: train a small GPT on CPU and print every geometry metric of its live activations.

Run ``python -m geomon.demo`` (``make demo``). A 2-layer character GPT trains on Python's documentation text; every
``--eval-every`` steps a held-out batch goes through the model with the capture armed (queries and keys at the
attention call itself, features by forward hooks), and the metric classes of
:mod:`geomon.metrics` turn the captured queries, keys and features into attention entropy, max logit, spectral norms
and the entropy lower bound they imply, RankMe (both variants), alpha-ReQ and neural collapse against the output
head. Values are printed as a table and written to ``<out>/metrics.csv`` (step, key, value); the CSV also holds
each layer's Theorem 3.1 entropy bound (``geomon/spectral/entropy_bound/...``), which for real inputs is usually far
below the measured entropy: the product of spectral norms it rests on is a worst case.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch
from geomon.capture import AttentionCall, capture_sdpa
from geomon.functional import entropy_lower_bound, spectral_norm
from geomon.metrics import AlphaReQ, AttentionEntropy, NeuralCollapse, RankMe, SpectralNorm


class DemoProbes:
    """The metrics of one model, fed while :meth:`capture` is active: queries and keys at the attention call
    (:func:`geomon.capture.capture_sdpa`), block inputs and final features by forward hooks."""

    def __init__(self, model: TinyGPT) -> None:
        self.model = model
        d, vocab = model.ln_f.normalized_shape[0], model.head.out_features
        self.layers = {f"blocks.{i}.attn": block.attn for i, block in enumerate(model.blocks)}
        self.attention = {name: AttentionEntropy(num_heads=attn.n_head) for name, attn in self.layers.items()}
        self.sigma = {name: SpectralNorm() for name in self.layers}
        self.input_gram_norm = {name: torch.zeros((), dtype=torch.float64) for name in self.layers}
        self.rankme, self.rankme_cov = RankMe(num_features=d), RankMe(num_features=d, centered=True)
        self.alpha = AlphaReQ(num_features=d, fit_range=(11, min(100, d - 1)), return_r2=True)
        self.collapse = NeuralCollapse(num_classes=vocab, num_features=d)
        self.labels: Tensor | None = None
        self._logit_map_vectors: dict[str, Tensor | None] = dict.fromkeys(self.layers)

    def _on_attention(self, call: AttentionCall) -> None:
        self.attention[call.module].update(call.q, call.k, is_causal=call.is_causal, attn_mask=call.attn_mask)

    def _input_hook(self, name: str):
        def hook(module, inputs, output):  # |X Xᵀ|₂ of each sequence entering the attention (for the bound)
            gram_norm = torch.linalg.matrix_norm(inputs[0].detach().double(), 2).amax() ** 2
            self.input_gram_norm[name] = torch.maximum(self.input_gram_norm[name], gram_norm)

        return hook

    def _final_hook(self, module, inputs, output):
        features = output.detach().flatten(0, 1)
        self.rankme.update(features)
        self.rankme_cov.update(features)
        self.alpha.update(features)
        if self.labels is None:
            raise RuntimeError("DemoProbes: the final-layer hook ran outside capture()")
        self.collapse.update(features, self.labels.flatten(), self.model.head.weight)

    @contextmanager
    def capture(self, labels: Tensor) -> Iterator[None]:
        """Arm the hooks for one forward pass; they are removed however the block exits."""
        self.labels = labels
        handles = [attn.qkv.register_forward_hook(self._input_hook(name)) for name, attn in self.layers.items()]
        handles.append(self.model.ln_f.register_forward_hook(self._final_hook))
        try:
            with capture_sdpa(self.model, self._on_attention):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self.labels = None

    def logit_map_sigma(self, name: str) -> float:
        """Largest over heads of σ(W_Qhᵀ W_Kh) · scale: the spectral norm of each head's bilinear logit map."""
        attn = self.layers[name]
        d = attn.qkv.in_features
        dh = d // attn.n_head
        w_q, w_k, _ = attn.qkv.weight.detach().split(d, dim=0)
        maps = torch.stack([w_q[h * dh : (h + 1) * dh].T @ w_k[h * dh : (h + 1) * dh] for h in range(attn.n_head)])
        sigma, self._logit_map_vectors[name] = spectral_norm(maps, u=self._logit_map_vectors[name], n_iter=50)
        return float(sigma.max()) / math.sqrt(dh)

    def compute_and_reset(self) -> dict[str, float]:
        values: dict[str, float] = {}
        context = self.model.context
        for name, attn in self.layers.items():
            self.sigma[name].update(attn.qkv.weight)
            result = self.attention[name].compute()
            values[f"geomon/attention/entropy/{name}"] = float(result["entropy"])
            values[f"geomon/attention/entropy_normalized/{name}"] = float(result["entropy_normalized"])
            values[f"geomon/attention/min_head_entropy/{name}"] = float(result["entropy_per_head"].min())
            values[f"geomon/attention/max_logit/{name}"] = float(result["max_logit"])
            values[f"geomon/spectral/sigma/{name}.qkv"] = float(self.sigma[name].compute())
            logit_sigma = self.logit_map_sigma(name)
            values[f"geomon/spectral/logit_sigma/{name}"] = logit_sigma
            bound = entropy_lower_bound(logit_sigma * float(self.input_gram_norm[name]), context)
            values[f"geomon/spectral/entropy_bound/{name}"] = float(bound)
        values["geomon/rankme/ln_f"] = float(self.rankme.compute())
        values["geomon/rankme_cov/ln_f"] = float(self.rankme_cov.compute())
        alpha, r2 = self.alpha.compute()
        values["geomon/alpha_req/ln_f"], values["geomon/alpha_req_r2/ln_f"] = float(alpha), float(r2)
        for key, value in self.collapse.compute().items():
            values[f"geomon/nc/{key}/ln_f"] = float(value)
        for metric in (*self.attention.values(), self.rankme, self.rankme_cov, self.alpha, self.collapse):
            metric.reset()
        self.input_gram_norm = {name: torch.zeros((), dtype=torch.float64) for name in self.layers}
        return values


def print_table(step: int, loss: float, values: dict[str, float], layers: list[str]) -> None:
    print(f"\nstep {step}  validation loss {loss:.3f}")
    print(f"  {'layer':<16}{'entropy':>9}{'norm.':>8}{'min head':>10}{'max logit':>11}{'σ(qkv)':>9}{'σ(QKᵀ)':>9}")
    for name in layers:
        row = [values[f"geomon/attention/{k}/{name}"] for k in ("entropy", "entropy_normalized", "min_head_entropy")]
        row += [values[f"geomon/attention/max_logit/{name}"], values[f"geomon/spectral/sigma/{name}.qkv"]]
        row += [values[f"geomon/spectral/logit_sigma/{name}"]]
        print(f"  {name:<16}{row[0]:>9.3f}{row[1]:>8.3f}{row[2]:>10.3f}{row[3]:>11.2f}{row[4]:>9.2f}{row[5]:>9.2f}")
    v = values
    print(
        f"  ln_f: RankMe {v['geomon/rankme/ln_f']:.1f}  covariance RankMe {v['geomon/rankme_cov/ln_f']:.1f}  "
        f"alpha-ReQ {v['geomon/alpha_req/ln_f']:.3f} (R² {v['geomon/alpha_req_r2/ln_f']:.3f})"
    )
    nc = {k: v[f"geomon/nc/{k}/ln_f"] for k in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "cdnv")}
    print("  neural collapse: " + "  ".join(f"{k} {x:.3f}" for k, x in nc.items()))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--eval-every", type=int, default=150, help="measure every N steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where metrics.csv goes")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    text = load_corpus()
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    model = TinyGPT(len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    probes = DemoProbes(model)
    batches, val_batches = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "metrics.csv"
    print(
        f"training a {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k-parameter GPT on {len(text) / 1e3:.0f} kB"
    )
    started = time.perf_counter()
    values: dict[str, float] = {}
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "key", "value"])
        for step in range(1, args.steps + 1):
            x, y = random_batch(train, args.batch, model.context, batches)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.eval_every and step != args.steps:
                continue
            model.eval()
            with torch.no_grad():
                vx, vy = random_batch(val, 64, model.context, val_batches)
                with probes.capture(vy):
                    val_loss = float(F.cross_entropy(model(vx).flatten(0, 1), vy.flatten()))
            model.train()
            values = probes.compute_and_reset() | {"val_loss": val_loss, "train_loss": float(loss.detach())}
            writer.writerows([step, key, value] for key, value in values.items())
            print_table(step, val_loss, values, list(probes.layers))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; every value is in {csv_path}")
    return values


if __name__ == "__main__":
    main()
