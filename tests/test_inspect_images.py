"""``geomon inspect`` on image models: ``--measure`` builds image inputs, and the stated time to the first RankMe is
the step at which a monitor really logs it."""

from __future__ import annotations

import pytest
import torch

from geomon import Monitor
from geomon.tools.cli import main
from geomon.tools.inspect_model import inspect
from geomon.tools.load import load_model

FACTORIES = """
import torch

def torchvision_vit():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                             num_classes=10)

def timm_vit():
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10, depth=2)

def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=128, num_labels=10))
"""


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / f"vits_{tmp_path.name}.py"  # a module name of its own: imported modules are cached by name
    path.write_text(FACTORIES)
    return path


def first_logged_step(model, key, steps=201):
    """Run a default monitor over random batches of 8 images; the first step that logs ``key``."""
    monitor = Monitor().attach(model)
    data = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=data)
        with torch.no_grad(), monitor.step(step, labels=torch.randint(0, 10, (8,), generator=data)):
            model(x)
        if monitor.is_scheduled(step) and key in monitor.compute(step):
            return step
    return None


@pytest.mark.parametrize(
    ("factory", "package", "head", "tokens"),
    [
        ("torchvision_vit", "torchvision", "heads.head", 17),
        ("timm_vit", "timm", "head", 5),
        ("hf_vit", "transformers", "classifier", 17),
    ],
)
def test_measure_runs_an_image_model_and_states_when_the_first_value_arrives(factories, factory, package, head, tokens):
    pytest.importorskip(package)
    report = inspect(f"{factories}:{factory}", measure_cost=True, repeats=1)
    measured, cost = report["measured"], report["cost"]
    assert measured["input"].endswith("[8, 3, 32, 32]") and report["input_shape"] == [3, 32, 32]
    assert measured["input"].startswith("pixel_values=") == (package == "transformers")  # its keyword argument
    assert measured["rows_per_step"] == 8 and cost["rows_per_step"] == 8  # one row per image enters the head
    assert cost["seq_len"] == tokens  # patches + class token: the attention cost model's N
    assert len(measured["seen_attention"]) == 2  # both blocks reported their attention on the random images
    key = f"geomon/rankme/{head}.input"
    model = load_model(f"{factories}:{factory}").model  # a fresh instance
    assert cost["first_value_step"] == first_logged_step(model, key)
    assert cost["first_value_step"] <= 2 * 50


def test_without_measure_an_image_classifier_is_assumed_one_row_per_image(factories):
    pytest.importorskip("torchvision")
    report = inspect(f"{factories}:torchvision_vit")
    assert report["cost"]["rows_per_step"] == 8 and report["cost"]["first_value_step"] == 50
    assert any("one per image" in note for note in report["notes"])


def test_input_shape_option(factories, capsys):
    pytest.importorskip("torchvision")
    assert main(["inspect", f"{factories}:torchvision_vit", "--input-shape", "1,32,32", "--measure"]) == 2
    assert "3 input channels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["inspect", f"{factories}:torchvision_vit", "--input-shape", "3,a"])
    assert caught.value.code == 2
    assert main(["inspect", f"{factories}:torchvision_vit", "--input-shape", "3x32x32", "--measure", "--json",
                 "--repeats", "1"]) == 0  # fmt: skip
    assert '"input": "[8, 3, 32, 32]"' in capsys.readouterr().out
