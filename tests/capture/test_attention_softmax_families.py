"""More families whose attention is written by hand, read at its own softmax (tiny configs, eager: these Hugging Face
models have no sdpa). Hugging Face text models equal their own returned probabilities per layer and head with right
padding, padded query rows left out in self-attention; Swin V2 equals each block's own probabilities (its shifted
window mask included); timm models equal the scores each module hands to its softmax, with their fused paths off.
References: the models' own probabilities (``output_attentions=True``) and softmax inputs, in float64."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from geomon.keys import ENTROPY, MAX_LOGIT, key
from tests.capture._reference import (
    entropy_of,
    measure_once,
    own_softmax_entropy,
    returned_probabilities,
    softmax_inputs,
    tiny_hf_model,
)

B, N, PADDED = 2, 9, 3
TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _hf(config_name: str, model_name: str, **config) -> nn.Module:
    return tiny_hf_model(config_name, model_name, initializer_range=0.3, **config)


def _logged_layers(values: dict) -> list[str]:
    return sorted(name.removeprefix(key(ENTROPY, "")) for name in values if name.startswith(key(ENTROPY, "")))


def _assert_layer_equals(values: dict, details: dict, layer: str, entropy: torch.Tensor, real: torch.Tensor) -> None:
    """The layer's per-head and mean entropy equal the float64 entropies ``[B', H, Nq]`` over the ``real`` rows."""
    heads = entropy.shape[1]
    per_head = torch.stack([entropy[:, h][real[:, h]].mean() for h in range(heads)])
    torch.testing.assert_close(details[key(ENTROPY, layer)].double(), per_head, rtol=1e-5, atol=1e-6)
    assert values[key(ENTROPY, layer)] == pytest.approx(float(entropy[real].mean()), rel=1e-5)


@pytest.mark.parametrize(
    ("config_name", "model_name", "config"),
    [
        pytest.param("DebertaConfig", "DebertaModel",
                     dict(TEXT, relative_attention=True, max_relative_positions=16, pos_att_type=["p2c", "c2p"]),
                     id="deberta"),
        pytest.param("BigBirdConfig", "BigBirdModel", dict(TEXT, attention_type="original_full"), id="bigbird-full"),
        # block 2 pools its queries (5 of them over 9 keys): rows of unequal length keep every query row
        pytest.param("FunnelConfig", "FunnelBaseModel",
                     dict(vocab_size=100, block_sizes=[1, 1], d_model=32, n_head=4, d_head=8, d_inner=64),
                     id="funnel"),
        pytest.param("MPNetConfig", "MPNetModel", TEXT, id="mpnet"),
        pytest.param("ConvBertConfig", "ConvBertModel", dict(TEXT, embedding_size=32), id="convbert"),
        pytest.param("RemBertConfig", "RemBertModel",
                     dict(TEXT, input_embedding_size=32, output_embedding_size=32, bos_token_id=1, eos_token_id=2),
                     id="rembert"),
        pytest.param("XLMConfig", "XLMModel",
                     dict(vocab_size=100, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=64), id="xlm"),
        pytest.param("RoFormerConfig", "RoFormerModel", dict(TEXT, embedding_size=32), id="roformer"),
        pytest.param("MegatronBertConfig", "MegatronBertModel", TEXT, id="megatron-bert"),
        pytest.param("LukeConfig", "LukeModel", dict(TEXT, entity_vocab_size=10, entity_emb_size=16), id="luke"),
        # its output_attentions are the scores before the softmax
        pytest.param("SqueezeBertConfig", "SqueezeBertModel", dict(TEXT, embedding_size=32), id="squeezebert"),
    ],
)  # fmt: skip
def test_hugging_face_text_families_equal_their_own_probabilities(config_name, model_name, config):
    model = _hf(config_name, model_name, **config)
    ids = torch.randint(4, 100, (B, N), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, N, dtype=torch.long)
    keep[1, -PADDED:] = 0  # right padding
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=keep, output_attentions=True).attentions
    values, details, said = measure_once(model, input_ids=ids, attention_mask=keep)
    assert not said, said
    layers = _logged_layers(values)
    assert len(layers) == len(own) == 2, layers
    for layer, p in zip(layers, own, strict=True):
        if model_name == "SqueezeBertModel":
            p = torch.softmax(p.double(), dim=-1)
        entropy = entropy_of(p)
        heads, n_q, n_k = p.shape[1:]
        if n_q == n_k:  # self-attention: padded tokens' query rows are left out
            real = keep.bool()[:, None, :].expand(B, heads, n_q)
        else:
            real = torch.ones(B, heads, n_q, dtype=torch.bool)
        _assert_layer_equals(values, details, layer, entropy, real)


def test_hugging_face_swin_v2_equals_each_blocks_own_probabilities():
    transformers = pytest.importorskip("transformers")
    config = transformers.Swinv2Config(
        image_size=16, patch_size=2, embed_dim=32, depths=[2], num_heads=[4], window_size=4, initializer_range=0.3
    )  # 8x8 patches in four 4x4 windows; the second block shifts them, its mask at -100
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Swinv2Model(config).eval()
    x = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # a stage returns only its last block's probabilities: each block's are read where its attention returns them
    own = returned_probabilities(model, "Swinv2SelfAttention", pixel_values=x)
    values, details, said = measure_once(model, pixel_values=x)
    assert not said, said
    assert _logged_layers(values) == sorted(own) and len(own) == 2, (sorted(own), said)
    for layer, p in own.items():
        assert p.shape == (B * 4, 4, 16, 16)  # windows fold into the batch
        entropy = entropy_of(p)
        _assert_layer_equals(values, details, layer, entropy, torch.ones_like(entropy, dtype=torch.bool))


@pytest.mark.parametrize(
    ("module_name", "class_name", "config", "size"),
    [
        # outlook attention ([B, H, h·w, k², k²] per location), then self-attention, then class attention
        pytest.param("volo", "VOLO",
                     dict(img_size=32, layers=(1, 1), embed_dims=(32, 64), num_heads=(2, 4), downsamples=(True, False),
                          outlook_attention=(True, False), stem_hidden_dim=16, post_layers=("ca",)), 32, id="volo"),
        # window attention (an nn.Softmax module) and channel attention in each stage
        pytest.param("davit", "DaVit", dict(depths=(1, 1), embed_dims=(32, 64), num_heads=(2, 4), window_size=4), 32,
                     id="davit"),
        # local window attention, then global-query attention, in each stage
        pytest.param("gcvit", "GlobalContextVit",
                     dict(img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32, window_ratio=(8, 8)), 64,
                     id="gcvit"),
        pytest.param("beit", "Beit",
                     dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_rel_pos_bias=True), 32,
                     id="beit"),
        # locally grouped windows ([B, windows, H, N, N]) and sub-sampled keys, alternately
        pytest.param("twins", "Twins",
                     dict(img_size=32, embed_dims=(32, 64), num_heads=(2, 4), depths=(2, 2), sr_ratios=(2, 1),
                          wss=(4, 4), mlp_ratios=(2, 2)), 32, id="twins"),
        pytest.param("nest", "Nest",
                     dict(img_size=32, num_levels=2, embed_dims=(32, 64), num_heads=(2, 4), depths=(1, 1)), 32,
                     id="nest"),
        # mask-unit attention ([B, H, units, N, N]) with pooled queries, then global attention
        pytest.param("hiera", "Hiera",
                     dict(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 1), q_pool=1, mask_unit_size=(4, 4),
                          mask_unit_attn=(True, False), global_pos_size=(4, 4)), 64, id="hiera"),
    ],
)  # fmt: skip
def test_timm_families_written_by_hand_log_their_own_softmax(module_name, class_name, config, size):
    pytest.importorskip("timm")
    family = importlib.import_module(f"timm.models.{module_name}")
    torch.manual_seed(0)
    model = getattr(family, class_name)(num_classes=10, **config).eval()
    for module in model.modules():
        if isinstance(module, nn.Linear):  # maps far from uniform, so that a misread row shows
            nn.init.normal_(module.weight, std=0.3)
        if hasattr(module, "fused_attn"):  # every attention by hand: the reference sees softmax calls only
            module.fused_attn = False
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    want = own_softmax_entropy(model, x)
    values, _, said = measure_once(model, x)
    got = {n.removeprefix(key(ENTROPY, "")): v for n, v in values.items() if n.startswith(key(ENTROPY, ""))}
    assert got.keys() == want.keys() and len(want) >= 2, (sorted(got.keys() ^ want.keys()), said)
    for layer, value in want.items():
        assert got[layer] == pytest.approx(value, rel=1e-5), layer


def test_hugging_face_blip_text_cross_attention_leaves_out_padded_query_rows():
    """BLIP's text encoder (BERT-style attention by hand, no sdpa) attends from right-padded text to the image
    patches: its cross-attention's padded text rows are left out as in every other implementation's
    cross-attention (BART, T5, Whisper through the attention interface), per layer and head."""
    transformers = pytest.importorskip("transformers")
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, initializer_range=0.3)  # fmt: skip
    text = dict(TEXT, num_hidden_layers=1, encoder_hidden_size=32, initializer_range=0.3)
    config = transformers.BlipConfig(text_config=text, vision_config=vision, initializer_range=0.3)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BlipForImageTextRetrieval(config).eval()
    ids = torch.randint(4, 100, (B, N), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, N, dtype=torch.long)
    keep[1, -PADDED:] = 0
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    values, details, said = measure_once(model, input_ids=ids, attention_mask=keep, pixel_values=images)
    assert not said, said
    layer = "text_encoder.encoder.layer.0.crossattention.self"
    # the retrieval model returns no cross-attention probabilities: the scores the module hands its softmax
    (scores,) = softmax_inputs(model, input_ids=ids, attention_mask=keep, pixel_values=images)[layer]
    assert scores.shape == (B, 4, N, 17)  # text queries over the CLS token and 16 patches
    entropy = entropy_of(torch.softmax(scores, dim=-1))
    real = keep.bool()[:, None, :].expand_as(entropy)
    _assert_layer_equals(values, details, layer, entropy, real)


def test_hugging_face_prophetnet_declares_num_attn_heads_and_equals_its_own_scores():
    """ProphetNet declares its heads as ``num_attn_heads``. Its encoder self-attention (right padding) and the
    decoder's cross-attention (main and predicting streams: 7 + 2·7 query rows) equal the softmax of the scores it
    returns as its attentions, per head; its n-gram self-attention (a main and a predicting-stream softmax in one
    call) is reported too, under its name and ``<module>.ngram``, and nothing is said
    (``test_attention_softmax_streams.py`` compares those streams)."""
    model = _hf("ProphetNetConfig", "ProphetNetModel", vocab_size=100, hidden_size=32, encoder_ffn_dim=64,
                decoder_ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=4,
                num_decoder_attention_heads=4, max_position_embeddings=64, ngram=2, num_buckets=8,
                relative_max_distance=16)  # fmt: skip
    ids = torch.randint(4, 100, (B, N), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, N, dtype=torch.long)
    keep[1, -PADDED:] = 0
    inputs = dict(input_ids=ids, attention_mask=keep, decoder_input_ids=ids[:, :7].clone())
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)  # its "attentions" are the scores before the softmax
    values, details, said = measure_once(model, **inputs)
    assert not said, said
    assert _logged_layers(values) == ["decoder.layers.0.cross_attn", "decoder.layers.0.self_attn",
                                      "decoder.layers.0.self_attn.ngram", "encoder.layers.0.self_attn"]  # fmt: skip
    (encoder,), (cross,) = out.encoder_attentions, out.cross_attentions
    assert cross.shape == (B, 4, 21, N)
    real = keep.bool()[:, None, :].expand(B, 4, N)
    entropy = entropy_of(torch.softmax(encoder.double(), dim=-1))
    _assert_layer_equals(values, details, "encoder.layers.0.self_attn", entropy, real)
    entropy = entropy_of(torch.softmax(cross.double(), dim=-1))
    _assert_layer_equals(values, details, "decoder.layers.0.cross_attn", entropy, torch.ones_like(entropy).bool())


@pytest.mark.parametrize(
    ("module_name", "class_name", "config", "fused"),
    [
        # single-head modulation attention, windowed: scores [B·windows, N, N]; its fused path calls SDPA [B, 1, N, D]
        pytest.param("iformer", "SHMA", dict(dim=16, window_size=4), (True, False), id="iformer-shma"),
        pytest.param("iformer", "SHMA", dict(dim=16), (True, False), id="iformer-shma-global"),
        pytest.param("shvit", "SHSA", dict(dim=16, qk_dim=8, pdim=8), (None,), id="shvit-shsa"),
    ],
)  # fmt: skip
def test_timm_single_head_attention_is_one_head_on_both_paths(module_name, class_name, config, fused):
    """timm's single-head attention declares no head count: its scores ``[B, Nq, Nk]`` are one head, on its
    non-fused path as on its fused SDPA call ``[B, 1, N, D]``, so that both paths report the layer."""
    pytest.importorskip("timm")
    family = importlib.import_module(f"timm.models.{module_name}")
    torch.manual_seed(0)
    layer = nn.ModuleDict({"attn": getattr(family, class_name)(**config)}).eval()
    for parameter in layer.parameters():
        nn.init.normal_(parameter, std=0.4)
    model = _Call(layer)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    if fused[0] is not None:
        layer["attn"].fused_attn = False
    scores = softmax_inputs(model, x)["attn.attn"]
    assert len(scores) == 1 and scores[0].ndim == 3
    p = torch.softmax(scores[0], -1)
    entropy, max_logit = -torch.special.xlogy(p, p).sum(-1), scores[0].amax(-1)
    for path in fused:
        if path is not None:
            layer["attn"].fused_attn = path
        values, details, said = measure_once(model, x)
        assert not [m for m in said if "attn.attn" in m], said
        per_head = details[key(ENTROPY, "attn.attn")].double()
        torch.testing.assert_close(per_head, entropy.mean()[None], rtol=1e-5, atol=1e-6)
        assert values[key(MAX_LOGIT, "attn.attn")] == pytest.approx(float(max_logit.max()), rel=1e-5)


class _Call(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.attn = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn["attn"](x)


def test_hugging_face_timesfm_default_eager_function_is_read_at_its_softmax():
    """TimesFM asks the attention interface for ``simple_eager_attention_forward`` as its default, a function geomon
    does not wrap (it wraps ``eager_attention_forward``): its eager attention is read at the module's softmax. The
    second series' first patch is padding (causal over 4 patches): that key is masked for every row, so its query
    row is left out; per layer and head against the scores the module hands its softmax."""
    model = tiny_hf_model("TimesFmConfig", "TimesFmModel", patch_length=4, context_length=16, horizon_length=4,
                          hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          head_dim=8)  # fmt: skip
    with torch.no_grad():  # weights large enough that no map is near uniform
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
    padding = torch.zeros(B, 16)
    padding[1, :4] = 1  # the second series' first patch
    inputs = dict(past_values=torch.randn(B, 16, generator=torch.Generator().manual_seed(1)),
                  past_values_padding=padding, freq=torch.zeros(B, 1, dtype=torch.long))  # fmt: skip
    values, details, said = measure_once(model, **inputs)
    assert not said, said
    scores = softmax_inputs(model, **inputs)
    assert _logged_layers(values) == sorted(scores) == ["layers.0.self_attn", "layers.1.self_attn"]
    for layer, (s,) in scores.items():
        assert s.shape == (B, 4, 4, 4)
        real = (s > -1e4).any(dim=(1, 2))  # [B, patches]: keys some row may attend to; the others are padding
        assert real.tolist() == [[True] * 4, [False, True, True, True]]
        entropy = entropy_of(torch.softmax(s, dim=-1))
        _assert_layer_equals(values, details, layer, entropy, real[:, None, :].expand_as(entropy))


@pytest.mark.parametrize("fused", [True, False])
def test_timm_differential_attention_pools_each_heads_two_components_on_both_paths(fused):
    """timm's ``DiffAttention`` computes two component softmaxes per head: two SDPA calls of ``H`` heads on its fused
    path, one softmax over ``[B, 2H, N, N]`` (head ``h``'s components at ``2h`` and ``2h + 1``) on the other. Both
    paths report ``H`` heads, each pooling its two components (the float64 softmax of the non-fused path's scores),
    say what that means once, and do not take the two calls for a layer run twice."""
    timm = pytest.importorskip("timm")
    if "vit_dwee_patch16_reg1_gap_256" not in timm.list_models():
        pytest.skip(f"timm {timm.__version__} has no vit_dwee_patch16_reg1_gap_256 (differential attention)")
    torch.manual_seed(0)
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, img_size=32, depth=2).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
    heads = model.blocks[0].attn.num_heads
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for block in model.blocks:
        block.attn.fused_attn = False
    scores = softmax_inputs(model, x)
    for block in model.blocks:
        block.attn.fused_attn = fused
    values, details, said = measure_once(model, x)
    assert _logged_layers(values) == ["blocks.0.attn", "blocks.1.attn"] == sorted(scores)
    for layer, (s,) in scores.items():
        assert s.shape[1] == 2 * heads
        s = s.unflatten(1, (heads, 2))  # [B, H, 2, N, N]
        entropy = entropy_of(torch.softmax(s, dim=-1)).transpose(1, 2).flatten(0, 1)  # [B·2, H, N]
        _assert_layer_equals(values, details, layer, entropy, torch.ones_like(entropy).bool())
        assert values[key(MAX_LOGIT, layer)] == pytest.approx(float(s.amax()), rel=1e-5)
    assert not [m for m in said if "more than once" in m], said
    notes = [m for m in said if "differential attention" in m]
    assert len(notes) == 2 and all("pools the entropy and max logit of its two component softmaxes" in m for m in notes)


@pytest.mark.parametrize("size", [8, 16], ids=["as-many-blocks-as-heads", "more-blocks"])
def test_timm_halo_attention_folds_its_heads_into_the_first_dimension(size):
    """timm's ``HaloAttn`` takes its softmax over ``[B·H, blocks, Nq, Nk]`` scores (blocks of queries, each over its
    haloed window of keys): read as ``[B, H, blocks, Nq, Nk]``, each head pooling its blocks, equal per head to the
    float64 softmax of those scores, also where there are as many blocks as heads (8 px: 4 blocks of 4x4, 4 heads)."""
    halo = pytest.importorskip("timm.layers.halo_attn")
    torch.manual_seed(0)
    layer = nn.ModuleDict({"attn": halo.HaloAttn(dim=16, num_heads=4, block_size=4, halo_size=1)}).eval()
    for parameter in layer.parameters():
        nn.init.normal_(parameter, std=0.5)
    model = _Call(layer)
    x = torch.randn(B, 16, size, size, generator=torch.Generator().manual_seed(1))
    (scores,) = softmax_inputs(model, x)["attn.attn"]
    assert scores.shape == (B * 4, (size // 4) ** 2, 16, 36)
    values, details, said = measure_once(model, x)
    assert not [m for m in said if "attn.attn" in m], said
    entropy = entropy_of(torch.softmax(scores, dim=-1)).unflatten(0, (B, 4)).transpose(1, 2).flatten(0, 1)
    _assert_layer_equals(values, details, "attn.attn", entropy, torch.ones_like(entropy).bool())  # [B·blocks, H, N]
    assert values[key(MAX_LOGIT, "attn.attn")] == pytest.approx(float(scores.amax()), rel=1e-5)
