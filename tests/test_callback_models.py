"""End to end on real models (small configs, no downloads): ``Trainer(callbacks=[GeomonCallback()]).fit(...)`` on
Hugging Face GPT-2 and Llama (eager and sdpa), a timm ViT (fused and eager), a nanoGPT-style model (flash and eager)
and ``nn.TransformerEncoder``; the values *as logged* (the CSV logger's ``metrics.csv`` and
``trainer.callback_metrics``) equal float64 references built from Q/K that the test captures itself.

The reference never goes through geomon: the test's own forward hooks on each model's projections (``c_attn``,
``q_proj`` / ``k_proj``, ``qkv``, the input of ``nn.MultiheadAttention`` with its ``in_proj_weight``) record what the
model computed during the forward passes of the measured steps (dropout included, weights of that step), rotary is
applied by hand for Llama, the mask is the one the test built into the batch, and the softmax is explicit in
float64. The logged values are, per layer: the mean entropy (nats) over batch, heads and query rows with an allowed
key; the mean of ``H / log n`` over rows with ``n >= 2`` allowed keys; the largest allowed logit
(docs/guides/monitoring.md, METRICS.md §3). Steps 0 and 2 of a 3-step fit are measured (``every_n_steps=2``), so a
value from the wrong step or the wrong weights would not match. Also checked: RankMe of the language models' head
input as logged (one batch's real tokens fill a window) against ``tests.reference.ref_rankme`` over the rows of the
real tokens (the callback leaves padding out by the batch's ``attention_mask``); left padding (rows with no key
left out); gradient accumulation (the first micro-batch is measured); ``precision="bf16-mixed"`` (float32 statistics
of the bfloat16 Q/K).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

lightning = pytest.importorskip("lightning.pytorch")

from geomon.callback import GeomonCallback  # noqa: E402
from geomon.capture import find_attention_modules  # noqa: E402
from tests.reference import ref_rankme  # noqa: E402

STEPS, EVERY = 3, 2
MEASURED = (0, 2)
SEQ, VOCAB, BATCH = 12, 50, 4
LENGTHS = (12, 9, 12, 5, 7, 12, 12, 10)  # tokens per sequence; the rest is padding (right, or left)
TOKENS = min(sum(LENGTHS[i : i + BATCH]) for i in range(0, len(LENGTHS), BATCH))  # real rows in the leanest batch
TOL = 2e-5  # float32 model activations against a float64 reference


# -- the independent reference ------------------------------------------------------------------------------------


def reference(q: Tensor, k: Tensor, allowed: Tensor, scale: float | None = None) -> dict[str, float]:
    """Mean entropy, mean normalised entropy and max logit of softmax(scale q kᵀ) over ``allowed``, in float64.

    ``q [B, H, N, Dh]``, ``k [B, Hk, N, Dh]`` (query head h reads key head h // (H / Hk)), ``allowed`` a boolean
    broadcastable to ``[B, H, N, N]``."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = allowed.expand(scores.shape)
    n_keys = allowed.sum(-1)
    rows = n_keys >= 1
    p = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    several = n_keys >= 2
    return {
        "entropy": float(entropy[rows].mean()),
        "entropy_normalized": float((entropy[several] / n_keys[several].double().log()).mean()),
        "max_logit": float(scores[allowed].max()),
    }


def causal_padding_mask(tokens: Tensor) -> Tensor:
    """``[B, 1, N, N]`` from a ``[B, N]`` attention mask (1 = token): key j allowed for query i iff j <= i and both
    are tokens. Padded query rows (left or right padding) have no allowed key: no entropy, left out of the means."""
    n = tokens.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return causal[None, None] & tokens.bool()[:, None, None, :] & tokens.bool()[:, None, :, None]


def heads(x: Tensor, n_heads: int) -> Tensor:
    """``[B, N, H·Dh] -> [B, H, N, Dh]``."""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def rotate(x: Tensor, theta: float) -> Tensor:
    """Rotary position embedding at positions 0..N-1, the half-split convention of GPT-NeoX / Llama, in float64:
    pairs (x_i, x_{i + Dh/2}) turned by the angle position · theta^(-2i/Dh)."""
    n, dim = x.shape[-2], x.shape[-1]
    inverse = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inverse[None, :]
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


# -- the recording callback: our own hooks, only during the measured steps' forward passes ------------------------


class Recorder(lightning.Callback):
    """Installs ``install(pl_module, record) -> handles`` for the forward pass of each measured step and keeps what
    the hooks put into ``record`` (plus the batch), per step."""

    def __init__(self, install: Callable[[nn.Module, dict], list]) -> None:
        self.install = install
        self.records: dict[int, dict[str, Any]] = {}
        self.handles: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        first_micro_batch = batch_idx % trainer.accumulate_grad_batches == 0
        if first_micro_batch and trainer.global_step in MEASURED:
            record = self.records[trainer.global_step] = {"batch": batch, "qk": {}}
            self.handles = self.install(pl_module, record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def on_output(record: dict, name: str, split: Callable[[Tensor], tuple[Tensor, Tensor]]):
    """A forward hook storing ``split(output)`` (detached float64 Q, K) under the attention module's name."""

    def hook(module, args, output):
        q, k = split(output.detach().double())
        record["qk"][name] = (q, k)

    return hook


# -- the Lightning side ---------------------------------------------------------------------------------------------


class Lit(lightning.LightningModule):
    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def training_step(self, batch, batch_idx):
        return self.loss(self.model, batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


@dataclass
class Case:
    model: nn.Module
    loss: Callable[[nn.Module, Any], Tensor]
    data: list  # one item per sample; the default collate stacks them
    install: Callable[[nn.Module, dict], list]
    allowed: Callable[[dict], Tensor]  # record -> boolean mask broadcastable to [B, H, N, N]
    layers: list[str]  # attention modules (names under the LightningModule)
    scale: Callable[[str], float | None] = lambda name: None
    head: str | None = None  # the output head whose input's RankMe is checked
    window_rows: int | None = None
    kinds: dict[str, str] = field(default_factory=dict)  # expected find_attention_modules() of the bare model
    precision: str = "32-true"
    accumulate: int = 1  # micro-batches per optimizer step


def fit(case: Case, tmp_path) -> tuple[Any, Recorder, GeomonCallback]:
    torch.manual_seed(0)
    module = Lit(case.model, case.loss)
    recorder = Recorder(case.install)
    callback = GeomonCallback(every_n_steps=EVERY, window_rows=case.window_rows, media=False, alerts=(), strict=True)
    trainer = lightning.Trainer(
        max_steps=STEPS,
        logger=lightning.loggers.CSVLogger(tmp_path, name="run"),
        callbacks=[recorder, callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        precision=case.precision,
        accumulate_grad_batches=case.accumulate,
    )
    loader = torch.utils.data.DataLoader(case.data, batch_size=BATCH, shuffle=False)
    trainer.fit(module, loader)
    return trainer, recorder, callback


def logged_values(trainer) -> dict[str, dict[int, float]]:
    """``metrics.csv`` read back: key -> {step: value}."""
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    values: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("geomon/") and value not in ("", None):
                values.setdefault(key, {})[int(row["step"])] = float(value)
    return values


def check(case: Case, tmp_path) -> dict[str, dict[int, float]]:
    if case.kinds:
        assert find_attention_modules(case.model) == case.kinds
    trainer, recorder, _ = fit(case, tmp_path)
    logged = logged_values(trainer)
    assert sorted(recorder.records) == list(MEASURED)
    for step, record in recorder.records.items():
        assert sorted(record["qk"]) == sorted(case.layers)
        for layer in case.layers:
            q, k = record["qk"][layer]
            expected = reference(q, k, case.allowed(record), case.scale(layer))
            for stat, value in expected.items():
                key = f"geomon/attention/{stat}/{layer}"
                assert sorted(logged[key]) == list(MEASURED), key
                assert logged[key][step] == pytest.approx(value, rel=TOL, abs=TOL), (key, step)
    last = recorder.records[MEASURED[-1]]
    for layer in case.layers:  # the trainer's view (EarlyStopping reads it) holds the last measured step's values
        for stat, value in reference(*last["qk"][layer], case.allowed(last), case.scale(layer)).items():
            metric = trainer.callback_metrics[f"geomon/attention/{stat}/{layer}"]
            assert float(metric) == pytest.approx(value, rel=TOL, abs=TOL)
    if case.head is not None:
        key = f"geomon/rankme/{case.head}.input"
        assert sorted(logged[key]) == list(MEASURED)  # one batch fills a window: a value at every measured step
        for step, record in recorder.records.items():
            rows = record["head"]
            batch = record["batch"]
            if isinstance(batch, dict) and "attention_mask" in batch:  # padding is left out
                rows = rows[batch["attention_mask"].bool()]
            rows = rows.reshape(-1, rows.shape[-1]).numpy()
            assert logged[key][step] == pytest.approx(ref_rankme(rows), rel=1e-4)
    return logged


# -- language-model data: right-padded token batches --------------------------------------------------------------


def lm_data(left_padding: bool = False) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), SEQ), generator=g)
    tokens = torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]
    if left_padding:
        tokens = tokens.flip(-1)
    ids = ids.masked_fill(~tokens, 0)
    labels = ids.masked_fill(~tokens, -100)
    return [
        {"input_ids": i, "attention_mask": m.long(), "labels": lab}
        for i, m, lab in zip(ids, tokens, labels, strict=True)
    ]


def lm_allowed(record: dict) -> Tensor:
    return causal_padding_mask(record["batch"]["attention_mask"])


def hf_loss(model: nn.Module, batch: dict) -> Tensor:
    return model(**batch).loss


def head_hook(record: dict):
    def hook(module, args):
        record["head"] = args[0].detach().double()

    return hook


# -- Hugging Face GPT-2 and Llama -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("implementation", "layer_scaled"),
    [("eager", False), ("sdpa", False), ("eager", True), ("sdpa", True)],
    ids=["eager", "sdpa", "eager-reordered-layer-scaled", "sdpa-layer-scaled"],
)
def test_gpt2_logged_entropy_equals_a_reference_from_c_attn(implementation, layer_scaled, tmp_path):
    check(gpt2_case(implementation, layer_scaled), tmp_path)


def gpt2_case(implementation: str, layer_scaled: bool = False, precision: str = "32-true") -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=32,
        eos_token_id=0,
        bos_token_id=0,
        initializer_range=0.2,  # attention far from uniform from the first step on
        scale_attn_by_inverse_layer_idx=layer_scaled,  # layer i's scale: 1 / (sqrt(Dh) (i + 1))
        reorder_and_upcast_attn=layer_scaled,  # eager: GPT-2's own baddbmm path instead of the attention function
    )  # dropout left at its default 0.1: the reference sees the forward the model really ran
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    width, head_dim = config.n_embd, config.n_embd // config.n_head
    layers = [f"model.transformer.h.{i}.attn" for i in range(2)]

    def install(pl_module, record):
        modules = dict(pl_module.named_modules())
        handles = [modules["model.lm_head"].register_forward_pre_hook(head_hook(record))]
        for name in layers:
            split = lambda out: (heads(out[..., :width], 4), heads(out[..., width : 2 * width], 4))  # noqa: E731
            handles.append(modules[name + ".c_attn"].register_forward_hook(on_output(record, name, split)))
        return handles

    def scale(layer):
        return head_dim**-0.5 / (int(layer.split(".")[-2]) + 1 if layer_scaled else 1)

    return Case(model, hf_loss, lm_data(), install, lm_allowed, layers, scale=scale, head="model.lm_head",
                window_rows=TOKENS, precision=precision,
                kinds={f"transformer.h.{i}.attn": f"hf:{implementation}" for i in range(2)})  # fmt: skip


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_llama_logged_entropy_equals_a_reference_with_rotary_and_grouped_query_heads(implementation, tmp_path):
    check(llama_case(implementation), tmp_path)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_llama_left_padding_leaves_the_query_rows_without_keys_out(implementation, tmp_path):
    """Left-padded sequences: a padded query row sees no token (causal), so it has no entropy and no max logit; the
    logged means are over the other rows (the reference drops the rows with no allowed key)."""
    case = llama_case(implementation, left_padding=True)
    tokens = torch.stack([item["attention_mask"] for item in case.data])
    assert not causal_padding_mask(tokens).any(-1).all()  # some query rows see no key
    check(case, tmp_path)


def test_gradient_accumulation_logs_the_first_micro_batch_of_each_measured_step(tmp_path):
    """Two micro-batches per optimizer step: the logged values are those of the first one alone (the recorder
    keeps only that one), not of both pooled."""
    check(llama_case("sdpa", accumulate=2), tmp_path)


def llama_case(implementation: str, accumulate: int = 1, left_padding: bool = False) -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: query heads 0, 1 read key head 0; 2, 3 read key head 1
        hidden_size=32,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # attention far from uniform from the first step on
    )
    theta = 500.0  # not the default, so a reference with the wrong frequencies would not match
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    layers = [f"model.model.layers.{i}.self_attn" for i in range(2)]

    def install(pl_module, record):
        modules = dict(pl_module.named_modules())
        handles = [modules["model.lm_head"].register_forward_pre_hook(head_hook(record))]
        for name in layers:
            parts: dict[str, Tensor] = {}

            def keep(part, n_heads, name=name, parts=parts):
                def hook(module, args, output):
                    parts[part] = rotate(heads(output.detach().double(), n_heads), theta)
                    if len(parts) == 2:
                        record["qk"][name] = (parts["q"], parts["k"])

                return hook

            handles.append(modules[name + ".q_proj"].register_forward_hook(keep("q", 4)))
            handles.append(modules[name + ".k_proj"].register_forward_hook(keep("k", 2)))
        return handles

    return Case(model, hf_loss, lm_data(left_padding), install, lm_allowed, layers, head="model.lm_head",
                window_rows=TOKENS, accumulate=accumulate,
                kinds={f"model.layers.{i}.self_attn": f"hf:{implementation}" for i in range(2)})  # fmt: skip


# -- timm ViT -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_timm_vit_logged_entropy_equals_a_reference_from_qkv(fused, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2
    )
    n_heads = model.blocks[0].attn.num_heads
    for block in model.blocks:
        block.attn.fused_attn = fused
        nn.init.normal_(block.attn.qkv.weight, std=0.1)  # attention far from uniform from the first step on
        assert isinstance(block.attn.q_norm, nn.Identity)  # no QK-norm in this model: Q, K are the qkv thirds
    width = model.embed_dim
    layers = [f"model.blocks.{i}.attn" for i in range(2)]
    g = torch.Generator().manual_seed(2)
    images, targets = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)

    def install(pl_module, record):
        modules = dict(pl_module.named_modules())
        split = lambda out: (heads(out[..., :width], n_heads), heads(out[..., width : 2 * width], n_heads))  # noqa: E731
        return [modules[n + ".qkv"].register_forward_hook(on_output(record, n, split)) for n in layers]

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    tokens = 1 + (32 // 8) ** 2  # class token and 16 patches, all visible to each other
    check(
        Case(model, loss, list(zip(images, targets, strict=True)), install,
             lambda record: torch.ones(tokens, tokens, dtype=torch.bool), layers,
             kinds={f"blocks.{i}.attn": "timm" for i in range(2)}),
        tmp_path,
    )  # fmt: skip


# -- nanoGPT-style model --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """In nanoGPT's shape (fused ``c_attn``, ``n_head``, ``n_embd``, a ``flash`` switch, attention and residual
    dropout), written for this test."""

    def __init__(self, n_embd: int, n_head: int, flash: bool, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_embd, self.n_head, self.flash, self.dropout = n_embd, n_head, flash, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.register_buffer("bias", torch.ones(SEQ, SEQ).tril().view(1, 1, SEQ, SEQ))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (heads(part, self.n_head) for part in self.c_attn(x).split(self.n_embd, dim=2))
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, flash: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, flash)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, flash: bool, n_embd: int = 32, n_head: int = 4, n_layer: int = 2) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(VOCAB, n_embd),
                "wpe": nn.Embedding(SEQ, n_embd),
                "drop": nn.Dropout(0.1),
                "h": nn.ModuleList(NanoBlock(n_embd, n_head, flash) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(n_embd),
            }
        )
        self.lm_head = nn.Linear(n_embd, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1])))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "eager"])
def test_nanogpt_logged_entropy_equals_a_reference_from_c_attn(flash, tmp_path):
    check(nanogpt_case(flash), tmp_path)


def nanogpt_case(flash: bool, precision: str = "32-true") -> Case:
    torch.manual_seed(0)
    model = NanoGPT(flash)
    layers = [f"model.transformer.h.{i}.attn" for i in range(2)]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (8, SEQ + 1), generator=g)

    def install(pl_module, record):
        modules = dict(pl_module.named_modules())
        handles = [modules["model.lm_head"].register_forward_pre_hook(head_hook(record))]
        split = lambda out: (heads(out[..., :32], 4), heads(out[..., 32:64], 4))  # noqa: E731
        handles += [modules[n + ".c_attn"].register_forward_hook(on_output(record, n, split)) for n in layers]
        return handles

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    return Case(model, loss, list(zip(ids[:, :-1], ids[:, 1:], strict=True)), install,
                lambda record: torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), layers, head="model.lm_head",
                window_rows=BATCH * SEQ, precision=precision,
                kinds={f"transformer.h.{i}.attn": "nanogpt" for i in range(2)})  # fmt: skip


# -- nn.TransformerEncoder ------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Token embedding, a causal ``nn.TransformerEncoder`` (batch_first) with a key padding mask, and a head."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        blocked = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)  # True = may not attend
        h = self.encoder(self.embed(ids), mask=blocked, src_key_padding_mask=padding, is_causal=True)
        return self.head(h)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_encoder_logged_entropy_equals_a_reference_from_in_proj(norm_first, tmp_path):
    torch.manual_seed(0)
    model = Encoder(norm_first)
    layers = [f"model.encoder.layers.{i}.self_attn" for i in range(2)]
    data = lm_data()

    def install(pl_module, record):
        modules = dict(pl_module.named_modules())

        def hook(name):
            def capture(mha, args, kwargs):  # Q, K from the module's input and its weights of this step
                x = args[0].detach().double()
                w, b = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
                q, k = x @ w[:32].T + b[:32], x @ w[32:64].T + b[32:64]
                record["qk"][name] = (heads(q, 4), heads(k, 4))

            return capture

        return [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in layers]

    def loss(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"] == 0)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    check(
        Case(model, loss, data, install, lm_allowed, layers,
             kinds={f"encoder.layers.{i}.self_attn": "torch_mha" for i in range(2)}),
        tmp_path,
    )  # fmt: skip


# -- bf16 autocast: the model computes in bfloat16, geomon's statistics of what it computed stay float32 -----------


@pytest.mark.parametrize("model", ["gpt2-sdpa", "nanogpt-eager"])
def test_bf16_mixed_fit_logs_float32_statistics_of_the_bfloat16_qk(model, tmp_path):
    """Under ``precision="bf16-mixed"`` the captured Q/K are bfloat16 and geomon's probes run inside the model's
    autocast region. The logged values must be those of the float32 (here float64) softmax of those bfloat16 Q/K:
    before the fix autocast ran geomon's own score products in bfloat16 (max logits on the bfloat16 grid, 4.5 for
    4.4912, entropies 1e-4 off)."""
    case = gpt2_case("sdpa", precision="bf16-mixed") if model == "gpt2-sdpa" else nanogpt_case(False, "bf16-mixed")
    dtypes = []
    install = case.install

    def install_and_note_dtypes(pl_module, record):
        handles = install(pl_module, record)
        for name in case.layers:
            note = lambda module, args, output: dtypes.append(output.dtype)  # noqa: E731
            handles.append(dict(pl_module.named_modules())[name + ".c_attn"].register_forward_hook(note))
        return handles

    case.install = install_and_note_dtypes
    check(case, tmp_path)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the model really ran its projections in bfloat16
