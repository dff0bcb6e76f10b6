"""Velocity models: plain nn.Modules with the interface
``model(x_t, t, tt, text, text_mask, fake_rows) -> velocity``; none imports deepspeed.

What a backbone family is (presets, building, loading, text encoder, image codec, latent
geometry, LoRA targets, export keys) is declared by its spec (`apex_dist.models.spec`,
one file per family in `apex_dist/models/specs/`).
"""

from apex_dist.models.conditioning import ConditionShift, init_apex_weights
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
from apex_dist.models.qwen_image import QwenImageTransformer
from apex_dist.models.spec import LatentGeometry, ModelSpec, model_spec, preset_names
from apex_dist.models.text_encoder import QwenTextEncoder
from apex_dist.models.toy import ToyVelocityModel
from apex_dist.models.vae import QwenImageVae, pack_latents, unpack_latents

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConditionShift",
    "LatentGeometry",
    "ModelSpec",
    "QwenImageTransformer",
    "QwenImageVae",
    "QwenTextEncoder",
    "ToyVelocityModel",
    "adapters_disabled",
    "apply_lora",
    "build_model",
    "build_transformer",
    "from_diffusers_lora",
    "init_apex_weights",
    "load_pretrained_transformer",
    "load_transformer_weights",
    "lora_state_dict",
    "model_spec",
    "pack_latents",
    "preset_names",
    "read_transformer_config",
    "to_diffusers_lora",
    "unpack_latents",
]


def build_model(config):
    """The velocity model of a full `Config` on the current device, in fp32, ready to train
    in one process: built by the spec of `config.model.preset` with the config's condition
    shift, E2 set from E1. Distributed runs build through `apex_dist.distributed.build`."""
    spec = model_spec(config.model.preset)
    if config.model.pretrained:
        raise ValueError(
            "build_model builds random weights; load model.pretrained with "
            "apex_dist.distributed.build.build_training_model (or load_pretrained_transformer)"
        )
    model = spec.build(spec.architecture(config.model), config.method.condition_shift)
    init_apex_weights(model)
    return model
