"""Qwen-Image's transformer on pixels: the quickstart's pixel-space family.

The same MMDiT as `qwen_image` (and its LoRA targets and export keys), trained on packed 4x4
RGB pixel patches (`apex_dist.models.pixels.PixelCodec`) in place of VAE latents, with the tiny
text encoder's width 32 (`apex_dist.models.tiny`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apex_dist.models.pixels import PIXELS_PER_TOKEN_SIDE, TOKEN_FEATURES
from apex_dist.models.spec import LatentGeometry
from apex_dist.models.specs.qwen_image import QwenImageSpec

PIXEL_PRESETS: dict[str, dict[str, Any]] = {
    # 4 blocks of width 64 (2 heads x 32); a token is 48 pixel values (12 channels in 2x2)
    "qwen-image-pixels-tiny": {
        "patch_size": 2,
        "in_channels": TOKEN_FEATURES,
        "out_channels": TOKEN_FEATURES // 4,
        "num_layers": 4,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "axes_dims_rope": (8, 12, 12),
    },
}


class QwenImagePixelSpec(QwenImageSpec):
    """Qwen-Image on packed pixels (module doc)."""

    family = "qwen-image-pixels"
    presets = PIXEL_PRESETS
    image_space = "pixels"

    def geometry(self, architecture: Mapping[str, Any]) -> LatentGeometry:
        return LatentGeometry("pixels", int(architecture["in_channels"]), PIXELS_PER_TOKEN_SIDE)

    def image_codec(self, snapshot, dtype, device):
        from apex_dist.models.pixels import PixelCodec

        return PixelCodec()


SPEC = QwenImagePixelSpec()
