"""Velocity models: plain nn.Modules with the interface
``model(x_t, t, tt, text, text_mask, fake_rows) -> velocity``; none imports deepspeed."""

from apex_dist.models.conditioning import ConditionShift, DualTimeEmbedding
from apex_dist.models.loading import (
    CheckpointError,
    CheckpointMismatchError,
    build_transformer,
    load_pretrained_transformer,
    load_transformer_weights,
    read_transformer_config,
)
from apex_dist.models.lora import (
    adapters_disabled,
    apply_lora,
    from_diffusers_lora,
    lora_state_dict,
    to_diffusers_lora,
)
from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageTransformer
from apex_dist.models.text_encoder import QwenTextEncoder
from apex_dist.models.toy import ToyVelocityModel
from apex_dist.models.vae import QwenImageVae, pack_latents, unpack_latents

__all__ = [
    "QWEN_IMAGE_PRESETS",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConditionShift",
    "DualTimeEmbedding",
    "QwenImageTransformer",
    "QwenImageVae",
    "QwenTextEncoder",
    "ToyVelocityModel",
    "adapters_disabled",
    "apply_lora",
    "build_model",
    "build_transformer",
    "from_diffusers_lora",
    "load_pretrained_transformer",
    "load_transformer_weights",
    "lora_state_dict",
    "pack_latents",
    "read_transformer_config",
    "to_diffusers_lora",
    "unpack_latents",
]


def build_model(config):
    """Build the velocity model named by ``config.model.preset`` (a full `Config`)."""
    shift = config.method.condition_shift
    shift_options = {
        "shift_scale": shift.scale,
        "shift_bias": shift.bias,
        "shift_learnable": shift.learnable,
    }
    if config.model.preset == "toy-mlp":
        sizes = config.model.toy
        return ToyVelocityModel(
            data_dim=sizes.data_dim,
            text_dim=sizes.text_dim,
            hidden_size=sizes.hidden_size,
            num_blocks=sizes.num_blocks,
            **shift_options,
        )
    if config.model.preset in QWEN_IMAGE_PRESETS:
        return QwenImageTransformer.from_preset(config.model.preset, **shift_options)
    known = ", ".join(["toy-mlp", *QWEN_IMAGE_PRESETS])
    raise ValueError(f"model.preset {config.model.preset!r} is unknown; known presets: {known}")
