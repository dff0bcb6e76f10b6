"""Fused Triton kernels: parity with their PyTorch references (forward and gradients), their
fallbacks, and the Qwen-Image model with the kernels wired in.

Without CUDA the kernels run in Triton's interpreter on CPU: the module fixture sets
TRITON_INTERPRET=1, re-imports the kernels under it and restores the environment afterwards.
With CUDA they run compiled on the GPU. Shapes are tiny but span several programs per kernel
and widths that are not powers of two, so masking and partial reductions are exercised.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional

import apex_kernels
from apex_dist.models.qwen_image import (
    NORM_EPS,
    QWEN_IMAGE_PRESETS,
    QwenImageTransformer,
    RMSNorm,
    apply_rotary,
    modulate,
)
from apex_kernels import fused
from apex_kernels.modulation import gated_residual_reference, layer_norm_modulate_reference
from apex_kernels.norm_rope import rms_norm_rotary_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernels differ from the references by summation order (measured below 2e-6).
FP32_TOLERANCE = 1e-5
# One bf16 rounding of values of magnitude up to ~4 (2^-8 relative, 2 ulp).
BF16_TOLERANCE = 4 * 2**-8 * 2


@pytest.fixture(scope="module", autouse=True)
def triton_kernels():
    """The kernels module, interpreted on CPU; the fused mode "always" for the module."""
    previous = os.environ.get("TRITON_INTERPRET")
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    module = fused.triton_kernels(reload=True)
    assert (DEVICE == "cpu") == module.INTERPRETED
    try:
        with apex_kernels.fused_kernels("always"):
            yield module
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def randn(*shape, seed, dtype=torch.float32, requires_grad=False, scale=1.0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(*shape, generator=generator) * scale + offset
    return tensor.to(DEVICE, dtype).requires_grad_(requires_grad)


def assert_gradients_match(fused_output, reference_output, inputs, seed=99):
    grad_output = randn(*fused_output.shape, seed=seed)
    ours = torch.autograd.grad(fused_output, inputs, grad_output)
    theirs = torch.autograd.grad(reference_output, inputs, grad_output)
    for index, (mine, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert mine.dtype == expected.dtype, index
        torch.testing.assert_close(mine, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


def rotary_tables(tokens, half_dim, seed):
    angles = randn(tokens, half_dim, seed=seed, scale=3.0)
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------------
# RMSNorm of q/k + rotary

# 2 x 70 tokens x 4 heads = 560 rows: two programs of 512 rows at head_dim 16; head_dim 12 has
# 6 channel pairs in a block of 8.
NORM_ROPE_SHAPES = [(2, 70, 4, 16), (2, 5, 3, 12)]


@pytest.mark.parametrize("shape", NORM_ROPE_SHAPES)
def test_rms_norm_rotary_matches_reference_forward_and_backward(shape, triton_kernels):
    _, tokens, _, head_dim = shape
    hidden = randn(*shape, seed=0, requires_grad=True, scale=2.0)
    weight = randn(head_dim, seed=1, requires_grad=True, scale=0.2, offset=1.0)
    cos, sin = rotary_tables(tokens, head_dim // 2, seed=2)
    launches = triton_kernels.LAUNCHES.copy()
    output = apex_kernels.rms_norm_rotary(hidden, weight, cos, sin, NORM_EPS)
    expected = rms_norm_rotary_reference(hidden, weight, cos, sin, NORM_EPS)
    torch.testing.assert_close(output, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    assert_gradients_match(output, expected, (hidden, weight))
    assert triton_kernels.LAUNCHES["rms_norm_rotary_forward"] == (
        launches["rms_norm_rotary_forward"] + 1
    )
    assert triton_kernels.LAUNCHES["rms_norm_rotary_backward"] == (
        launches["rms_norm_rotary_backward"] + 1
    )


def test_rms_norm_rotary_without_weight_gradient(triton_kernels):
    """LoRA training: frozen gain, the input gradient alone."""
    hidden = randn(2, 5, 3, 16, seed=0, requires_grad=True)
    weight = randn(16, seed=1, offset=1.0)
    cos, sin = rotary_tables(5, 8, seed=2)
    output = apex_kernels.rms_norm_rotary(hidden, weight, cos, sin, NORM_EPS)
    expected = rms_norm_rotary_reference(hidden, weight, cos, sin, NORM_EPS)
    assert_gradients_match(output, expected, (hidden,))


def test_rms_norm_rotary_bf16_is_within_one_rounding_of_fp32():
    hidden = randn(2, 5, 3, 16, seed=0, dtype=torch.bfloat16)
    weight = randn(16, seed=1, dtype=torch.bfloat16, scale=0.2, offset=1.0)
    cos, sin = rotary_tables(5, 8, seed=2)
    output = apex_kernels.rms_norm_rotary(hidden, weight, cos, sin, NORM_EPS)
    exact = rms_norm_rotary_reference(hidden.float(), weight.float(), cos, sin, NORM_EPS)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), exact, atol=BF16_TOLERANCE, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rotary_reference_is_the_models_norm_then_rotary(dtype):
    hidden = randn(2, 5, 3, 16, seed=0, dtype=dtype)
    norm = RMSNorm(16).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(16, seed=1, scale=0.2, offset=1.0))
    cos, sin = rotary_tables(5, 8, seed=2)
    expected = apply_rotary(norm(hidden), cos, sin)
    actual = rms_norm_rotary_reference(hidden, norm.weight, cos, sin, norm.eps)
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)


# --------------------------------------------------------------------------------------------
# adaptive LayerNorm modulation and gated residual

# 150 tokens at width 24 (a block of 32): two programs of 128 rows per batch row.
MODULATION_SHAPES = [(2, 150, 24), (3, 4, 32)]


@pytest.mark.parametrize("shape", MODULATION_SHAPES)
def test_layer_norm_modulate_matches_reference_forward_and_backward(shape, triton_kernels):
    batch, _, width = shape
    hidden = randn(*shape, seed=0, requires_grad=True, scale=3.0, offset=0.5)
    shift = randn(batch, 1, width, seed=1, requires_grad=True)
    scale = randn(batch, 1, width, seed=2, requires_grad=True, scale=0.5)
    launches = triton_kernels.LAUNCHES.copy()
    output = apex_kernels.layer_norm_modulate(hidden, shift, scale, NORM_EPS)
    expected = layer_norm_modulate_reference(hidden, shift, scale, NORM_EPS)
    torch.testing.assert_close(output, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    assert_gradients_match(output, expected, (hidden, shift, scale))
    assert triton_kernels.LAUNCHES["layer_norm_modulate_forward"] == (
        launches["layer_norm_modulate_forward"] + 1
    )
    assert triton_kernels.LAUNCHES["layer_norm_modulate_backward"] == (
        launches["layer_norm_modulate_backward"] + 1
    )


@pytest.mark.parametrize("shape", MODULATION_SHAPES)
def test_gated_residual_matches_reference_forward_and_backward(shape, triton_kernels):
    batch, _, width = shape
    residual = randn(*shape, seed=0, requires_grad=True)
    gate = randn(batch, 1, width, seed=1, requires_grad=True)
    update = randn(*shape, seed=2, requires_grad=True)
    launches = triton_kernels.LAUNCHES["gated_residual_forward"]
    output = apex_kernels.gated_residual(residual, gate, update)
    expected = gated_residual_reference(residual, gate, update)
    torch.testing.assert_close(output, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    assert_gradients_match(output, expected, (residual, gate, update))
    assert triton_kernels.LAUNCHES["gated_residual_forward"] == launches + 1


def test_modulation_bf16_is_within_one_rounding_of_fp32():
    hidden = randn(2, 7, 24, seed=0, dtype=torch.bfloat16)
    shift = randn(2, 24, seed=1, dtype=torch.bfloat16)
    scale = randn(2, 24, seed=2, dtype=torch.bfloat16, scale=0.5)
    update = randn(2, 7, 24, seed=3, dtype=torch.bfloat16)
    modulated = apex_kernels.layer_norm_modulate(hidden, shift, scale, NORM_EPS)
    exact = layer_norm_modulate_reference(hidden.float(), shift.float(), scale.float(), NORM_EPS)
    assert modulated.dtype == torch.bfloat16
    torch.testing.assert_close(modulated.float(), exact, atol=BF16_TOLERANCE, rtol=0)
    residual = apex_kernels.gated_residual(hidden, shift, update)
    exact = gated_residual_reference(hidden.float(), shift.float(), update.float())
    torch.testing.assert_close(residual.float(), exact, atol=BF16_TOLERANCE, rtol=0)


def test_modulation_reference_is_the_models_layer_norm_then_modulate():
    hidden = randn(2, 7, 24, seed=0)
    parameters = randn(2, 3 * 24, seed=1)
    norm = nn.LayerNorm(24, elementwise_affine=False, eps=NORM_EPS)
    expected, gate = modulate(norm(hidden), parameters)
    shift, scale, _ = parameters.chunk(3, dim=-1)
    assert torch.equal(layer_norm_modulate_reference(hidden, shift, scale, NORM_EPS), expected)
    update = randn(2, 7, 24, seed=2)
    assert torch.equal(gated_residual_reference(hidden, gate, update), hidden + gate * update)


def test_shape_errors_name_the_argument():
    hidden = randn(2, 7, 24, seed=0)
    with pytest.raises(ValueError, match=r"shift has shape \(2, 23\); expected \(2, 24\)"):
        apex_kernels.layer_norm_modulate(hidden, randn(2, 23, seed=1), randn(2, 24, seed=2), 1e-6)
    with pytest.raises(ValueError, match="cos .* must both be"):
        apex_kernels.rms_norm_rotary(
            randn(1, 4, 2, 8, seed=0),
            randn(8, seed=1),
            randn(3, 4, seed=2),
            randn(3, 4, seed=3),
            1e-6,
        )


# --------------------------------------------------------------------------------------------
# fallbacks


def test_fallbacks_take_the_reference_and_launch_nothing(triton_kernels, monkeypatch):
    hidden = randn(2, 7, 24, seed=0)
    shift, scale = randn(2, 24, seed=1), randn(2, 24, seed=2)
    launches = sum(triton_kernels.LAUNCHES.values())
    expected = layer_norm_modulate_reference(hidden, shift, scale, NORM_EPS)
    with apex_kernels.fused_kernels("never"):
        assert not apex_kernels.fused_kernels_enabled(hidden)
        assert torch.equal(
            apex_kernels.layer_norm_modulate(hidden, shift, scale, NORM_EPS), expected
        )
    if DEVICE == "cpu":  # "auto" runs kernels on CUDA only
        with apex_kernels.fused_kernels(True):
            assert not apex_kernels.fused_kernels_enabled(hidden)
        with monkeypatch.context() as patch:  # the interpreter is needed on CPU
            patch.delenv("TRITON_INTERPRET")
            assert not apex_kernels.fused_kernels_enabled(hidden)
    monkeypatch.setattr(fused, "triton_available", lambda: False)  # no Triton installed
    assert not apex_kernels.fused_kernels_enabled(hidden)
    assert torch.equal(apex_kernels.layer_norm_modulate(hidden, shift, scale, NORM_EPS), expected)
    assert sum(triton_kernels.LAUNCHES.values()) == launches
    with pytest.raises(ValueError, match="fused kernel mode 'sometimes' is unknown"):
        apex_kernels.set_fused_kernels("sometimes")


# --------------------------------------------------------------------------------------------
# the model with the kernels wired in

TINY = QWEN_IMAGE_PRESETS["qwen-image-tiny"]
IMAGE_SHAPE = (1, 3, 4)
TEXT_TOKENS = 7


def tiny_model_inputs():
    torch.manual_seed(0)
    model = QwenImageTransformer(**TINY).to(DEVICE)
    with torch.no_grad():  # perturb every parameter so that norms and gates are not trivial
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    batch, tokens = 2, IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    text_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=DEVICE)
    text_mask[1, 3:] = False
    inputs = (
        randn(batch, tokens, TINY["in_channels"], seed=1),
        torch.tensor([0.7, 0.3], device=DEVICE),
        torch.tensor([0.2, 0.0], device=DEVICE),
        randn(batch, TEXT_TOKENS, TINY["joint_attention_dim"], seed=2),
        text_mask,
        torch.tensor([False, True], device=DEVICE),
    )
    return model, inputs


def loss_and_gradients(model, inputs):
    output = model(*inputs, image_shape=IMAGE_SHAPE)
    loss = output.square().mean()
    # the last block's text branch after attention feeds nothing: its gradients are None
    gradients = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return output.detach(), gradients


def test_model_with_fused_kernels_equals_the_eager_model(triton_kernels):
    model, inputs = tiny_model_inputs()
    model.enable_activation_checkpointing()
    with apex_kernels.fused_kernels("never"):
        expected_output, expected_gradients = loss_and_gradients(model, inputs)
    launches = triton_kernels.LAUNCHES.copy()
    output, gradients = loss_and_gradients(model, inputs)
    torch.testing.assert_close(output, expected_output, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    assert sum(gradient is not None for gradient in gradients) > len(gradients) // 2
    for ours, theirs in zip(gradients, expected_gradients, strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    blocks = TINY["num_layers"]
    # per block: 4 q/k norms, 4 modulations, 4 gated residuals (forward, then recomputed)
    ran = triton_kernels.LAUNCHES - launches
    assert ran["rms_norm_rotary_forward"] == 2 * 4 * blocks
    assert ran["rms_norm_rotary_backward"] == 4 * blocks
    assert ran["layer_norm_modulate_forward"] == 2 * 4 * blocks
    assert ran["gated_residual_forward"] == 2 * 4 * blocks


def test_compiled_blocks_equal_the_eager_model():
    model, inputs = tiny_model_inputs()
    with apex_kernels.fused_kernels("never"), torch.no_grad():
        expected = model(*inputs, image_shape=IMAGE_SHAPE)
        torch._dynamo.reset()
        assert apex_kernels.compile_blocks(model, backend="eager") == TINY["num_layers"]
        compiled = model(*inputs, image_shape=IMAGE_SHAPE)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
    with pytest.raises(ValueError, match="not an nn.ModuleList"):
        apex_kernels.compile_blocks(functional, attribute="blocks")
