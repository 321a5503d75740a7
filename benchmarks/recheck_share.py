"""How many ``nc4`` rows a trained model sends to the float64 re-check, by how the fast search rounds.

``nc4`` decides each sample twice - the classifier's argmax and the nearest class centre - with a fast fp32 search
(TF32 tensor cores in the Triton kernel) that keeps each row's best and second-best score; rows whose lead is within
twice the proven rounding bound (``geomon.functional._class_tiles.score_error_bound``) are searched again in float64.
The kernel's docstring measured 24-34% of rows within the TF32 bound for Gaussian features; this script measures it
for a model that has learnt something: the character-level GPT of the demo (``geomon._tiny_gpt``), trained on
Python's documentation text, at several points of training.

At each checkpoint, on held-out windows: ``features`` are the final LayerNorm's outputs (what the head reads),
the classifier rows are ``head.weight`` (no bias), the class centres are the means of training-window features per
next-character label (classes absent from that sample are excluded, as ``nc4`` does). Scores are formed in float64,
so the "lead" is the exact margin; a fast search's own best and second differ from these by at most the bound, so
the share printed is that of rows whose exact lead is within twice the bound, plus or minus the few rows at the
edge. Printed per way the search rounds, as dispatched: fp32 features on the kernel (``tf32`` operands, sm_80+), on
the torch path at ``torch.set_float32_matmul_precision("medium")`` (``bf16`` operands) and at ``"highest"`` (``ieee``,
the CPU path); and bf16 features with the head rounded to bf16 as ``nc4`` does under bf16 (``exact`` operands, only
the fp32 accumulation rounds; the leads are then those of the bf16 values; the centres are those of the fp32
features, rounded).

    python benchmarks/recheck_share.py                  # about 4 minutes on 2 CPU cores
    python benchmarks/recheck_share.py --steps 0 200    # checkpoints (optimizer steps)
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geomon._tiny_gpt import CharTokenizer, TinyGPT, load_corpus, random_batch
from geomon.functional._class_tiles import score_error_bound

OPERANDS = ("tf32", "bf16", "ieee")  # fp32 features; bf16 features with bf16 rows are searched "exact"


def features_of(model: TinyGPT, x: torch.Tensor) -> torch.Tensor:
    """``[B·T, D]`` final LayerNorm outputs, what the head reads."""
    seen = []
    handle = model.ln_f.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def lead_and_bound_shares(features: torch.Tensor, rows: torch.Tensor, offset: torch.Tensor) -> dict[str, float]:
    """Share of rows whose exact top-2 lead is at most twice the bound: per operand rounding for fp32 features, and
    ``exact`` for the features and rows rounded to bf16 (the offset kept in float64)."""
    out = {ops: _share(features.float(), rows.float(), offset.float(), ops) for ops in OPERANDS}
    out["exact"] = _share(features.bfloat16(), rows.bfloat16(), offset.double(), "exact")  # nc4 keeps -|μ|² float64
    return out


def _share(features: torch.Tensor, rows: torch.Tensor, offset: torch.Tensor, operands: str) -> float:
    scores = features.double() @ rows.double().T + offset.double()
    top = scores.topk(2, dim=1).values
    lead = top[:, 0] - top[:, 1]
    return float((lead <= 2 * score_error_bound(features, rows, offset, operands)).double().mean())


def class_centres(features: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2μ_c, -|μ_c|²)`` per class as nc4's nearest-centre search takes them; ``-inf`` offset for absent classes."""
    counts = torch.bincount(labels, minlength=classes).double()
    sums = torch.zeros(classes, features.shape[1], dtype=torch.float64).index_add_(0, labels, features.double())
    means = sums / counts.clamp(min=1)[:, None]
    offset = torch.where(counts > 0, -(means * means).sum(1), -torch.inf)
    return 2 * means, offset


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100, 400, 1500, 4000], help="checkpoints (steps)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows per checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    text = load_corpus()
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    split = int(0.9 * data.numel())
    train, held_out = data[:split], data[split:]
    model = TinyGPT(len(tokenizer), d_model=args.d_model, n_layer=2, n_head=4, context=args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_gen, eval_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    eval_x, eval_y = random_batch(held_out, args.eval_windows, args.context, eval_gen)
    centre_x, centre_y = random_batch(train, 4 * args.eval_windows, args.context, eval_gen)
    lines = [
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; TinyGPT d_model {args.d_model}, 2 layers, context {args.context}, "
        f"{len(tokenizer)} classes; {eval_x.numel()} held-out tokens per checkpoint",
        "",
        "| step | train loss | held-out accuracy | classifier, fp32 features: tf32 / bf16 / ieee "
        "| bf16 features: exact | nearest centre, fp32: tf32 / bf16 / ieee | bf16: exact "
        "| median lead / tf32 bound (classifier) |",
        "|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    step, loss = 0, float("nan")
    for target in sorted(args.steps):
        model.train()
        while step < target:
            x, y = random_batch(train, args.batch, args.context, train_gen)
            loss_t = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss_t.backward()
            optimizer.step()
            loss, step = float(loss_t.detach()), step + 1
        model.eval()
        h = features_of(model, eval_x)
        w = model.head.weight.detach()
        zero = torch.zeros(w.shape[0])
        classifier = lead_and_bound_shares(h, w, zero)
        rows, offset = class_centres(features_of(model, centre_x), centre_y.flatten(), w.shape[0])
        centre = lead_and_bound_shares(h, rows, offset)
        scores = h.double() @ w.double().T
        top = scores.topk(2, dim=1).values
        ratio = ((top[:, 0] - top[:, 1]) / score_error_bound(h, w, zero, "tf32")).median()
        accuracy = float((scores.argmax(1) == eval_y.flatten()).double().mean())
        row = (
            f"| {step} | {loss:.3f} | {accuracy:.3f} | "
            + " / ".join(f"{classifier[o]:.1%}" for o in OPERANDS)
            + f" | {classifier['exact']:.1%} | "
            + " / ".join(f"{centre[o]:.1%}" for o in OPERANDS)
            + f" | {centre['exact']:.1%} | {float(ratio):.1f} |"
        )
        lines.append(row)
        print(row, flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
