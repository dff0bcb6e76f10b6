"""LoRA on the Qwen-Image transformer: presets, what trains, the frozen base, state dicts in
apex and diffusers naming, diffusers parity, the 20B trainable count, and the config section.
Tiny preset, fp32 (one bf16 case), CPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from apex_dist.config import (
    LORA_INITIALISATIONS,
    LORA_TARGET_PRESET_NAMES,
    Config,
    ConfigError,
    LoraConfig,
    from_dict,
)
from apex_dist.models.lora import (
    BASE_TARGET_TIME_EMBEDDING,
    LORA_TARGET_PRESETS,
    PEFT_INITIALISATIONS,
    adapters_disabled,
    apply_lora,
    from_diffusers_lora,
    load_lora_state_dict,
    lora_state_dict,
    target_modules,
    to_diffusers_lora,
)
from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageTransformer

TINY = QWEN_IMAGE_PRESETS["qwen-image-tiny"]
TEXT_TOKENS = 5
IMAGE_SHAPE = (1, 2, 2)
# Largest |ours - diffusers| accepted with the same LoRA in fp32 (the brief's bound).
PARITY_TOLERANCE = 1e-5
# Standard deviation of the random values written into adapters and E2 to make them matter.
PERTURBATION = 0.2
# Hand count for qwen-image-20b at rank 64, targets attention_mlp_time (lora.py docstring):
# 60 blocks x (8 x 64 x (3072 + 3072) + 4 x 64 x (3072 + 12288)) + 64 x (256 + 3072)
# + 64 x (3072 + 3072).
QWEN_IMAGE_20B_ADAPTER_PARAMETERS = 425_279_488
# E2 = (256 x 3072 + 3072) + (3072 x 3072 + 3072).
QWEN_IMAGE_20B_E2_PARAMETERS = 10_229_760
QWEN_IMAGE_20B_BASE_PARAMETERS = 20_430_401_088
# Orthogonal init: B @ A = 0 in exact arithmetic; fp32 rounding moves the tiny model's output
# by up to 6e-7 (measured with outputs of order 1).
ORTHOGONAL_START_TOLERANCE = 1e-5

ATTENTION_LAYERS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
MLP_LAYERS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
TIME_LAYERS = (
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)


def lora_settings(**changes) -> LoraConfig:
    return dataclasses.replace(LoraConfig(enabled=True, rank=4, alpha=4.0), **changes)


def tiny_model(seed: int = 0, **options) -> QwenImageTransformer:
    torch.manual_seed(seed)
    model = QwenImageTransformer(**TINY, **options).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def make_inputs(batch=2, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    tokens = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    t = torch.rand(batch, generator=generator)
    return {
        "x_t": torch.randn(batch, tokens, TINY["in_channels"], generator=generator).to(dtype),
        "t": t.to(dtype),
        "tt": (t * 0.3).to(dtype),  # tt != t so that E2 matters
        "text": torch.randn(
            batch, TEXT_TOKENS, TINY["joint_attention_dim"], generator=generator
        ).to(dtype),
        "text_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
        "fake_rows": torch.tensor([True, False]),
    }


def run(model, inputs, same_time=False):
    target_time = inputs["t"] if same_time else inputs["tt"]
    return model(
        inputs["x_t"],
        inputs["t"],
        target_time,
        inputs["text"],
        inputs["text_mask"],
        inputs["fake_rows"],
        image_shape=IMAGE_SHAPE,
    )


@torch.no_grad()
def perturb_trainable(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.requires_grad:
            noise = torch.randn(parameter.shape, generator=generator) * PERTURBATION
            parameter.add_(noise.to(parameter.dtype))


# --------------------------------------------------------------------------------------------
# presets and what trains


def test_presets_target_the_documented_modules_and_not_e2():
    model = tiny_model()
    blocks = range(TINY["num_layers"])
    expected_attention = {
        f"transformer_blocks.{b}.{name}" for b in blocks for name in ATTENTION_LAYERS
    }
    expected_mlp = {f"transformer_blocks.{b}.{name}" for b in blocks for name in MLP_LAYERS}
    assert set(target_modules(model, "attention")) == expected_attention
    assert set(target_modules(model, "attention_mlp")) == expected_attention | expected_mlp
    assert set(target_modules(model, "attention_mlp_time")) == (
        expected_attention | expected_mlp | set(TIME_LAYERS)
    )
    assert set(LORA_TARGET_PRESETS) == set(LORA_TARGET_PRESET_NAMES)
    assert set(PEFT_INITIALISATIONS) == set(LORA_INITIALISATIONS)


def test_qwen_image_20b_trainable_parameters_at_rank_64_on_meta():
    with torch.device("meta"):
        model = QwenImageTransformer.from_preset("qwen-image-20b")
    counts = apply_lora(model, LoraConfig(enabled=True))  # rank 64, alpha 64, all targets
    assert counts["adapter"] == QWEN_IMAGE_20B_ADAPTER_PARAMETERS  # about 0.42 B
    assert counts["full"] == QWEN_IMAGE_20B_E2_PARAMETERS
    assert counts["trainable"] == QWEN_IMAGE_20B_ADAPTER_PARAMETERS + QWEN_IMAGE_20B_E2_PARAMETERS
    assert counts["frozen"] == QWEN_IMAGE_20B_BASE_PARAMETERS
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts["trainable"]


def test_apply_lora_on_bf16_base_freezes_base_and_trains_fp32_adapters_and_e2():
    model = tiny_model(shift_learnable=True).to(torch.bfloat16)
    inputs = make_inputs(dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    reference.time_text_embed_2.float()  # what apply_lora makes of E2 and the shift
    reference.condition_shift.float()
    with torch.no_grad():
        before = run(reference, inputs)
    counts = apply_lora(model, lora_settings())
    names = dict(model.named_parameters())
    assert not any(name.startswith("base_model") for name in names)  # diffusers paths kept
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in names
    for name, parameter in names.items():
        if ".lora_" in name:
            assert parameter.dtype == torch.float32 and parameter.requires_grad, name
        elif name.startswith(("time_text_embed_2.", "condition_shift.")):
            # fp32 like the adapters: ZeRO-3 packs all trainable parameters in one dtype
            assert parameter.dtype == torch.float32 and parameter.requires_grad, name
        else:
            assert parameter.dtype == torch.bfloat16 and not parameter.requires_grad, name
    assert counts["full"] == sum(
        p.numel() for n, p in names.items() if n.startswith(("time_text_embed_2.", "condition"))
    )
    with torch.no_grad():
        assert torch.equal(run(model, inputs), before)  # B = 0: the adapted model starts as base

    run(model, inputs).float().square().mean().backward()
    assert all(names[n].grad is None for n in names if not names[n].requires_grad)
    assert names["transformer_blocks.0.attn.to_q.lora_B.default.weight"].grad.abs().sum() > 0
    assert names["time_text_embed_2.timestep_embedder.linear_2.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("init", LORA_INITIALISATIONS)
def test_every_initialisation_starts_at_the_base_model(init):
    model = tiny_model()
    inputs = make_inputs()
    with torch.no_grad():
        before = run(model, inputs)
        apply_lora(model, lora_settings(init=init))
        after = run(model, inputs)
    if init == "orthogonal":  # B @ A vanishes only up to rounding (alternate orthogonal rows)
        assert (after - before).abs().max() <= ORTHOGONAL_START_TOLERANCE
    else:  # B = 0 exactly
        assert torch.equal(after, before)
    lora_a = model.get_parameter("transformer_blocks.1.img_mlp.net.2.lora_A.default.weight")
    assert lora_a.abs().sum() > 0  # A is initialised; the product with B is zero


def test_adapters_disabled_is_exactly_the_frozen_base():
    model = tiny_model()
    inputs = make_inputs()
    with torch.no_grad():
        base = run(model, inputs)
    apply_lora(model, lora_settings())
    perturb_trainable(model)  # non-zero LoRA weights and a changed E2
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        adapted = run(model, inputs)
        assert (adapted - base).abs().max() > 1e-3
        with adapters_disabled(model) as reference:
            assert torch.equal(run(reference, inputs), base)
        assert torch.equal(run(model, inputs), adapted)  # switched back on
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    # the frozen copy of E2 is neither a parameter nor part of the state dict
    assert not any(BASE_TARGET_TIME_EMBEDDING in key for key in model.state_dict())


def test_apply_lora_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="targets 'mlp_only' is unknown"):
        apply_lora(model, lora_settings(targets="mlp_only"))
    apply_lora(model, lora_settings())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, lora_settings())
    with pytest.raises(ValueError, match="no LoRA adapters"), adapters_disabled(tiny_model()):
        pass


# --------------------------------------------------------------------------------------------
# state dicts


def test_lora_state_dict_round_trips_in_apex_and_diffusers_naming():
    model = tiny_model()
    apply_lora(model, lora_settings(rank=4, alpha=8.0))
    perturb_trainable(model)
    state = lora_state_dict(model)
    modules = target_modules(tiny_model(), "attention_mlp_time")
    adapter_keys = {f"{m}.lora_{kind}.weight" for m in modules for kind in "AB"}
    e2_keys = {
        k for k in QwenImageTransformer(**TINY).state_dict() if k.startswith("time_text_embed_2.")
    }
    assert set(state) == adapter_keys | e2_keys

    converted = to_diffusers_lora(state, alpha=8.0)
    assert set(converted) == {f"transformer.{key}" for key in adapter_keys}  # one to one
    key = "transformer_blocks.0.attn.to_q.lora_B.weight"
    assert torch.equal(converted[f"transformer.{key}"], state[key] * 2.0)  # alpha / rank
    restored = from_diffusers_lora(converted, alpha=8.0)
    assert set(restored) == adapter_keys
    for name in adapter_keys:
        torch.testing.assert_close(restored[name], state[name], rtol=0, atol=0)

    fresh = tiny_model()
    apply_lora(fresh, lora_settings(rank=4, alpha=8.0))
    load_lora_state_dict(fresh, state)
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), run(model, inputs))
    with pytest.raises(ValueError, match="missing .*to_q.lora_A.weight"):
        load_lora_state_dict(
            fresh, {k: v for k, v in state.items() if "0.attn.to_q.lora_A" not in k}
        )
    with pytest.raises(ValueError, match="not a LoRA state-dict key"):
        to_diffusers_lora({"transformer_blocks.0.attn.to_q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a diffusers transformer LoRA key"):
        from_diffusers_lora({"unet.to_q.lora_A.weight": torch.zeros(1)})


def test_diffusers_loads_the_exported_lora_and_gives_the_same_output():
    """alpha != rank checks that the scale is carried into the file."""
    rank, alpha = 4, 12.0
    model = tiny_model()
    reference = QwenImageTransformer2DModel(**TINY).eval()
    reference.load_state_dict(
        {
            k: v
            for k, v in model.state_dict().items()
            if not k.startswith(("time_text_embed_2", "condition"))
        }
    )
    apply_lora(model, lora_settings(rank=rank, alpha=alpha))
    perturb_trainable(model)
    reference.load_lora_adapter(
        to_diffusers_lora(lora_state_dict(model), alpha=alpha), prefix="transformer"
    )
    inputs = make_inputs(batch=2)
    inputs["fake_rows"] = torch.tensor([False, False])
    with torch.no_grad():
        ours = run(model, inputs, same_time=True)
        theirs = reference(
            hidden_states=inputs["x_t"],
            encoder_hidden_states=inputs["text"],
            encoder_hidden_states_mask=inputs["text_mask"],
            timestep=inputs["t"],
            img_shapes=[IMAGE_SHAPE] * 2,
            return_dict=False,
        )[0]
        with adapters_disabled(model):
            base = run(model, inputs, same_time=True)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the output
    assert (ours - theirs).abs().max() <= PARITY_TOLERANCE


# --------------------------------------------------------------------------------------------
# the config section model.lora


def test_lora_config_defaults_follow_the_released_recipe():
    lora = Config().model.lora
    assert (lora.enabled, lora.rank, lora.alpha, lora.init) == (False, 64, 64.0, "gaussian")
    assert (lora.targets, lora.dropout) == ("attention_mlp_time", 0.0)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"rank": 0}, "model.lora.rank must be >= 1"),
        ({"alpha": 0}, "model.lora.alpha must be > 0"),
        ({"dropout": 1.0}, "model.lora.dropout must be in [0, 1)"),
        ({"init": "orthogonal", "rank": 5}, "model.lora.init orthogonal needs an even rank"),
        ({"init": "pissa"}, "model.lora.init must be one of"),
        ({"targets": "everything"}, "model.lora.targets must be one of"),
    ],
)
def test_lora_config_rejects_bad_values(settings, problem):
    with pytest.raises(ConfigError) as caught:
        from_dict(Config, {"model": {"preset": "qwen-image-tiny", "lora": settings}})
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems


def test_lora_needs_a_qwen_image_preset():
    with pytest.raises(ConfigError, match="model.lora.enabled needs a Qwen-Image preset"):
        from_dict(Config, {"model": {"preset": "toy-mlp", "lora": {"enabled": True}}})
    config = from_dict(Config, {"model": {"preset": "qwen-image-tiny", "lora": {"enabled": True}}})
    assert config.model.lora.enabled
