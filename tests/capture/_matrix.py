"""The model matrix of ``tests/capture/test_model_matrix.py``, as data, and the docs table rendered from it.

Each :class:`Case` is one cell: a model family built from a tiny config (random weights, no downloads), one attention
implementation, one padding side. ``build()`` returns a :class:`Setup`: the model under test, a *reference* model with
identical weights whose attention runs an explicit softmax (an eager / non-fused copy; ``nn.MultiheadAttention`` is
made to compute its weights), the batch, and which query rows are real tokens. The reference values come from the
tensors the reference model itself hands to its softmax (:func:`softmax_reference`), never from geomon.

``python -m tests.capture._matrix`` rewrites the "Supported models" table of ``docs/guides/capture.md`` from
:data:`CASES`; ``test_the_docs_table_is_the_rendered_matrix`` fails when the two differ.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DOCS = Path(__file__).resolve().parents[2] / "docs" / "guides" / "capture.md"
BEGIN, END = "<!-- model-matrix:begin -->", "<!-- model-matrix:end -->"
MASKED_AT = -1e4  # additive scores at or below this are "may not attend" (the spec's rule, restated here)
TOLERANCE = 1e-5

B = 2  # every batch: row 0 is full length, row 1 has PAD padded tokens (where the model takes masks)
PAD = 3


# -- the cells --------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What one cell runs: ``forward(model)`` on ``model`` (monitored) and on ``reference`` (explicit softmax)."""

    model: nn.Module
    reference: nn.Module
    forward: Callable[[nn.Module], Any]
    rows: dict[int, Tensor] = field(default_factory=dict)  #: query length -> [B, Nq] True for real tokens
    train: bool = False  #: run the monitored forward in training mode with grad (else eval under no_grad)


@dataclass(frozen=True)
class Case:
    family: str  #: the docs row: model family
    implementation: str  #: attention implementation of the cell
    padding: str  #: "none", "left" or "right"
    build: Callable[[str, str], Setup] = field(repr=False)  #: build(implementation, padding)
    reference: str = ""  #: what the reference softmax is, for the docs
    warns: str | None = None  #: geomon cannot capture this cell: regex of the warning it must give instead

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.family.split("(")[0].lower()).strip("-")
        return f"{slug}-{self.implementation}-{self.padding}"


def _tokens(n: int, padding: str) -> Tensor:
    """[B, n] True for real tokens: row 0 full, row 1 with PAD pad tokens on the ``padding`` side."""
    tokens = torch.ones(B, n, dtype=torch.bool)
    if padding == "right":
        tokens[1, n - PAD :] = False
    elif padding == "left":
        tokens[1, :PAD] = False
    return tokens


def _ids(n: int, vocab: int = 100, seed: int = 1) -> Tensor:
    return torch.randint(1, vocab, (B, n), generator=torch.Generator().manual_seed(seed))


# -- Hugging Face ------------------------------------------------------------------------------------------------


def _hf(config_name: str, model_name: str, **config: Any) -> Callable[[str], tuple[nn.Module, nn.Module]]:
    def make(implementation: str) -> tuple[nn.Module, nn.Module]:
        import transformers

        def one(impl: str) -> nn.Module:
            cfg = getattr(transformers, config_name)(**config)
            cfg._attn_implementation = impl
            torch.manual_seed(0)
            return getattr(transformers, model_name)(cfg).eval()

        model, reference = one(implementation), one("eager")
        reference.load_state_dict(model.state_dict())
        return model, reference

    return make


def _hf_decoder(config_name: str, model_name: str, **config: Any) -> Callable[[str, str], Setup]:
    make = _hf(config_name, model_name, **config)

    def build(implementation: str, padding: str) -> Setup:
        model, reference = make(implementation)
        n, tokens = 9, _tokens(9, padding)
        ids = _ids(n)
        return Setup(model, reference, lambda m: m(ids, attention_mask=tokens.long()), {n: tokens})

    return build


def _hf_encoder_decoder(config_name: str, model_name: str, **config: Any) -> Callable[[str, str], Setup]:
    make = _hf(config_name, model_name, **config)

    def build(implementation: str, padding: str) -> Setup:
        model, reference = make(implementation)
        n_enc, n_dec = 10, 7  # distinct lengths: a row mask is found by its query length
        enc, dec = _tokens(n_enc, padding), _tokens(n_dec, padding)
        ids, dec_ids = _ids(n_enc), _ids(n_dec, seed=2)

        def forward(m: nn.Module) -> Any:
            return m(input_ids=ids, attention_mask=enc.long(), decoder_input_ids=dec_ids,
                     decoder_attention_mask=dec.long())  # fmt: skip

        return Setup(model, reference, forward, {n_enc: enc, n_dec: dec})

    return build


def _hf_whisper(implementation: str, padding: str) -> Setup:
    """Whisper: an audio encoder over 16 frames (no mask: Whisper's encoder takes none), a decoder over 7 padded
    tokens with its cross-attention to the frames."""
    make = _hf("WhisperConfig", "WhisperModel", vocab_size=100, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, d_model=32, encoder_ffn_dim=64,
               decoder_ffn_dim=64, max_source_positions=16, max_target_positions=32, init_std=0.3, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    model, reference = make(implementation)
    features = torch.randn(B, 8, 32, generator=torch.Generator().manual_seed(1))  # 32 mel frames -> 16 positions
    n_dec = 7
    dec, dec_ids = _tokens(n_dec, padding), _ids(n_dec, seed=2)

    def forward(m: nn.Module) -> Any:
        return m(input_features=features, decoder_input_ids=dec_ids, decoder_attention_mask=dec.long())

    return Setup(model, reference, forward, {n_dec: dec})


def _hf_images(config_name: str, model_name: str, **config: Any) -> Callable[[str, str], Setup]:
    make = _hf(config_name, model_name, image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, **config)  # fmt: skip

    def build(implementation: str, padding: str) -> Setup:
        model, reference = make(implementation)
        images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        return Setup(model, reference, lambda m: m(pixel_values=images))

    return build


SMALL_LM = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
GQA = dict(SMALL_LM, num_key_value_heads=2)

# -- timm --------------------------------------------------------------------------------------------------------


def _timm(name: str, size: int, **kwargs: Any) -> Callable[[str, str], Setup]:
    def build(implementation: str, padding: str) -> Setup:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=size, num_classes=10, **kwargs).eval()
        reference = copy.deepcopy(model)
        for m, r in zip(model.modules(), reference.modules(), strict=True):
            if hasattr(m, "fused_attn"):
                m.fused_attn, r.fused_attn = implementation == "fused", False
        images = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1))
        return Setup(model, reference, lambda m: m(images))

    return build


# -- torch nn.MultiheadAttention models ------------------------------------------------------------------------


def _torchvision_vit(implementation: str, padding: str) -> Setup:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return Setup(model, copy.deepcopy(model), lambda m: m(images), train=implementation == "train")


def _nn_transformer(implementation: str, padding: str) -> Setup:
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                           dropout=0.0, batch_first=True)  # fmt: skip
    n_src, n_tgt = 10, 7
    src = torch.randn(B, n_src, 32, generator=torch.Generator().manual_seed(1))
    tgt = torch.randn(B, n_tgt, 32, generator=torch.Generator().manual_seed(2))
    src_tokens = _tokens(n_src, padding)
    tgt_tokens = _tokens(n_tgt, "right" if padding != "none" else "none")  # see CASES: causal + left = no keys
    causal = nn.Transformer.generate_square_subsequent_mask(n_tgt)

    def forward(m: nn.Module) -> Any:
        return m(src, tgt, tgt_mask=causal, src_key_padding_mask=~src_tokens, tgt_key_padding_mask=~tgt_tokens,
                 memory_key_padding_mask=~src_tokens)  # fmt: skip

    return Setup(model, copy.deepcopy(model), forward, {n_src: src_tokens, n_tgt: tgt_tokens},
                 train=implementation == "train")  # fmt: skip


def _lightning_demo(implementation: str, padding: str) -> Setup:
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=100, ninp=32, nhead=2, nhid=64, nlayers=2, dropout=0.0)
    ids, target = _ids(8), _ids(8, seed=2)
    return Setup(model, copy.deepcopy(model), lambda m: m(ids, target), train=implementation == "train")


# -- x-transformers ----------------------------------------------------------------------------------------------


def _x_transformers(implementation: str, padding: str) -> Setup:
    from x_transformers import Decoder, TransformerWrapper

    def make(flash: bool) -> nn.Module:
        torch.manual_seed(0)
        return TransformerWrapper(num_tokens=100, max_seq_len=16,
                                  attn_layers=Decoder(dim=32, depth=2, heads=4, attn_flash=flash)).eval()  # fmt: skip

    model, reference = make(implementation == "flash"), make(False)
    reference.load_state_dict(model.state_dict())
    n, tokens = 9, _tokens(9, padding)
    ids = _ids(n)
    return Setup(model, reference, lambda m: m(ids, mask=tokens), {n: tokens})


# -- the matrix --------------------------------------------------------------------------------------------------

HF_IMPLEMENTATIONS = ("eager", "sdpa")
PADDINGS = ("left", "right")
EAGER_REF = "the eager copy's softmax input"


def _cells(family: str, build: Callable, implementations: tuple[str, ...], paddings: tuple[str, ...],
           reference: str, **extra: Any) -> list[Case]:  # fmt: skip
    return [Case(family, i, p, build, reference, **extra) for i in implementations for p in paddings]


CASES: list[Case] = [
    *_cells(
        "Hugging Face GPT-2 (`GPT2LMHeadModel`)",
        _hf_decoder("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32),
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face Llama (`LlamaForCausalLM`, grouped-query)",
        _hf_decoder("LlamaConfig", "LlamaForCausalLM", **GQA),
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face Mistral (`MistralForCausalLM`, grouped-query, sliding window 4)",
        _hf_decoder("MistralConfig", "MistralForCausalLM", **GQA, sliding_window=4),
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face BERT (`BertModel`)",
        _hf_decoder("BertConfig", "BertModel", **SMALL_LM),
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face Falcon with ALiBi (`FalconForCausalLM`, `alibi=True`)",
        _hf_decoder(
            "FalconConfig",
            "FalconForCausalLM",
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            new_decoder_architecture=False,
            multi_query=False,
        ),
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face Bloom (`BloomForCausalLM`: ALiBi)",
        _hf_decoder("BloomConfig", "BloomForCausalLM", vocab_size=100, hidden_size=64, n_layer=2, n_head=4),
        ("eager",),
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face MPT (`MptForCausalLM`: ALiBi)",
        _hf_decoder("MptConfig", "MptForCausalLM", vocab_size=100, d_model=64, n_layers=2, n_heads=4, max_seq_len=32),
        ("eager",),
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face Gemma 2 (`Gemma2ForCausalLM`: logit soft-capping)",
        _hf_decoder(
            "Gemma2Config", "Gemma2ForCausalLM", **GQA, head_dim=16, attn_logit_softcapping=5.0, sliding_window=4
        ),
        ("eager",),
        ("right",),
        EAGER_REF,
        warns="uses logit soft-capping, which attention entropy does not model",
    ),
    *_cells(
        "Hugging Face T5 (`T5ForConditionalGeneration`: encoder, decoder self and cross attention)",
        _hf_encoder_decoder(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=100,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        ),
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face BART (`BartForConditionalGeneration`: encoder, decoder self and cross attention)",
        _hf_encoder_decoder(
            "BartConfig",
            "BartForConditionalGeneration",
            vocab_size=100,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=32,
        ),
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face Whisper (`WhisperModel`: audio encoder, decoder self and cross attention; decoder padded)",
        _hf_whisper,
        HF_IMPLEMENTATIONS,
        PADDINGS,
        EAGER_REF,
    ),
    *_cells(
        "Hugging Face ViT (`ViTModel`)", _hf_images("ViTConfig", "ViTModel"), HF_IMPLEMENTATIONS, ("none",), EAGER_REF
    ),
    *_cells(
        "Hugging Face BEiT (`BeitModel`: relative position bias)",
        _hf_images("BeitConfig", "BeitModel", use_relative_position_bias=True, initializer_range=0.3),
        HF_IMPLEMENTATIONS,
        ("none",),
        EAGER_REF,
    ),
    *_cells(
        "timm ViT (`vit_tiny_patch16_224`, 32 px, depth 2)",
        _timm("vit_tiny_patch16_224", 32, depth=2),
        ("fused", "not-fused"),
        ("none",),
        "the non-fused copy's softmax input",
    ),
    *_cells(
        "timm EVA (`eva02_tiny_patch14_224`, 28 px, depth 2: rotary)",
        _timm("eva02_tiny_patch14_224", 28, depth=2),
        ("fused",),
        ("none",),
        "the non-fused copy's softmax input",
    ),
    *_cells(
        "timm EVA (`eva02_tiny_patch14_224`, 28 px, depth 2: rotary)",
        _timm("eva02_tiny_patch14_224", 28, depth=2),
        ("not-fused",),
        ("none",),
        "the non-fused copy's softmax input",
    ),
    *_cells(
        "timm Swin (`swin_tiny_patch4_window7_224`, 56 px: windows, relative position bias)",
        _timm("swin_tiny_patch4_window7_224", 56, embed_dim=32, depths=(1, 1), num_heads=(2, 4)),
        ("fused",),
        ("none",),
        "the non-fused copy's softmax input",
    ),
    *_cells(
        "timm Swin (`swin_tiny_patch4_window7_224`, 56 px: windows, relative position bias)",
        _timm("swin_tiny_patch4_window7_224", 56, embed_dim=32, depths=(1, 1), num_heads=(2, 4)),
        ("not-fused",),
        ("none",),
        "the non-fused copy's softmax input",
    ),
    *_cells(
        "torchvision ViT (`VisionTransformer`, `nn.MultiheadAttention`)",
        _torchvision_vit,
        ("train", "eval"),
        ("none",),
        "the module's softmax input with `need_weights=True`",
    ),
    *_cells(
        "`nn.Transformer` (encoder, decoder self and cross attention; target padded on the right)",
        _nn_transformer,
        ("train",),
        PADDINGS,
        "the module's softmax input with `need_weights=True`",
    ),
    *_cells(
        "`nn.Transformer` (encoder, decoder self and cross attention; target padded on the right)",
        _nn_transformer,
        ("eval",),
        PADDINGS,
        "the module's softmax input with `need_weights=True`",
    ),
    *_cells(
        "Lightning demo `Transformer` (`lightning.pytorch.demos`)",
        _lightning_demo,
        ("train",),
        ("none",),
        "the module's softmax input with `need_weights=True`",
    ),
    *_cells(
        "Lightning demo `Transformer` (`lightning.pytorch.demos`)",
        _lightning_demo,
        ("eval",),
        ("none",),
        "the module's softmax input with `need_weights=True`",
    ),
    *_cells(
        "x-transformers (`TransformerWrapper` + `Decoder`)",
        _x_transformers,
        ("not-flash", "flash"),
        PADDINGS,
        "the non-flash copy's softmax input",
    ),
]


# -- the reference: what the model hands to its softmax ----------------------------------------------------------


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or name == "Attend"


@contextlib.contextmanager
def _softmax_inputs(model: nn.Module) -> Iterator[list[tuple[str, Tensor]]]:
    """Record ``(innermost attention module, scores)`` for every softmax over the last dim inside ``model``.

    Wraps ``F.softmax``, ``torch.softmax`` and ``Tensor.softmax`` (the outermost call of a nested chain is recorded
    once), tracks the running attention modules with forward hooks on the reference model, and makes
    ``nn.MultiheadAttention`` compute its weights (``need_weights=True``: the explicit-softmax path)."""
    names = {id(m): n for n, m in model.named_modules() if _is_attention(m)}
    running: list[str] = []
    seen: list[tuple[str, Tensor]] = []
    depth = [0]
    handles = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(names[id(module)])

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    for module in model.modules():
        if id(module) in names:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))

    def wrap(original: Callable) -> Callable:
        def softmax(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            dim = kwargs.get("dim", args[0] if args else None)
            if depth[0] == 0 and running and isinstance(x, Tensor) and dim in (-1, x.dim() - 1):
                seen.append((running[-1], x.detach().double().clone()))
            depth[0] += 1
            try:
                return original(x, *args, **kwargs)
            finally:
                depth[0] -= 1

        return softmax

    mha_forward = nn.MultiheadAttention.forward

    def weights_forward(self: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(need_weights=True, average_attn_weights=False)
        return mha_forward(self, *args, **kwargs)

    originals = (F.softmax, torch.softmax, Tensor.softmax)
    own = "softmax" in vars(Tensor)  # the method is TensorBase's: restored by deleting the wrapper, not by assigning
    F.softmax, torch.softmax, Tensor.softmax = (wrap(f) for f in originals)  # type: ignore[assignment]
    nn.MultiheadAttention.forward = weights_forward  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        F.softmax, torch.softmax, Tensor.softmax = originals  # type: ignore[assignment]
        if not own:
            del Tensor.softmax
        nn.MultiheadAttention.forward = mha_forward  # type: ignore[method-assign]
        for handle in handles:
            handle.remove()


def softmax_reference(setup: Setup) -> dict[str, tuple[float, float]]:
    """``{attention module: (mean entropy, max logit)}`` over real query rows, from the reference model's softmax.

    Scores at or below ``MASKED_AT`` (or -inf) are keys that may not be attended; rows of padding tokens (the row
    masks of the batch built here) are left out; the entropy of each row is computed in float64."""
    model = setup.reference.train(setup.train)
    with torch.enable_grad(), _softmax_inputs(model) as seen:  # grad on: no fused inference fast path
        setup.forward(model)
    rows: dict[str, list[Tensor]] = {}
    maxima: dict[str, list[Tensor]] = {}
    for name, scores in seen:
        n_q, n_k = scores.shape[-2:]
        scores = scores.reshape(B, -1, n_q, n_k)  # batch-major in every model here (B·H for nn.MultiheadAttention)
        allowed = scores > MASKED_AT
        real = setup.rows.get(n_q, torch.ones(B, n_q, dtype=torch.bool))[:, None, :].expand(allowed.shape[:-1])
        assert allowed[real].any(-1).all(), f"{name}: a real token's query row has no key it may attend"
        logits = scores.masked_fill(~allowed, -math.inf)
        p = torch.softmax(logits, dim=-1)
        entropy = -torch.special.xlogy(p, p).sum(-1)
        rows.setdefault(name, []).append(entropy[real])
        maxima.setdefault(name, []).append(logits.amax(-1)[real])
    return {name: (float(torch.cat(rows[name]).mean()), float(torch.cat(maxima[name]).max())) for name in rows}


# -- the docs table ----------------------------------------------------------------------------------------------


def _status(cases: list[Case]) -> str:
    if all(c.warns is None for c in cases):
        return "exact (1e-5)"
    if all(c.warns is not None for c in cases):
        return "not captured: warned"
    return "partly: " + "; ".join(sorted({c.warns for c in cases if c.warns}))


def render(cases: list[Case] = CASES) -> str:
    """The markdown table of the matrix: one row per family and implementation, the paddings tested."""
    lines = ["| model | implementation | padding | logged entropy and max logit | checked against |",
             "|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.family, case.implementation), []).append(case)
    for (family, implementation), group in groups.items():
        padding = ", ".join(c.padding for c in group)
        lines.append(f"| {family} | `{implementation}` | {padding} | {_status(group)} | {group[0].reference} |")
    return "\n".join(lines)


def docs_table(text: str) -> str:
    """The table between the matrix markers of the docs."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


def write_docs() -> None:
    text = DOCS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + render() + "\n" + text[end:])


if __name__ == "__main__":
    write_docs()
    sys.stdout.write(render() + "\n")
