"""Model specs: what a backbone family is, declared in one place.

A `ModelSpec` says everything the rest of apex_dist needs to know about a family of velocity
models, so that no other module switches on preset names:

- `presets`: size presets, preset name -> the architecture (the constructor's arguments);
  `architecture(model_config)` gives the preset's, or the snapshot's when `model.pretrained`
  is set (toy: `model.toy`);
- `build(architecture, condition_shift)`: the plain `nn.Module`, built under whatever context
  the caller holds (the meta device, a device, `deepspeed.zero.Init`); E2 is created by the
  model and set from E1 by `apex_dist.models.conditioning.init_apex_weights`;
- `load_pretrained(model, snapshot, dtype, parameter_context)`: stream a snapshot's weights in
  (diffusers keys), one tensor at a time;
- `text_encoder(...)` and `image_codec(...)`: the prompt encoder and images <-> latents (a
  VAE, the pixel codec of pixel-space presets, or none for the toy's points);
- `geometry(architecture)`: the latent packing (`LatentGeometry`: pixels per token side,
  channels per token);
- `lora_targets`: LoRA target presets (config `model.lora.targets` -> module-path patterns);
  empty when the family has no LoRA;
- `default_condition_shift`: the condition shift a model gets when no config gives one (the
  config schema's default, the one source; a snapshot never overrides it);
- `forward_flops(architecture, image_tokens, text_tokens)`: matmul FLOPs of one forward;
- export key maps: `diffusers_lora_prefix` and `comfyui_lora_prefix` (None: not exportable).

Each family's spec lives in its own file of `apex_dist/models/specs/` (a module-level `SPEC`)
and is found there by `model_spec(preset)`; docs/models.md ("Adding a backbone") says how to
add one. The config's validation keeps a torch-free copy of the preset names
(`apex_dist.config.MODEL_PRESETS`), which a test keeps equal to `preset_names()`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from apex_dist.config import ConditionShiftConfig, ModelConfig

ParameterContext = Callable[[nn.Parameter], AbstractContextManager]

# The image spaces a spec can declare (LatentGeometry.kind).
IMAGE_SPACES = ("vae", "pixels", "points")


@dataclass(frozen=True)
class LatentGeometry:
    """What the model generates for an image of a given size.

    kind: "vae" (latents of a VAE), "pixels" (packed pixels) or "points" (vectors of `channels`
    numbers, no image); channels: values per token (per point); pixels_per_token: image pixels
    per token side.
    """

    kind: str
    channels: int
    pixels_per_token: int = 1

    def image_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(frames, h, w): the token grid of a height x width image."""
        step = self.pixels_per_token
        if height % step or width % step:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of {step} pixels, the token "
                f"side of this model's {self.kind} space: choose data.resolution and "
                "data.aspect_buckets that give multiples of it"
            )
        return (1, height // step, width // step)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one row of generated latents: (tokens, channels), or (channels,)."""
        if self.kind == "points":
            return (self.channels,)
        _, rows, columns = self.image_shape(height, width)
        return (rows * columns, self.channels)


class ModelSpec:
    """One backbone family (module doc). Subclasses fill the class attributes and override
    the methods their family supports; the defaults say "not supported" clearly.

    Attributes:
        family: the family's name (the spec file's subject).
        presets: preset name -> architecture (constructor arguments).
        image_space: one of `IMAGE_SPACES`.
        lora_targets: `model.lora.targets` preset -> module-path regular expressions.
        default_condition_shift: the shift used when the caller gives none.
        diffusers_lora_prefix: prefix of the transformer's keys in diffusers' LoRA files.
        comfyui_lora_prefix: prefix of the diffusion model's keys in ComfyUI's LoRA files.
    """

    family: str = ""
    presets: Mapping[str, Mapping[str, Any]] = {}
    image_space: str = "points"
    lora_targets: Mapping[str, tuple[str, ...]] = {}
    default_condition_shift: ConditionShiftConfig = ConditionShiftConfig()
    diffusers_lora_prefix: Optional[str] = None
    comfyui_lora_prefix: Optional[str] = None

    # ---- architecture and building -----------------------------------------------------------

    def architecture(self, model_config: ModelConfig) -> dict[str, Any]:
        """The constructor arguments of `model_config`: its preset's, or its snapshot's."""
        if model_config.pretrained:
            return self.snapshot_architecture(model_config.pretrained)
        return dict(self.presets[model_config.preset])

    def snapshot_architecture(self, snapshot: Union[str, Path]) -> dict[str, Any]:
        """The architecture a snapshot directory describes."""
        raise ValueError(
            f"model.pretrained is set but the {self.family} models have no snapshot loader; "
            "use a preset of a family that loads snapshots (Qwen-Image) or model.pretrained=null"
        )

    def build(
        self, architecture: Mapping[str, Any], condition_shift: Optional[Any] = None
    ) -> nn.Module:
        """The model of `architecture` with `condition_shift` (scale, bias, learnable; the
        spec's default when None), under the caller's device or init context. E2 holds its
        own random values until `init_apex_weights` sets it to E1."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def load_pretrained(
        self,
        model: nn.Module,
        snapshot: Union[str, Path],
        dtype: Union[str, torch.dtype],
        parameter_context: Optional[ParameterContext] = None,
    ) -> list[str]:
        """Stream the snapshot's weights into `model`; return the model keys it lacked."""
        raise ValueError(f"the {self.family} models have no snapshot loader")

    # ---- data: text, images, latents ---------------------------------------------------------

    def geometry(self, architecture: Mapping[str, Any]) -> LatentGeometry:
        """The latent packing of `architecture`."""
        raise NotImplementedError(f"{type(self).__name__}.geometry")

    def text_encoder(
        self,
        snapshot: Union[str, Path],
        dtype: torch.dtype,
        device: Union[str, torch.device],
        max_length: int,
    ):
        """The prompt encoder of a snapshot (`encode(prompts) -> (features, mask)`)."""
        raise ValueError(f"the {self.family} models take no prompts (no text encoder)")

    def image_codec(
        self,
        snapshot: Optional[Union[str, Path]],
        dtype: torch.dtype,
        device: Union[str, torch.device],
    ):
        """Images <-> latents (`encode(images)`, `decode(latents, image_shape)`)."""
        raise ValueError(f"the {self.family} models have no image space")

    # ---- cost and export ---------------------------------------------------------------------

    def forward_flops(
        self, architecture: Mapping[str, Any], image_tokens: int, text_tokens: int
    ) -> Optional[int]:
        """Matmul FLOPs of one forward of one sample (2 per multiply-add); None: unknown."""
        return None

    def diffusers_lora_key(self, module: str, side: str) -> str:
        """diffusers' name of the LoRA `side` ("A" or "B") of module path `module`."""
        if self.diffusers_lora_prefix is None:
            raise ValueError(f"the {self.family} models have no diffusers LoRA format")
        return f"{self.diffusers_lora_prefix}{module}.lora_{side}.weight"

    def comfyui_lora_keys(self, module: str) -> tuple[str, str, str]:
        """ComfyUI's names of a module's (down = A, up = B, alpha) LoRA tensors."""
        if self.comfyui_lora_prefix is None:
            raise ValueError(f"the {self.family} models have no ComfyUI LoRA format")
        key = f"{self.comfyui_lora_prefix}{module}"
        return f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"


def condition_shift_arguments(condition_shift: Any) -> dict[str, Any]:
    """The models' constructor arguments of a condition shift (a `ConditionShiftConfig` or
    anything with scale, bias and learnable)."""
    return {
        "shift_scale": float(condition_shift.scale),
        "shift_bias": float(condition_shift.bias),
        "shift_learnable": bool(condition_shift.learnable),
    }


# --------------------------------------------------------------------------------------------
# the registry: one module per family in apex_dist/models/specs/, each with a SPEC

_SPECS: Optional[dict[str, ModelSpec]] = None


def model_specs() -> dict[str, ModelSpec]:
    """family -> spec, from every module of `apex_dist.models.specs` (imported once)."""
    global _SPECS
    if _SPECS is None:
        from apex_dist.models import specs

        found: dict[str, ModelSpec] = {}
        owners: dict[str, str] = {}
        for module_info in sorted(pkgutil.iter_modules(specs.__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{specs.__name__}.{module_info.name}")
            spec = getattr(module, "SPEC", None)
            if not isinstance(spec, ModelSpec):
                raise TypeError(
                    f"{module.__name__} must define SPEC, a ModelSpec (see apex_dist.models.spec)"
                )
            for preset in spec.presets:
                if preset in owners:
                    raise ValueError(
                        f"preset {preset!r} is declared by two specs: {owners[preset]} and "
                        f"{spec.family}"
                    )
                owners[preset] = spec.family
            if spec.image_space not in IMAGE_SPACES:
                raise ValueError(
                    f"{module.__name__}: image_space {spec.image_space!r} is not one of "
                    f"{', '.join(IMAGE_SPACES)}"
                )
            found[spec.family] = spec
        _SPECS = found
    return _SPECS


def preset_names() -> tuple[str, ...]:
    """Every preset of every spec."""
    return tuple(preset for spec in model_specs().values() for preset in spec.presets)


def model_spec(preset: str) -> ModelSpec:
    """The spec that declares `preset`.

    Raises:
        ValueError: no spec declares it (the known presets are listed).
    """
    for spec in model_specs().values():
        if preset in spec.presets:
            return spec
    raise ValueError(
        f"model.preset {preset!r} is unknown; known presets: {', '.join(preset_names())}"
    )
