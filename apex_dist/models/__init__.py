"""Velocity models: plain nn.Modules with the interface
``model(x_t, t, tt, text, text_mask, fake_rows) -> velocity``; none imports deepspeed."""

from apex_dist.models.conditioning import ConditionShift, DualTimeEmbedding
from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageTransformer
from apex_dist.models.toy import ToyVelocityModel

__all__ = [
    "QWEN_IMAGE_PRESETS",
    "ConditionShift",
    "DualTimeEmbedding",
    "QwenImageTransformer",
    "ToyVelocityModel",
    "build_model",
]


def build_model(config):
    """Build the velocity model named by ``config.model.preset`` (a full `Config`)."""
    shift = config.method.condition_shift
    if config.model.preset == "toy-mlp":
        sizes = config.model.toy
        return ToyVelocityModel(
            data_dim=sizes.data_dim,
            text_dim=sizes.text_dim,
            hidden_size=sizes.hidden_size,
            num_blocks=sizes.num_blocks,
            shift_scale=shift.scale,
            shift_bias=shift.bias,
            shift_learnable=shift.learnable,
        )
    if config.model.preset in QWEN_IMAGE_PRESETS:
        return QwenImageTransformer.from_preset(
            config.model.preset,
            shift_scale=shift.scale,
            shift_bias=shift.bias,
            shift_learnable=shift.learnable,
        )
    known = ", ".join(["toy-mlp", *QWEN_IMAGE_PRESETS])
    raise ValueError(f"model.preset {config.model.preset!r} is unknown; known presets: {known}")
