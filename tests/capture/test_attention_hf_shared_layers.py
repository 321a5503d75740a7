"""ALBERT runs one shared layer group at every depth: geomon logs it under one name, pooling the depths, and says so
once. Reference: the model's own probabilities (``output_attentions=True``), every depth pooled, in float64."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
AlbertModel = pytest.importorskip("transformers.models.albert.modeling_albert").AlbertModel

from geomon import Monitor  # noqa: E402
from tests.capture._reference import entropy_of  # noqa: E402

LAYER = "encoder.albert_layer_groups.0.albert_layers.0.attention"
REPEATED = "computed attention more than once in one forward"


def _albert(depth: int, implementation: str) -> torch.nn.Module:
    config = transformers.AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=depth,
                                       num_attention_heads=4, intermediate_size=64, initializer_range=0.3)  # fmt: skip
    config._attn_implementation = implementation
    torch.manual_seed(0)
    return AlbertModel(config).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    tokens = torch.ones(2, 8, dtype=torch.long)
    tokens[1, 5:] = 0  # right padding
    return ids, tokens


def _monitored(model: torch.nn.Module, calls: int) -> tuple[Monitor, list[str]]:
    ids, tokens = _batch()
    monitor = Monitor(every_n_steps=1, head=None, query_rows=None, strict=True).attach(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with monitor.step(0):
            for _ in range(calls):
                model(ids, attention_mask=tokens)
        monitor.compute()
    return monitor, [str(w.message) for w in caught if REPEATED in str(w.message)]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_layer_shared_across_depths_pools_every_depth_and_is_said_once(implementation):
    model = _albert(3, implementation)
    monitor, said = _monitored(model, calls=1)
    assert len(said) == 1 and repr(LAYER) in said[0], said
    reference = _albert(3, "eager")
    reference.load_state_dict(model.state_dict())
    ids, tokens = _batch()
    with torch.no_grad():
        depths = reference(ids, attention_mask=tokens, output_attentions=True).attentions
    assert len(depths) == 3
    real = tokens.bool()[:, None, :].expand(2, 4, 8)  # padded tokens' query rows are left out, as geomon does
    pooled = torch.stack([entropy_of(p) for p in depths])  # [depth, B, H, N]
    per_head = torch.stack([pooled[:, :, h][:, real[:, h]].mean() for h in range(4)])
    got = monitor.details[f"geomon/attention/entropy/{LAYER}"].double()
    torch.testing.assert_close(got, per_head, rtol=1e-5, atol=1e-6)
    assert float(pooled[:, real].mean()) != pytest.approx(float(pooled[0][real].mean()), rel=1e-3)  # depths differ


def test_a_model_called_twice_in_a_step_is_not_said_to_share_layers():
    _, said = _monitored(_albert(1, "eager"), calls=2)
    assert said == []
