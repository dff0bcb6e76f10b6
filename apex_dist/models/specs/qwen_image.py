"""Qwen-Image: the MMDiT of `apex_dist.models.qwen_image`, on the latents of its VAE.

Presets (exact parameter counts without / with the APEX additions; E2, and 2 more for a
learnable shift):
- `qwen-image-20b`: Qwen-Image, 60 blocks of width 3072 (24 heads x 128):
  20,430,401,088 / 20,440,630,848.
- `qwen-image-0.6b`: the same family at 16 blocks of width 1024 (8 heads x 128), the same text
  width (3584), latent channels and rotary axes, so real text features and latents fit:
  611,698,240 / 613,011,008.
- `qwen-image-tiny`: tests, 2 blocks of width 32 (2 heads x 16): 89,328 / 98,608.

Snapshots are diffusers' layout (`transformer/`, `text_encoder/`, `tokenizer/`, `vae/`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from apex_dist.models.spec import (
    LatentGeometry,
    ModelSpec,
    condition_shift_arguments,
)

# Image pixels per latent pixel side: the VAE's 8x spatial downsampling.
VAE_DOWNSAMPLE = 8

QWEN_IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    "qwen-image-20b": {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "axes_dims_rope": (16, 56, 56),
    },
    "qwen-image-0.6b": {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 16,
        "attention_head_dim": 128,
        "num_attention_heads": 8,
        "joint_attention_dim": 3584,
        "axes_dims_rope": (16, 56, 56),
    },
    "qwen-image-tiny": {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "axes_dims_rope": (4, 6, 6),
    },
}

# LoRA target presets (config `model.lora.targets`): module paths, regular expressions matched
# in full against `named_modules()` names (see apex_dist.models.lora).
_ATTENTION = (
    r"transformer_blocks\.\d+\.attn\."
    r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)
_MLP = r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"
_TIME = r"time_text_embed\.timestep_embedder\.linear_(1|2)"
QWEN_IMAGE_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention_mlp_time": (_ATTENTION, _MLP, _TIME),
    "attention_mlp": (_ATTENTION, _MLP),
    "attention": (_ATTENTION,),
}

# Matmuls per token of one block and stream, in units of width^2: q, k, v and out projections
# (4) and the MLP (2 * MLP ratio 4 = 8).
LINEAR_WIDTH_SQUARES_PER_BLOCK = 12


class QwenImageSpec(ModelSpec):
    """The Qwen-Image family (module doc); subclassed by other image spaces of the same
    transformer (`qwen_image_pixels`)."""

    family = "qwen-image"
    presets = QWEN_IMAGE_PRESETS
    image_space = "vae"
    lora_targets = QWEN_IMAGE_LORA_TARGETS
    # diffusers' Qwen-Image pipeline prefixes the transformer's keys (and LoRA metadata) so
    diffusers_lora_prefix = "transformer."
    # ComfyUI's native naming: its model's state-dict prefix for the diffusion model, with
    # lora_down (A) / lora_up (B) / alpha suffixes (comfy/lora.py model_lora_keys_unet maps
    # "diffusion_model.<path>" to the weight "diffusion_model.<path>.weight").
    comfyui_lora_prefix = "diffusion_model."

    def snapshot_architecture(self, snapshot: Union[str, Path]) -> dict[str, Any]:
        from apex_dist.models.loading import read_transformer_config

        return read_transformer_config(snapshot)

    def build(self, architecture: Mapping[str, Any], condition_shift: Optional[Any] = None):
        from apex_dist.models.qwen_image import QwenImageTransformer

        shift = condition_shift_arguments(condition_shift or self.default_condition_shift)
        return QwenImageTransformer.from_diffusers_config(architecture, **shift)

    def load_pretrained(self, model, snapshot, dtype, parameter_context=None) -> list[str]:
        from apex_dist.models.loading import load_transformer_weights

        return load_transformer_weights(model, snapshot, dtype, parameter_context)

    def geometry(self, architecture: Mapping[str, Any]) -> LatentGeometry:
        pixels_per_token = VAE_DOWNSAMPLE * int(architecture.get("patch_size", 2))
        return LatentGeometry("vae", int(architecture["in_channels"]), pixels_per_token)

    def text_encoder(self, snapshot, dtype, device, max_length):
        from apex_dist.models.text_encoder import QwenTextEncoder

        return QwenTextEncoder.from_snapshot(
            snapshot, dtype=dtype, device=device, max_length=max_length
        )

    def image_codec(self, snapshot, dtype, device):
        from apex_dist.models.vae import QwenImageVae

        if snapshot is None:
            raise ValueError(
                "the VAE comes from a snapshot (its vae/ folder) but model.pretrained is null"
            )
        return QwenImageVae.from_snapshot(snapshot, dtype=dtype, device=device)

    def forward_flops(
        self, architecture: Mapping[str, Any], image_tokens: int, text_tokens: int
    ) -> int:
        """Per block and token: q, k, v, out projections (4 D^2) and the MLP (2 * 4 D^2) in
        each stream; joint attention 2 * 2 * S^2 * D over S = image + text tokens; plus the
        input and output projections. The per-sample modulation and time embedding are
        negligible and left out. At 20B and 1024x1024 this is 7.31e13."""
        width = architecture["num_attention_heads"] * architecture["attention_head_dim"]
        tokens = image_tokens + text_tokens
        linear_per_token = LINEAR_WIDTH_SQUARES_PER_BLOCK * width * width
        per_block = 2 * linear_per_token * tokens + 4 * tokens * tokens * width
        patch_channels = architecture["patch_size"] ** 2 * architecture["out_channels"]
        io = 2 * width * (image_tokens * (architecture["in_channels"] + patch_channels))
        io += 2 * width * text_tokens * architecture["joint_attention_dim"]
        return architecture["num_layers"] * per_block + io


SPEC = QwenImageSpec()
