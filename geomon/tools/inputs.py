"""What input a model takes, for ``geomon inspect``: images or tokens, read off the model's own attributes.

An image model is one whose first module with a weight (in module order) is an ``nn.Conv2d`` (a ViT's patch
embedding, a CNN's stem). Its per-image shape ``(C, H, W)`` comes from, in order: ``--input-shape``; the channels of
that convolution (or ``num_channels`` / ``in_chans``) and the size the model declares - torchvision's
``image_size``, timm's ``patch_embed.img_size``, a Hugging Face config's ``image_size``, an ``img_size`` attribute,
timm's ``pretrained_cfg["input_size"]`` - else 224 x 224 (said in a note). A ViT's token count, for the cost model,
is its ``seq_length`` (torchvision) or ``patch_embed.num_patches`` plus its prefix tokens (timm), else the patch
grid plus one class token.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from geomon.capture.modules import linear_like
from geomon.tools.load import InspectError

#: Image side assumed when a convolutional model does not say its input size.
DEFAULT_IMAGE_SIZE = 224


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` (or ``3x224x224``) -> ``(3, 224, 224)``: one sample's shape, without the batch dimension.

    Example:
        >>> parse_input_shape("3x32x32"), parse_input_shape("3, 224, 224")
        ((3, 32, 32), (3, 224, 224))
    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected a shape like 3,224,224 (one sample, no batch dimension), got {text!r}") from None
    if not shape or any(size < 1 for size in shape):
        raise ValueError(f"expected a shape like 3,224,224 of positive sizes, got {text!r}")
    return shape


def first_layer(model: nn.Module) -> nn.Module | None:
    """The first module (in module order) that is a convolution, an embedding, an attention or a linear layer."""
    kinds = (nn.Conv2d, nn.Embedding, nn.MultiheadAttention)
    return next((m for m in model.modules() if isinstance(m, kinds) or linear_like(m)), None)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def image_shape(model: nn.Module) -> tuple[tuple[int, int, int], bool] | None:
    """``((C, H, W), declared)`` for an image model (see the module docstring), ``declared`` False where the size is
    the default; ``None`` for a model whose first layer is not a 2-D convolution.

    Example:
        >>> stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10))
        >>> image_shape(stem)
        ((3, 224, 224), False)
    """
    first = first_layer(model)
    if not isinstance(first, nn.Conv2d):
        return None
    config = getattr(model, "config", None)
    patch_embed = getattr(model, "patch_embed", None)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    sizes = [getattr(model, "image_size", None), getattr(patch_embed, "img_size", None),
             getattr(config, "image_size", None), getattr(model, "img_size", None)]  # fmt: skip
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)) and len(cfg["input_size"]) == 3:
        sizes.append(tuple(cfg["input_size"][1:]))
    size = next((pair for pair in map(_pair, sizes) if pair is not None), None)
    channels = first.in_channels
    return (channels, *(size or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))), size is not None  # type: ignore[return-value]


def image_tokens(model: nn.Module, shape: tuple[int, ...]) -> int | None:
    """Tokens per image of a ViT (class and register tokens included), else ``None`` (a CNN has no sequence)."""
    if isinstance(getattr(model, "seq_length", None), int):  # torchvision's VisionTransformer
        return model.seq_length  # type: ignore[return-value]
    patch_embed = getattr(model, "patch_embed", None)
    if isinstance(getattr(patch_embed, "num_patches", None), int):  # timm
        prefix = getattr(model, "num_prefix_tokens", 1)
        return patch_embed.num_patches + (prefix if isinstance(prefix, int) else 1)  # type: ignore[union-attr]
    first = first_layer(model)
    patch = _pair(getattr(first, "stride", None))
    if patch is None or patch == (1, 1) or len(shape) != 3:  # a CNN stem, not a patch embedding
        return None
    return math.prod(side // step for side, step in zip(shape[1:], patch, strict=True)) + 1


def require_image(model: nn.Module, input_shape: tuple[int, ...] | None) -> None:
    """Fail early when ``--input-shape`` cannot be the shape of an image for ``model``'s first convolution."""
    first = first_layer(model)
    if input_shape is not None and isinstance(first, nn.Conv2d) and (
        len(input_shape) != 3 or input_shape[0] != first.in_channels
    ):  # fmt: skip
        raise InspectError(
            f"--input-shape {','.join(map(str, input_shape))}: the model's first layer is a Conv2d with "
            f"{first.in_channels} input channels; give C,H,W with C = {first.in_channels}"
        )
