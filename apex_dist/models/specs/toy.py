"""The toy MLP on 2-D points (`apex_dist.models.toy`): tests and the toy experiment.

Its sizes come from the config's `model.toy` section (one preset, `toy-mlp`); it has no
snapshot, text encoder, image space, LoRA or export format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from apex_dist.config import ModelConfig, ToyModelConfig
from apex_dist.models.spec import LatentGeometry, ModelSpec, condition_shift_arguments


class ToySpec(ModelSpec):
    """The toy family (module doc)."""

    family = "toy"
    # the sizes come from the config (`architecture`); these are its defaults
    presets: Mapping[str, Mapping[str, Any]] = {"toy-mlp": dataclasses.asdict(ToyModelConfig())}
    image_space = "points"

    def architecture(self, model_config: ModelConfig) -> dict[str, Any]:
        if model_config.pretrained:
            return self.snapshot_architecture(model_config.pretrained)  # raises
        toy = model_config.toy
        return {
            "data_dim": toy.data_dim,
            "text_dim": toy.text_dim,
            "hidden_size": toy.hidden_size,
            "num_blocks": toy.num_blocks,
        }

    def build(self, architecture: Mapping[str, Any], condition_shift: Optional[Any] = None):
        from apex_dist.models.toy import ToyVelocityModel

        shift = condition_shift_arguments(condition_shift or self.default_condition_shift)
        return ToyVelocityModel(**architecture, **shift)

    def geometry(self, architecture: Mapping[str, Any]) -> LatentGeometry:
        return LatentGeometry("points", int(architecture["data_dim"]))


SPEC = ToySpec()
