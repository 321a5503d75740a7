"""How much padding moves RankMe when it is counted: tiny random GPT-2 and Llama (D = 64, 2 layers) from configs,
right-padded batches of 32 x 64 tokens at three shares of padding; RankMe and centred RankMe of the head's input over
every position and over the real tokens alone, in float64 (``torch.linalg``). CPU, seconds.

Run from the repository root: ``python benchmarks/rankme_padding.py``; it prints a markdown table.
"""

from __future__ import annotations

import torch


def rankme(z: torch.Tensor, centered: bool = False, eps: float = 1e-7) -> float:
    """RankMe (METRICS.md §1): exp of the entropy of the normalised singular values (centred: of the covariance's
    eigenvalues)."""
    z = z.double()
    if centered:
        z = z - z.mean(0)
        spectrum = torch.linalg.eigvalsh(z.T @ z / (len(z) - 1)).flip(0).clamp(min=0)[: min(z.shape)]
    else:
        spectrum = torch.linalg.svdvals(z)
    p = spectrum / spectrum.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def models() -> list[tuple[str, torch.nn.Module]]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    llama = LlamaForCausalLM(config)
    return [("GPT-2", gpt2.eval()), ("Llama", llama.eval())]


def main() -> None:
    batch, length = 32, 64
    print("| model | padding | RankMe, every position | RankMe, real tokens | centred, every position | "
          "centred, real tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, model in models():
        seen: dict[str, torch.Tensor] = {}
        hook = model.get_output_embeddings().register_forward_hook(
            lambda m, args, out, seen=seen: seen.update(x=args[0])
        )
        gen = torch.Generator().manual_seed(1)
        for share in (0.3, 0.45, 0.6):
            lengths = (torch.rand(batch, generator=gen) * 2 * (1 - share) * length).clamp(4, length).long()
            mask = (torch.arange(length)[None] < lengths[:, None]).long()
            ids = torch.randint(0, 500, (batch, length), generator=gen) * mask  # pad id 0
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            rows = seen["x"].reshape(-1, seen["x"].shape[-1])
            real = rows[mask.reshape(-1).bool()]
            print(f"| {name} | {1 - mask.float().mean():.0%} | {rankme(rows):.2f} | {rankme(real):.2f} | "
                  f"{rankme(rows, True):.2f} | {rankme(real, True):.2f} |")  # fmt: skip
        hook.remove()


if __name__ == "__main__":
    main()
