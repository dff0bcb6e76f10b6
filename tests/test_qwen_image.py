"""Qwen-Image MMDiT: diffusers key and number parity, the APEX additions, activation
checkpointing, presets and input errors (tiny configs, fp32, CPU).

Parity is measured against diffusers' `QwenImageTransformer2DModel` built from the same config
with randomly perturbed weights (so that norm gains and biases differ per parameter). Padded
text is compared two ways: with diffusers' batched call given the same mask, and with diffusers
called on each row alone with its text cut to its own length (no padding at all).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

import apex_kernels
from apex_dist.models import init_apex_weights, model_spec
from apex_dist.models.qwen_image import (
    QWEN_IMAGE_PRESETS,
    QwenImageTransformer,
    count_parameters,
    is_apex_key,
)

TINY = QWEN_IMAGE_PRESETS["qwen-image-tiny"]
TEXT_TOKENS = 7
# Largest |ours - diffusers| accepted in fp32 (measured: 0 batched, below 1e-6 per row).
PARITY_TOLERANCE = 1e-5
# Standard deviation of the noise added to every diffusers parameter before comparing.
WEIGHT_PERTURBATION = 0.1
# Qwen-Image's transformer has 20.43 B parameters (model card); the count must agree to 0.01 B.
QWEN_IMAGE_20B_PARAMETERS = 20.43e9
PARAMETER_COUNT_TOLERANCE = 0.01e9
# Exact count documented for the 0.6b preset in apex_dist/models/qwen_image.py.
QWEN_IMAGE_06B_PARAMETERS = 611_698_240
# A tiny forward must stay far below this on one CPU core (measured: a few milliseconds).
TINY_FORWARD_SECONDS = 1.0

# The last block's text stream after attention feeds nothing (only image tokens reach the
# output), in diffusers as here: these parameters never receive a gradient.
UNUSED_BY_THE_OUTPUT = {
    f"transformer_blocks.{TINY['num_layers'] - 1}.{name}"
    for name in (
        "attn.to_add_out.weight",
        "attn.to_add_out.bias",
        "txt_mlp.net.0.proj.weight",
        "txt_mlp.net.0.proj.bias",
        "txt_mlp.net.2.weight",
        "txt_mlp.net.2.bias",
    )
}

APEX_KEYS = {
    "time_text_embed_2.timestep_embedder.linear_1.weight",
    "time_text_embed_2.timestep_embedder.linear_1.bias",
    "time_text_embed_2.timestep_embedder.linear_2.weight",
    "time_text_embed_2.timestep_embedder.linear_2.bias",
    "condition_shift.scale",
    "condition_shift.bias",
}


@pytest.fixture(scope="module")
def pretrained() -> QwenImageTransformer2DModel:
    """diffusers' model at the tiny preset with perturbed weights."""
    torch.manual_seed(0)
    reference = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * WEIGHT_PERTURBATION)
    return reference


@pytest.fixture
def model(pretrained) -> QwenImageTransformer:
    """Our model with diffusers' weights loaded (E2 re-copied from the loaded E1)."""
    model = QwenImageTransformer(**TINY).eval()
    model.load_pretrained_state_dict(pretrained.state_dict())
    return model


def make_inputs(image_shape, batch, text_lengths=None, seed=0):
    """Packed latents, times, text and mask for a (frames, height, width) grid."""
    generator = torch.Generator().manual_seed(seed)
    frames, height, width = image_shape
    text_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)
    for row, length in enumerate(text_lengths or ()):
        text_mask[row, length:] = False
    return {
        "x_t": torch.randn(
            batch, frames * height * width, TINY["in_channels"], generator=generator
        ),
        "t": torch.rand(batch, generator=generator),
        "text": torch.randn(batch, TEXT_TOKENS, TINY["joint_attention_dim"], generator=generator),
        "text_mask": text_mask,
    }


def run_model(model, inputs, image_shape, target_time=None, fake_rows=None):
    t = inputs["t"]
    return model(
        inputs["x_t"],
        t,
        t if target_time is None else target_time,
        inputs["text"],
        inputs["text_mask"],
        torch.zeros_like(t, dtype=torch.bool) if fake_rows is None else fake_rows,
        image_shape=image_shape,
    )


def run_diffusers(pretrained, inputs, image_shape, rows=slice(None), text_tokens=None):
    text_tokens = TEXT_TOKENS if text_tokens is None else text_tokens
    x_t = inputs["x_t"][rows]
    return pretrained(
        hidden_states=x_t,
        encoder_hidden_states=inputs["text"][rows, :text_tokens],
        encoder_hidden_states_mask=inputs["text_mask"][rows, :text_tokens],
        timestep=inputs["t"][rows],
        img_shapes=[image_shape] * x_t.shape[0],
        return_dict=False,
    )[0]


# --------------------------------------------------------------------------------------------
# keys, shapes, loading


def test_state_dict_is_diffusers_plus_exactly_the_apex_keys(pretrained):
    ours = QwenImageTransformer(**TINY).state_dict()
    theirs = pretrained.state_dict()
    assert set(ours) - set(theirs) == APEX_KEYS
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
    assert {key for key in ours if is_apex_key(key)} == APEX_KEYS

    model = QwenImageTransformer(**TINY)
    result = model.load_state_dict(theirs, strict=False)
    assert set(result.missing_keys) == APEX_KEYS and result.unexpected_keys == []
    # and back: the diffusers-compatible part loads into diffusers strictly
    exported = {key: value for key, value in model.state_dict().items() if not is_apex_key(key)}
    QwenImageTransformer2DModel(**TINY).load_state_dict(exported, strict=True)


def test_random_init_is_diffusers_then_e2_drawn_last_and_set_to_e1():
    """Built from a seed, every diffusers weight equals diffusers' own init and E2 draws after
    all of them (the random stream of every run is unchanged by E2 being a module of its own);
    `init_apex_weights` then makes E2 an equal copy of E1."""
    from apex_dist.models.qwen_image import TimeEmbedding

    torch.manual_seed(0)
    theirs = QwenImageTransformer2DModel(**TINY).state_dict()
    expected_e2 = TimeEmbedding(TINY["num_attention_heads"] * TINY["attention_head_dim"])
    torch.manual_seed(0)
    model = model_spec("qwen-image-tiny").build(QWEN_IMAGE_PRESETS["qwen-image-tiny"])
    ours = model.state_dict()
    assert all(torch.equal(ours[key], value) for key, value in theirs.items())
    for key, value in expected_e2.state_dict().items():
        assert torch.equal(ours[f"time_text_embed_2.{key}"], value), key
    init_apex_weights(model)
    pairs = zip(
        model.time_text_embed.parameters(), model.time_text_embed_2.parameters(), strict=True
    )
    for first, second in pairs:
        assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()


def test_second_time_embedding_is_the_loaded_first_after_loading_a_diffusers_state(pretrained):
    model = QwenImageTransformer(**TINY)
    missing = model.load_pretrained_state_dict(pretrained.state_dict())
    assert set(missing) == APEX_KEYS
    loaded = pretrained.time_text_embed.timestep_embedder.state_dict()
    for name, value in model.time_text_embed_2.timestep_embedder.state_dict().items():
        assert torch.equal(value, loaded[name]), name


def test_loading_rejects_a_state_dict_with_missing_or_unknown_keys(pretrained):
    state = dict(pretrained.state_dict())
    state.pop("proj_out.bias")
    state["proj_out.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['proj_out.bias'\].*proj_out.extra"):
        QwenImageTransformer(**TINY).load_pretrained_state_dict(state)


def test_diffusers_config_round_trip():
    config = {  # Qwen-Image's transformer/config.json, at the tiny sizes
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": "0.34.0",
        "guidance_embeds": False,
        "pooled_projection_dim": 768,
        **TINY,
        "axes_dims_rope": list(TINY["axes_dims_rope"]),
    }
    model = QwenImageTransformer.from_diffusers_config(config, shift_scale=-1.0)
    assert float(model.condition_shift.scale) == -1.0
    exported = {k: v for k, v in model.diffusers_config().items() if not k.startswith("_")}
    assert QwenImageTransformer2DModel(**exported).state_dict().keys() == {
        key for key in model.state_dict() if not is_apex_key(key)
    }
    with pytest.raises(ValueError, match="zero_cond_t=True"):
        QwenImageTransformer.from_diffusers_config({**config, "zero_cond_t": True})
    with pytest.raises(ValueError, match="unknown key 'num_layer'"):
        QwenImageTransformer.from_diffusers_config({**config, "num_layer": 3})


def test_construction_rejects_sizes_whose_output_is_not_the_shape_of_x_t():
    with pytest.raises(ValueError, match="in_channels = 12"):
        QwenImageTransformer(**{**TINY, "in_channels": 12})
    with pytest.raises(ValueError, match="attention_head_dim = 16"):
        QwenImageTransformer(**{**TINY, "axes_dims_rope": (4, 4, 4)})


# --------------------------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize(
    ("image_shape", "batch", "text_lengths"),
    [
        ((1, 4, 4), 1, None),
        ((1, 3, 5), 2, None),  # non-square, odd sides
        ((1, 6, 2), 3, None),
        ((2, 2, 3), 3, (7, 3, 5)),  # two frames, padded text of different lengths per row
        ((1, 5, 3), 2, (2, 6)),
    ],
)
def test_parity_with_diffusers(model, pretrained, image_shape, batch, text_lengths):
    inputs = make_inputs(image_shape, batch, text_lengths)
    with torch.no_grad():
        ours = run_model(model, inputs, image_shape)
        theirs = run_diffusers(pretrained, inputs, image_shape)
    assert ours.shape == inputs["x_t"].shape
    batched_difference = (ours - theirs).abs().max().item()
    print(f"{image_shape} batch {batch} text {text_lengths}: batched {batched_difference:.2e}")
    assert batched_difference <= PARITY_TOLERANCE
    if text_lengths is not None:  # each row alone, its text cut to its own length
        with torch.no_grad():
            per_row = torch.cat(
                [
                    run_diffusers(pretrained, inputs, image_shape, slice(row, row + 1), length)
                    for row, length in enumerate(text_lengths)
                ]
            )
        row_difference = (ours - per_row).abs().max().item()
        print(f"  per row unpadded {row_difference:.2e}")
        assert row_difference <= PARITY_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounds_as_diffusers(model, pretrained, dtype):
    """The same operations in the same order: bit-equal outputs in bf16 and fp16 too."""
    image_shape = (1, 3, 5)
    inputs = make_inputs(image_shape, 2, text_lengths=(4, 7), seed=3)
    inputs = {
        name: value.to(dtype) if value.is_floating_point() and name != "t" else value
        for name, value in inputs.items()
    }
    with torch.no_grad():
        ours = run_model(model.to(dtype), inputs, image_shape)
        theirs = run_diffusers(copy.deepcopy(pretrained).to(dtype), inputs, image_shape)
    assert ours.dtype == dtype
    assert torch.equal(ours, theirs)


def test_attention_gets_no_mask_without_padding_and_a_boolean_key_mask_with_it(model, monkeypatch):
    masks = []
    reference_attention = apex_kernels.attention

    def recording_attention(query, key, value, key_padding_mask=None):
        masks.append(key_padding_mask)
        return reference_attention(query, key, value, key_padding_mask)

    monkeypatch.setattr(apex_kernels, "attention", recording_attention)
    image_shape = (1, 3, 4)
    with torch.no_grad():
        run_model(model, make_inputs(image_shape, 2), image_shape)
        assert masks == [None] * TINY["num_layers"]
        masks.clear()
        run_model(model, make_inputs(image_shape, 2, text_lengths=(3, 7)), image_shape)
    assert len(masks) == TINY["num_layers"]
    mask = masks[0]
    assert mask.dtype == torch.bool and mask.shape == (2, TEXT_TOKENS + 12)
    assert mask[0].tolist() == [True] * 3 + [False] * 4 + [True] * 12
    assert mask[1].all()


# --------------------------------------------------------------------------------------------
# APEX additions


def test_target_time_equal_to_t_is_the_pretrained_model(model, pretrained):
    image_shape = (1, 3, 5)
    inputs = make_inputs(image_shape, 3, seed=1)
    with torch.no_grad():
        before = run_model(model, inputs, image_shape)
        for parameter in model.time_text_embed_2.parameters():  # E2 trained away from E1
            parameter.add_(torch.randn_like(parameter))
        after = run_model(model, inputs, image_shape)
        expected = run_diffusers(pretrained, inputs, image_shape)
        shifted_target = run_model(model, inputs, image_shape, target_time=inputs["t"] * 0.5)
    assert torch.equal(after, before)
    assert (after - expected).abs().max().item() <= PARITY_TOLERANCE
    assert (shifted_target - after).abs().amax(dim=(1, 2)).min().item() > 1e-3


def test_condition_shift_changes_only_fake_rows_after_the_text_projection(model):
    image_shape = (1, 2, 3)
    inputs = make_inputs(image_shape, 3, text_lengths=(7, 4, 5), seed=2)
    seen = {}
    model.condition_shift.register_forward_hook(
        lambda module, arguments, output: seen.update(projected=arguments[0], shifted=output)
    )
    fake = torch.tensor([False, True, False])
    with torch.no_grad():
        real = run_model(model, inputs, image_shape)
        mixed = run_model(model, inputs, image_shape, fake_rows=fake)
        expected_projection = model.txt_in(model.txt_norm(inputs["text"]))
    assert torch.equal(seen["projected"], expected_projection)  # after txt_norm and txt_in
    assert torch.allclose(seen["shifted"][1], -0.5 * seen["projected"][1] + 1.0)
    assert torch.equal(seen["shifted"][~fake], seen["projected"][~fake])
    assert torch.allclose(mixed[~fake], real[~fake], rtol=0, atol=1e-6)
    assert (mixed[1] - real[1]).abs().max().item() > 1e-3


def test_learnable_shift_and_second_time_embedding_receive_gradients():
    model = QwenImageTransformer(**TINY, shift_learnable=True)
    image_shape = (1, 2, 2)
    inputs = make_inputs(image_shape, 2)
    output = run_model(
        model,
        inputs,
        image_shape,
        target_time=inputs["t"] * 0.5,
        fake_rows=torch.tensor([True, False]),
    )
    output.square().mean().backward()
    assert model.condition_shift.scale.grad is not None
    assert model.condition_shift.bias.grad is not None
    assert model.time_text_embed_2.timestep_embedder.linear_1.weight.grad.abs().sum() > 0
    assert model.parameter_counts()["apex"] == 2 + count_parameters(model.time_text_embed_2)


# --------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.mark.parametrize(("every", "blocks_recomputed"), [(1, 2), (2, 1)])
def test_activation_checkpointing_keeps_outputs_and_gradients(every, blocks_recomputed):
    """Bit-equal outputs and gradients with every block or every second block checkpointed."""
    torch.manual_seed(0)
    model = QwenImageTransformer(**TINY)
    image_shape = (1, 3, 3)
    inputs = make_inputs(image_shape, 2, text_lengths=(4, 7))
    target_time = inputs["t"] * 0.3

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)  # fresh gradient tensors on every call
        output = run_model(
            model, inputs, image_shape, target_time, fake_rows=torch.tensor([True, False])
        )
        output.square().mean().backward()
        return output.detach(), {n: p.grad for n, p in model.named_parameters()}

    plain_output, plain_gradients = loss_and_gradients()
    calls = []
    for block in model.transformer_blocks:
        # a pre-hook: recomputation stops early, before forward hooks would run
        block.register_forward_pre_hook(lambda module, arguments: calls.append(module))
    model.enable_activation_checkpointing(every=every)
    checkpointed_output, checkpointed_gradients = loss_and_gradients()

    assert len(calls) == TINY["num_layers"] + blocks_recomputed  # recomputed in backward
    assert torch.equal(checkpointed_output, plain_output)
    for name, gradient in plain_gradients.items():
        if name in UNUSED_BY_THE_OUTPUT:
            assert gradient is None and checkpointed_gradients[name] is None, name
        else:
            assert torch.equal(checkpointed_gradients[name], gradient), name
    model.disable_activation_checkpointing()
    assert model.checkpointed_blocks == frozenset()
    with pytest.raises(ValueError, match="every=0 must be >= 1"):
        model.enable_activation_checkpointing(every=0)


# --------------------------------------------------------------------------------------------
# presets and sizes


def test_qwen_image_20b_parameter_count_on_the_meta_device():
    with torch.device("meta"):
        model = QwenImageTransformer.from_preset("qwen-image-20b")
        reference = QwenImageTransformer2DModel()
    counts = model.parameter_counts()
    print(f"qwen-image-20b parameters: {counts}")
    assert all(parameter.is_meta for parameter in model.parameters())
    assert abs(counts["pretrained"] - QWEN_IMAGE_20B_PARAMETERS) < PARAMETER_COUNT_TOLERANCE
    assert counts["pretrained"] == count_parameters(reference)
    assert counts["apex"] == count_parameters(model.time_text_embed)


def test_qwen_image_06b_preset_has_the_documented_size():
    with torch.device("meta"):
        model = QwenImageTransformer.from_preset("qwen-image-0.6b")
    assert model.parameter_counts()["pretrained"] == QWEN_IMAGE_06B_PARAMETERS
    with pytest.raises(ValueError, match="known: qwen-image-20b"):
        QwenImageTransformer.from_preset("qwen-image-7b")


def test_tiny_forward_is_fast():
    model = QwenImageTransformer.from_preset("qwen-image-tiny")
    image_shape = (1, 4, 4)
    inputs = make_inputs(image_shape, 2)
    with torch.no_grad():
        run_model(model, inputs, image_shape)  # warm-up
        start = time.perf_counter()
        run_model(model, inputs, image_shape)
        elapsed = time.perf_counter() - start
    assert elapsed < TINY_FORWARD_SECONDS


# --------------------------------------------------------------------------------------------
# input errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x_t": torch.zeros(2, 12, 8)}, r"x_t has shape \(2, 12, 8\).*in_channels=16"),
        ({"t": torch.zeros(3)}, r"t has shape \(3,\); expected \(2,\)"),
        ({"tt": torch.zeros(2, 1)}, r"tt has shape \(2, 1\); expected \(2,\)"),
        ({"text": torch.zeros(2, 7, 8)}, r"text has shape \(2, 7, 8\).*joint_attention_dim=32"),
        ({"text_mask": torch.ones(2, 5, dtype=torch.bool)}, r"text_mask has shape \(2, 5\).*"),
        ({"fake_rows": torch.zeros(3, dtype=torch.bool)}, r"fake_rows has shape \(3,\)"),
        ({"image_shape": None}, r"image_shape=\(frames, height, width\).*is required"),
        ({"image_shape": (1, 4, 4)}, r"image_shape \(1, 4, 4\) gives 16.*x_t has shape \(2, 12"),
        ({"image_shape": (3, 4)}, r"image_shape \(3, 4\) must be three positive integers"),
        ({"image_shape": 12}, r"image_shape 12 must be three positive integers"),
    ],
)
def test_wrong_inputs_raise_errors_naming_the_argument_and_shapes(change, message):
    model = QwenImageTransformer.from_preset("qwen-image-tiny")
    inputs = make_inputs((1, 3, 4), 2)
    arguments = {
        "x_t": inputs["x_t"],
        "t": inputs["t"],
        "tt": inputs["t"],
        "text": inputs["text"],
        "text_mask": inputs["text_mask"],
        "fake_rows": torch.zeros(2, dtype=torch.bool),
        "image_shape": (1, 3, 4),
    }
    arguments.update(change)
    image_shape = arguments.pop("image_shape")
    with pytest.raises(ValueError, match=message):
        model(*arguments.values(), image_shape=image_shape)


def test_config_preset_names_are_the_model_presets_and_build_the_model():
    from apex_dist.config import QWEN_IMAGE_PRESET_NAMES, Config, from_dict
    from apex_dist.models import build_model

    assert set(QWEN_IMAGE_PRESET_NAMES) == set(QWEN_IMAGE_PRESETS)
    config = from_dict(
        Config,
        {"model": {"preset": "qwen-image-tiny"}, "method": {"condition_shift": {"scale": -1.0}}},
    )
    model = build_model(config)
    assert isinstance(model, QwenImageTransformer)
    assert model.condition_shift.scale.item() == -1.0
