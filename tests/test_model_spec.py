"""Model specs: the registry, what each family declares, and that a new backbone is one spec
file plus its model file (tiny models, fp32, CPU, one process)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from apex_dist.config import (
    LORA_TARGET_PRESET_NAMES,
    MODEL_PRESETS,
    QWEN_IMAGE_PRESET_NAMES,
    ConditionShiftConfig,
    load_config,
)
from apex_dist.distributed.build import build_training_model
from apex_dist.distributed.runtime import RankInfo
from apex_dist.models import spec as spec_module
from apex_dist.models.spec import LatentGeometry, model_spec, model_specs, preset_names

CPU = RankInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# A DeepSpeed config for the ZeRO-2 build path (zero.Init is not used below stage 3).
ZERO2_JSON = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}


def config_for(*overrides: str):
    return load_config(None, ["parallel.zero_stage=2", *overrides])


def test_the_config_preset_lists_equal_the_spec_registry():
    assert sorted(MODEL_PRESETS) == sorted(preset_names())
    with_lora = [p for p in preset_names() if model_spec(p).lora_targets]
    assert sorted(QWEN_IMAGE_PRESET_NAMES) == sorted(with_lora)
    for preset in with_lora:
        assert sorted(model_spec(preset).lora_targets) == sorted(LORA_TARGET_PRESET_NAMES)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="'qwen-image-7b' is unknown; known presets: .*toy-mlp"):
        model_spec("qwen-image-7b")


@pytest.mark.parametrize(
    ("preset", "geometry"),
    [
        ("toy-mlp", LatentGeometry("points", 2)),
        ("qwen-image-tiny", LatentGeometry("vae", 16, 16)),
        ("qwen-image-pixels-tiny", LatentGeometry("pixels", 48, 4)),
    ],
)
def test_each_family_builds_through_the_one_build_order(preset, geometry):
    """Spec -> model with the config's shift, E2 an equal copy of E1, cast, on the device."""
    config = config_for(f"model.preset={preset}", "method.condition_shift.scale=-1.5")
    spec = model_spec(preset)
    assert spec.geometry(spec.architecture(config.model)) == geometry
    model = build_training_model(config, CPU, ZERO2_JSON)
    assert model.condition_shift.scale.item() == -1.5
    first = dict(model.time_text_embed.named_parameters())
    for name, parameter in model.time_text_embed_2.named_parameters():
        assert (
            torch.equal(parameter, first[name]) and parameter.data_ptr() != first[name].data_ptr()
        )
    # one forward of the velocity-model interface on the geometry's shapes
    batch = 2
    if geometry.kind == "points":
        x_t, named = torch.randn(batch, geometry.channels), {}
        text = torch.randn(batch, 3, config.model.toy.text_dim)
    else:
        grid = geometry.image_shape(32, 32)
        tokens = grid[1] * grid[2]
        x_t, named = torch.randn(batch, tokens, geometry.channels), {"image_shape": grid}
        text = torch.randn(batch, 3, spec.architecture(config.model)["joint_attention_dim"])
    t = torch.rand(batch)
    mask = torch.ones(batch, 3, dtype=torch.bool)
    velocity = model(x_t, t, t * 0.5, text, mask, torch.tensor([True, False]), **named)
    assert velocity.shape == x_t.shape and torch.isfinite(velocity).all()


def test_the_build_consumes_the_random_stream_as_a_model_built_alone():
    """Under ZeRO-2 the build is the spec's model drawn from train.seed (E2 last), then LoRA's
    adapters: the same seed gives the same weights, and the adapters follow the model's draws."""
    config = config_for(
        "model.preset=qwen-image-tiny", "model.lora.enabled=true", "model.lora.rank=2"
    )
    built = build_training_model(config, CPU, ZERO2_JSON).state_dict()
    torch.manual_seed(config.train.seed)
    spec = model_spec("qwen-image-tiny")
    alone = spec.build(spec.architecture(config.model), config.method.condition_shift)
    from apex_dist.models import init_apex_weights
    from apex_dist.models.lora import apply_lora

    init_apex_weights(alone)
    apply_lora(alone, config.model.lora)
    expected = alone.state_dict()
    assert sorted(built) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(built[key], value), key


def test_models_without_a_shift_take_the_config_schema_default():
    default = ConditionShiftConfig()
    for spec in model_specs().values():
        assert spec.default_condition_shift == default
        preset = next(iter(spec.presets))
        with torch.device("meta"):  # the shift's two values live on the CPU even here
            model = spec.build(spec.presets[preset])
        assert model.condition_shift.scale.item() == default.scale
        assert model.condition_shift.bias.item() == default.bias


def test_lora_on_a_family_without_targets_is_refused_by_the_build():
    config = config_for("model.preset=toy-mlp")
    config.model.lora.enabled = True  # validation refuses this combination; the build does too
    with pytest.raises(ValueError, match="declares no LoRA targets"):
        build_training_model(config, CPU, ZERO2_JSON)


# --------------------------------------------------------------------------------------------
# a new backbone: one model file and one spec file, nothing else in the library

NEW_MODEL = '''
"""A one-layer velocity model on 3-D points (a backbone added by a test)."""
from torch import nn

from apex_dist.models.conditioning import ConditionShift, combine_time_embeddings
from apex_dist.models.toy import TimeEmbedder


class LineModel(nn.Module):
    def __init__(self, width, shift_scale, shift_bias, shift_learnable):
        super().__init__()
        self.text_input = nn.Linear(4, width)
        self.condition_shift = ConditionShift(shift_scale, shift_bias, shift_learnable)
        self.time_text_embed = TimeEmbedder(width)
        self.body = nn.Linear(3, width)
        self.head = nn.Linear(width, 3)
        self.time_text_embed_2 = TimeEmbedder(width)

    def forward(self, x_t, t, target_time, text, text_mask, fake_rows=None):
        tokens = self.condition_shift(self.text_input(text), fake_rows).mean(1)
        time = combine_time_embeddings(
            self.time_text_embed(t), self.time_text_embed_2(target_time), t, target_time
        )
        return self.head(self.body(x_t) + time + tokens)
'''

NEW_SPEC = '''
"""The line family (a backbone added by a test)."""
from apex_dist.models.spec import LatentGeometry, ModelSpec, condition_shift_arguments


class LineSpec(ModelSpec):
    family = "line"
    presets = {"line-tiny": {"width": 8}}
    image_space = "points"

    def build(self, architecture, condition_shift=None):
        from line_model import LineModel

        shift = condition_shift_arguments(condition_shift or self.default_condition_shift)
        return LineModel(**architecture, **shift)

    def geometry(self, architecture):
        return LatentGeometry("points", 3)


SPEC = LineSpec()
'''


def test_a_new_backbone_is_one_spec_file_plus_its_model_file(tmp_path, monkeypatch):
    from apex_dist.models import specs

    models, spec_folder = tmp_path / "models", tmp_path / "specs"
    models.mkdir()
    spec_folder.mkdir()
    (models / "line_model.py").write_text(textwrap.dedent(NEW_MODEL))
    (spec_folder / "line.py").write_text(textwrap.dedent(NEW_SPEC))
    monkeypatch.syspath_prepend(str(models))
    monkeypatch.setattr(specs, "__path__", [*specs.__path__, str(spec_folder)])
    monkeypatch.setattr(spec_module, "_SPECS", None)

    assert "line-tiny" in preset_names()
    config = config_for()
    config.model.preset = "line-tiny"  # config validation keeps its own torch-free list
    from apex_dist.data.prepare import latent_geometry

    assert latent_geometry(config) == LatentGeometry("points", 3)
    model = build_training_model(config, CPU, ZERO2_JSON)
    assert torch.equal(model.time_text_embed_2.mlp[0].weight, model.time_text_embed.mlp[0].weight)
    t = torch.rand(2)
    out = model(torch.randn(2, 3), t, t, torch.randn(2, 5, 4), torch.ones(2, 5, dtype=bool))
    assert out.shape == (2, 3)
