"""Overlapping capture blocks (two monitors on two models, nested blocks) share each patched function: one
dispatcher, every block sees exactly its own model's calls, and the last block to exit restores the original object
whatever the order of exits, also when an exception leaves the blocks; a function someone else put in place after
geomon is left there. Originals are checked by identity before, during and after. References: float64 softmax rows
from the models' own weights."""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geomon.capture import AttentionCall, capture_attention, capture_sdpa
from geomon.capture import _session as session_module
from tests.capture._reference import ORIGINAL_SDPA, assert_clean, assert_rows_close, rows_of, softmax_rows

E, HEADS = 16, 2


class _SdpaAttention(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention, looked up at call time."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, HEADS, E // HEADS)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


class _Mha(nn.Module):
    """nn.MultiheadAttention on its SDPA path (need_weights=False, training mode: no fused fast path)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _qk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 Q and K [B, H, L, Dh] from a packed in-projection (rows: Q, K, V)."""
    qkv = x.double() @ weight.double().T + bias.double()
    q, k = (t.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2) for t in qkv.split(E, dim=-1)[:2])
    return q, k


def _sdpa_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(_SdpaAttention(), _SdpaAttention()), _Mha()


@contextmanager
def _overlapping(blocks: list[AbstractContextManager], exit_order: list[int]) -> Iterator[Callable[[int], None]]:
    """Enter ``blocks`` in order and exit them in ``exit_order`` (not necessarily last-in first-out), passing on an
    exception raised in the body to each; yields ``leave(i)``, which exits block ``i`` early."""
    left: set[int] = set()

    def leave(i: int) -> None:
        left.add(i)
        blocks[i].__exit__(None, None, None)

    for block in blocks:
        block.__enter__()
    try:
        yield leave
    except BaseException as error:
        for i in exit_order:
            if i not in left:
                blocks[i].__exit__(type(error), error, error.__traceback__)
        raise
    for i in exit_order:
        if i not in left:
            blocks[i].__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """Put back F.scaled_dot_product_attention and forget geomon's patches should a test fail half-way."""
    yield
    F.scaled_dot_product_attention = ORIGINAL_SDPA
    session_module._INSTALLED.clear()


def _collector() -> tuple[list[AttentionCall], Callable[[AttentionCall], None]]:
    calls: list[AttentionCall] = []
    return calls, calls.append


@pytest.mark.parametrize("exit_order", [[0, 1], [1, 0]], ids=["first_out_first", "last_out_first"])
def test_two_sessions_on_two_models_each_see_their_own_calls_and_sdpa_is_restored(exit_order):
    model_a, model_b = _sdpa_models()
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(1))
    calls_a, on_a = _collector()
    calls_b, on_b = _collector()
    blocks = [capture_attention(model_a, on_a, strict=True), capture_attention(model_b, on_b, strict=True)]
    with torch.no_grad(), _overlapping(blocks, exit_order) as leave:
        assert F.scaled_dot_product_attention.__wrapped__ is ORIGINAL_SDPA  # one dispatcher for both
        hidden = model_a[0](x)
        model_a[1](hidden)
        model_b(x)
        model_b(x)
        assert [c.module for c in calls_a] == ["0", "1"]
        assert [c.module for c in calls_b] == ["attn", "attn"]
        leave(exit_order[0])  # one block leaves; the other still sees its own calls, and only those
        assert F.scaled_dot_product_attention is not ORIGINAL_SDPA
        model_a(x)
        model_b(x)
    seen = ([c.module for c in calls_a], [c.module for c in calls_b])
    assert seen == ((["0", "1"], ["attn"] * 3) if exit_order[0] == 0 else (["0", "1"] * 2, ["attn"] * 2))
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert not session_module._INSTALLED
    assert_clean(model_a)
    assert_clean(model_b)
    with torch.no_grad():
        model_a(x), model_b(x)
    assert ([c.module for c in calls_a], [c.module for c in calls_b]) == seen  # nothing after both blocks are gone

    with torch.no_grad():
        references = [
            _qk(x, model_a[0].qkv.weight, model_a[0].qkv.bias),
            _qk(hidden, model_a[1].qkv.weight, model_a[1].qkv.bias),
            _qk(x, model_b.attn.in_proj_weight, model_b.attn.in_proj_bias),
        ]
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    for call, (q, k), allowed in zip([*calls_a[:2], calls_b[0]], references, [causal, causal, None], strict=True):
        expected_entropy, expected_max = softmax_rows(q, k, allowed=allowed)
        entropy, max_logit, _ = rows_of(call)
        assert_rows_close(entropy, expected_entropy)
        assert_rows_close(max_logit, expected_max)


def test_an_exception_with_blocks_exiting_out_of_order_restores_sdpa():
    model_a, model_b = _sdpa_models()
    calls_a, on_a = _collector()
    calls_b, on_b = _collector()
    blocks = [capture_attention(model_a, on_a), capture_sdpa(model_b, on_b)]
    with pytest.raises(RuntimeError, match="boom"), _overlapping(blocks, [0, 1]):
        model_a(torch.randn(1, 4, E))
        raise RuntimeError("boom")
    assert [c.module for c in calls_a] == ["0", "1"] and calls_b == []
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert not session_module._INSTALLED
    assert_clean(model_a)
    assert_clean(model_b)


def test_two_blocks_on_the_same_model_each_see_every_call_once():
    model, _ = _sdpa_models()
    calls_a, on_a = _collector()
    calls_b, on_b = _collector()
    with torch.no_grad(), _overlapping([capture_attention(model, on_a), capture_attention(model, on_b)], [0, 1]):
        model(torch.randn(1, 4, E))
    assert [c.module for c in calls_a] == [c.module for c in calls_b] == ["0", "1"]
    assert all(torch.equal(a.q, b.q) for a, b in zip(calls_a, calls_b, strict=True))
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA


def test_a_function_installed_by_someone_else_after_geomon_is_left_in_place():
    model_a, model_b = _sdpa_models()
    calls_a, on_a = _collector()
    calls_b, on_b = _collector()
    through: list[int] = []
    block_a, block_b = capture_attention(model_a, on_a), capture_attention(model_b, on_b)
    x = torch.randn(1, 4, E)
    with torch.no_grad():
        block_a.__enter__()
        geomon_dispatcher = F.scaled_dot_product_attention

        def theirs(*args, **kwargs):  # another library's wrapper, calling what it found (geomon's dispatcher)
            through.append(1)
            return geomon_dispatcher(*args, **kwargs)

        F.scaled_dot_product_attention = theirs
        block_b.__enter__()  # installs over theirs
        assert F.scaled_dot_product_attention is not theirs
        model_a(x)
        model_b(x)
        block_a.__exit__(None, None, None)
        block_b.__exit__(None, None, None)
        assert F.scaled_dot_product_attention is theirs  # left in place, not clobbered with the original
        model_a(x)
        model_b(x)
    assert [c.module for c in calls_a] == ["0", "1"] and [c.module for c in calls_b] == ["attn"]
    assert len(through) == 6  # geomon's old dispatcher, still called by theirs, passes straight through
    assert not session_module._INSTALLED
    F.scaled_dot_product_attention = ORIGINAL_SDPA
    assert_clean(model_a)


# -- Hugging Face transformers -----------------------------------------------------------------------------------


def _llama(implementation: str, seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=50,
        attn_implementation=implementation,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _llama_by_hand(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 Q/K of layer 0 from its weights: RMSNorm, projections, rotary (rotate-half), GQA kept."""
    attention, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
    x = model.model.embed_tokens.weight[ids].double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    q = (x @ attention.q_proj.weight.double().T).unflatten(-1, (4, 8)).transpose(1, 2)
    k = (x @ attention.k_proj.weight.double().T).unflatten(-1, (2, 8)).transpose(1, 2)
    inv_freq = 1.0 / (model.config.rope_parameters["rope_theta"] ** (torch.arange(0, 8, 2).double() / 8))
    angles = torch.arange(ids.shape[1]).double()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(t: torch.Tensor) -> torch.Tensor:
        return t * cos + torch.cat([-t[..., 4:], t[..., :4]], dim=-1) * sin

    return rotate(q), rotate(k)


def _hf_slots() -> dict[tuple[str, str], object]:
    """Every attribute geomon may swap for Llama and GPT-2, by (where, name): the objects themselves."""
    import transformers.models.gpt2.modeling_gpt2 as gpt2
    import transformers.models.llama.modeling_llama as llama
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    slots: dict[tuple[str, str], object] = {
        ("llama", "eager_attention_forward"): llama.eager_attention_forward,
        ("gpt2", "eager_attention_forward"): gpt2.eager_attention_forward,
        ("GPT2Attention", "_upcast_and_reordered_attn"): gpt2.GPT2Attention.__dict__["_upcast_and_reordered_attn"],
        ("F", "scaled_dot_product_attention"): F.scaled_dot_product_attention,
    }
    slots |= {("global", key): fn for key, fn in AttentionInterface._global_mapping.items()}
    slots |= {("local", key): fn for key, fn in ALL_ATTENTION_FUNCTIONS._local_mapping.items()}
    return slots


def _same(before: dict, after: dict) -> list[tuple[str, str]]:
    """The slots whose object changed (by identity), or appeared or disappeared."""
    return sorted(key for key in before.keys() | after.keys() if before.get(key) is not after.get(key))


@pytest.fixture
def hf_originals() -> Iterator[dict[tuple[str, str], object]]:
    """The attention functions before the test; put back afterwards should the test fail half-way."""
    pytest.importorskip("transformers")
    import transformers.models.gpt2.modeling_gpt2 as gpt2
    import transformers.models.llama.modeling_llama as llama
    from transformers import AttentionInterface

    before = _hf_slots()
    yield before
    for (where, name), fn in before.items():
        if where in ("llama", "gpt2"):
            setattr({"llama": llama, "gpt2": gpt2}[where], name, fn)
        elif where == "GPT2Attention":
            setattr(gpt2.GPT2Attention, name, fn)
        elif where == "global":
            AttentionInterface._global_mapping[name] = fn


LLAMA_LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.mark.parametrize("exit_order", [[0, 1], [1, 0]], ids=["first_out_first", "last_out_first"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_two_hf_models_overlapping_see_their_own_layers_and_every_function_is_restored(
    implementation, exit_order, hf_originals
):
    model_a, model_b = _llama(implementation, 0), _llama(implementation, 1)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    calls_a, on_a = _collector()
    calls_b, on_b = _collector()
    blocks = [capture_attention(model_a, on_a, strict=True), capture_attention(model_b, on_b, strict=True)]
    with torch.no_grad(), _overlapping(blocks, exit_order):
        changed = _same(hf_originals, _hf_slots())
        assert ("F", "scaled_dot_product_attention") in changed
        assert ("llama", "eager_attention_forward") in changed and ("global", "flash_attention_2") in changed
        model_a(ids)
        model_b(ids)
        model_b(ids)
        now = _hf_slots()
        assert all(now[key].__wrapped__ is hf_originals[key] for key in changed)  # one dispatcher for both blocks
    assert [c.module for c in calls_a] == LLAMA_LAYERS
    assert [c.module for c in calls_b] == LLAMA_LAYERS * 2
    assert _same(hf_originals, _hf_slots()) == []
    assert not session_module._INSTALLED
    assert_clean(model_a)
    assert_clean(model_b)

    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for model, call in ((model_a, calls_a[0]), (model_b, calls_b[0])):
        with torch.no_grad():
            q, k = _llama_by_hand(model, ids)
        expected_entropy, expected_max = softmax_rows(q, k, allowed=causal)
        entropy, max_logit, _ = rows_of(call)
        assert_rows_close(entropy, expected_entropy, tol=1e-4)
        assert_rows_close(max_logit, expected_max, tol=1e-4)


def test_an_exception_leaving_hf_blocks_out_of_order_restores_every_function(hf_originals):
    import transformers

    llama = _llama("eager", 0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    config._attn_implementation = "eager"
    config.reorder_and_upcast_attn = True  # GPT-2's class-level _upcast_and_reordered_attn is swapped too
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    calls_a, on_a = _collector()
    calls_b, on_b = _collector()
    blocks = [capture_attention(llama, on_a), capture_attention(gpt2, on_b)]
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"), _overlapping(blocks, [0, 1]):
        changed = _same(hf_originals, _hf_slots())
        assert {("llama", "eager_attention_forward"), ("GPT2Attention", "_upcast_and_reordered_attn")} <= set(changed)
        llama(ids)
        gpt2(ids)
        raise RuntimeError("boom")
    assert [c.module for c in calls_a] == LLAMA_LAYERS
    assert [c.module for c in calls_b] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert _same(hf_originals, _hf_slots()) == []
    assert not session_module._INSTALLED
    assert_clean(llama)
    assert_clean(gpt2)


def test_an_eager_function_replaced_by_someone_else_after_geomon_is_left_in_place(hf_originals):
    import transformers.models.llama.modeling_llama as modeling

    model_a, model_b = _llama("eager", 0), _llama("eager", 1)
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(5))
    calls_a, on_a = _collector()
    calls_b, on_b = _collector()
    through: list[int] = []
    block_a, block_b = capture_attention(model_a, on_a), capture_attention(model_b, on_b)
    with torch.no_grad():
        block_a.__enter__()
        geomon_dispatcher = modeling.eager_attention_forward
        assert geomon_dispatcher is not hf_originals[("llama", "eager_attention_forward")]

        def theirs(*args, **kwargs):  # another library's wrapper, calling what it found
            through.append(1)
            return geomon_dispatcher(*args, **kwargs)

        modeling.eager_attention_forward = theirs
        block_b.__enter__()
        model_a(ids)
        model_b(ids)
        block_a.__exit__(None, None, None)
        block_b.__exit__(None, None, None)
        assert modeling.eager_attention_forward is theirs
        model_a(ids)
    assert [c.module for c in calls_a] == [c.module for c in calls_b] == LLAMA_LAYERS  # once each, not twice
    assert len(through) == 6
    assert _same(hf_originals, _hf_slots()) == [("llama", "eager_attention_forward")]
    assert not session_module._INSTALLED
