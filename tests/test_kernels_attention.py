"""Attention dispatch: every backend this machine can run equals the masked math reference,
the choice table gives the documented backend for CPU and GPU cases (pure logic), and the
padding paths (grouping by mask, flash-attn style varlen) equal the boolean-mask reference."""

from __future__ import annotations

import importlib
from typing import ClassVar

import pytest
import torch
from torch.nn import functional
from torch.nn.attention import SDPBackend, sdpa_kernel

import apex_kernels
from apex_dist.config import ATTENTION_BACKENDS, ConfigError, load_config
from apex_kernels.attention import (
    PADDING_GROUP,
    PADDING_MASK,
    PADDING_NONE,
    PADDING_VARLEN,
    AttentionCall,
    Availability,
    attention,
    attention_grouped_by_mask,
    attention_varlen,
    choose_backend,
    padding_strategy,
    rank_backends,
)

# the submodule (the package's `attention` attribute is the function)
attention_module = importlib.import_module("apex_kernels.attention")

# Largest |backend - reference| accepted: fp32 kernels differ by summation order only
# (measured below 1e-6); bf16 outputs of unit-scale attention round at 2^-8 relative.
FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2

BATCH, HEADS, TEXT_TOKENS, IMAGE_TOKENS, HEAD_DIM = 3, 2, 5, 6, 16
# Row 0 unpadded, rows 1 and 2 with the same text length (one group), as in the joint
# sequence [text (padded at its end), image]: padded keys sit in the middle.
TEXT_LENGTHS = (5, 2, 2)


def make_qkv(dtype=torch.float32, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = TEXT_TOKENS + IMAGE_TOKENS
    tensors = [
        torch.randn(BATCH, HEADS, tokens, HEAD_DIM, generator=generator).to(dtype) for _ in range(3)
    ]
    return [tensor.requires_grad_(requires_grad) for tensor in tensors]


def joint_mask(lengths=TEXT_LENGTHS):
    mask = torch.ones(len(lengths), TEXT_TOKENS + IMAGE_TOKENS, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, length:TEXT_TOKENS] = False
    return mask


def reference(query, key, value, mask=None):
    """Math SDPA with a boolean key mask, in fp32."""
    attention_mask = None if mask is None else mask[:, None, None, :]
    with sdpa_kernel(SDPBackend.MATH):
        return functional.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=attention_mask
        )


def torch_varlen(query, key, value, cumulative_q, cumulative_k, max_q, max_k):
    """flash-attn's `flash_attn_varlen_func` contract on (tokens, heads, dim), in PyTorch."""
    assert cumulative_q.dtype == cumulative_k.dtype == torch.int32
    assert max_q == int((cumulative_q[1:] - cumulative_q[:-1]).max())
    assert max_k == int((cumulative_k[1:] - cumulative_k[:-1]).max())
    outputs = []
    for row in range(len(cumulative_q) - 1):
        rows_q = slice(int(cumulative_q[row]), int(cumulative_q[row + 1]))
        rows_k = slice(int(cumulative_k[row]), int(cumulative_k[row + 1]))
        segment = functional.scaled_dot_product_attention(
            query[rows_q].transpose(0, 1),
            key[rows_k].transpose(0, 1),
            value[rows_k].transpose(0, 1),
        )
        outputs.append(segment.transpose(0, 1))
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# every backend this machine can run equals the reference


def cpu_backends():
    call = AttentionCall("cpu", torch.float32, HEAD_DIM)
    return rank_backends(call, attention_module.detect_availability("cpu"))


def test_cpu_runs_flash_and_math():
    assert cpu_backends() == ["flash", "math"]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "flash", "math"])
def test_backend_equals_masked_math_reference(backend, dtype, padded):
    query, key, value = make_qkv(dtype)
    mask = joint_mask() if padded else None
    output = attention(query, key, value, mask, backend=backend)
    assert output.dtype == dtype and output.shape == query.shape
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(
        output.float(), reference(query, key, value, mask), atol=tolerance, rtol=0
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("padded", [False, True])
def test_every_cuda_backend_equals_reference(padded):
    query, key, value = (tensor.cuda() for tensor in make_qkv(torch.bfloat16))
    mask = joint_mask().cuda() if padded else None
    call = attention_module.describe_call(query, padded)
    backends = rank_backends(call, attention_module.detect_availability("cuda"))
    assert len(backends) >= 2
    for backend in backends:
        output = attention(query, key, value, mask, backend=backend)
        torch.testing.assert_close(
            output.float(), reference(query, key, value, mask), atol=BF16_TOLERANCE, rtol=0
        )


def test_padded_gradients_equal_the_reference():
    query, key, value = make_qkv(requires_grad=True)
    mask = joint_mask()
    grad_output = torch.randn(query.shape, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(
        reference(query, key, value, mask), (query, key, value), grad_output
    )
    run = attention_module._sdpa("flash")
    output = attention_grouped_by_mask(query, key, value, mask, run)
    for ours, theirs in zip(
        torch.autograd.grad(output, (query, key, value), grad_output), expected, strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=FP32_TOLERANCE, rtol=0)


# --------------------------------------------------------------------------------------------
# padding without a dense mask


@pytest.mark.parametrize("lengths", [TEXT_LENGTHS, (3, 3, 3), (1, 4, 5)])
def test_grouping_by_mask_equals_the_masked_reference(lengths):
    query, key, value = make_qkv()
    mask = joint_mask(lengths)
    calls = []

    def unmasked(query_group, key_group, value_group):
        calls.append((query_group.shape[0], key_group.shape[2]))
        return functional.scaled_dot_product_attention(query_group, key_group, value_group)

    output = attention_grouped_by_mask(query, key, value, mask, unmasked)
    torch.testing.assert_close(
        output, reference(query, key, value, mask), atol=FP32_TOLERANCE, rtol=0
    )
    # one unmasked call per distinct mask, each on exactly its real keys
    expected_calls = sorted(
        (lengths.count(length), length + IMAGE_TOKENS) for length in set(lengths)
    )
    assert sorted(calls) == expected_calls


def test_varlen_equals_the_masked_reference():
    query, key, value = make_qkv()
    mask = joint_mask()
    output = attention_varlen(query, key, value, mask, torch_varlen)
    torch.testing.assert_close(
        output, reference(query, key, value, mask), atol=FP32_TOLERANCE, rtol=0
    )


def test_flash_attn_path_uses_the_dense_call_or_varlen(monkeypatch):
    """The flash-attn glue (layouts, varlen packing) with a PyTorch stand-in for the package."""

    class StandIn:
        calls: ClassVar[list[str]] = []

        @staticmethod
        def flash_attn_func(query, key, value):  # (B, L, H, D), returns (output, lse) like FA3
            StandIn.calls.append("dense")
            output = functional.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            )
            return output.transpose(1, 2), None

        @staticmethod
        def flash_attn_varlen_func(*arguments):
            StandIn.calls.append("varlen")
            return torch_varlen(*arguments)

    monkeypatch.setattr(attention_module, "_flash_attn_module", lambda: (3, StandIn))
    query, key, value = make_qkv()
    mask = joint_mask()
    for padding in (None, mask):
        output = attention_module._flash_attn(query, key, value, padding)
        torch.testing.assert_close(
            output, reference(query, key, value, padding), atol=FP32_TOLERANCE, rtol=0
        )
    assert StandIn.calls == ["dense", "varlen"]


def test_a_row_without_real_keys_is_an_error():
    query, key, value = make_qkv()
    mask = joint_mask()
    mask[1] = False
    with pytest.raises(ValueError, match="row 1 has no real key"):
        attention_grouped_by_mask(query, key, value, mask, functional.scaled_dot_product_attention)
    with pytest.raises(ValueError, match="no real key"):
        attention_varlen(query, key, value, mask, torch_varlen)


# --------------------------------------------------------------------------------------------
# the choice table (pure logic; GPU cases included)

ALL_SDPA = frozenset({"cudnn", "flash", "efficient", "math"})
NO_FLASH_ATTN = Availability(ALL_SDPA, None)
FA2 = Availability(ALL_SDPA, 2)
FA3 = Availability(ALL_SDPA, 3)
H100, A100, T4 = (9, 0), (8, 0), (7, 5)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("call", "availability", "expected"),
    [
        # CPU: PyTorch's fused CPU kernel for float dtypes, math otherwise
        (AttentionCall("cpu", FP32, 16), NO_FLASH_ATTN, "flash"),
        (AttentionCall("cpu", BF16, 128, padded=True), NO_FLASH_ATTN, "flash"),
        (AttentionCall("cpu", torch.float64, 16), NO_FLASH_ATTN, "math"),
        (AttentionCall("mps", FP32, 64), NO_FLASH_ATTN, "math"),
        # H100, Qwen-Image's heads (128): cuDNN unless flash-attn 3 is installed
        (AttentionCall("cuda", BF16, 128, False, H100), NO_FLASH_ATTN, "cudnn"),
        (AttentionCall("cuda", BF16, 128, True, H100), NO_FLASH_ATTN, "cudnn"),
        (AttentionCall("cuda", FP16, 128, False, H100), FA2, "cudnn"),
        (AttentionCall("cuda", BF16, 128, False, H100), FA3, "flash_attn"),
        (AttentionCall("cuda", BF16, 128, True, H100), FA3, "flash_attn"),
        # head sizes cuDNN does not take
        (AttentionCall("cuda", BF16, 256, False, H100), NO_FLASH_ATTN, "flash"),
        (AttentionCall("cuda", BF16, 256, False, H100), FA2, "flash_attn"),
        (AttentionCall("cuda", BF16, 512, False, H100), NO_FLASH_ATTN, "efficient"),
        (AttentionCall("cuda", BF16, 20, False, H100), NO_FLASH_ATTN, "math"),
        # fp32 and fp64 on CUDA
        (AttentionCall("cuda", FP32, 128, False, H100), FA3, "efficient"),
        (AttentionCall("cuda", FP32, 20, False, H100), NO_FLASH_ATTN, "efficient"),
        (AttentionCall("cuda", torch.float64, 128, False, H100), FA3, "math"),
        # Ampere: flash-attn 2, else PyTorch's flash; FA3 is Hopper only
        (AttentionCall("cuda", BF16, 128, False, A100), FA2, "flash_attn"),
        (AttentionCall("cuda", BF16, 128, False, A100), NO_FLASH_ATTN, "flash"),
        (AttentionCall("cuda", BF16, 128, False, A100), FA3, "flash"),
        # before Ampere: memory-efficient
        (AttentionCall("cuda", FP16, 128, False, T4), FA2, "efficient"),
        # a PyTorch build without the cuDNN kernel
        (
            AttentionCall("cuda", BF16, 128, False, H100),
            Availability(frozenset({"flash", "efficient", "math"}), None),
            "flash",
        ),
    ],
)
def test_choice_follows_the_table(call, availability, expected):
    assert choose_backend(call, availability) == expected


def test_ranking_lists_every_supported_backend_fastest_first():
    call = AttentionCall("cuda", BF16, 128, True, H100)
    assert rank_backends(call, FA3) == ["flash_attn", "cudnn", "flash", "efficient", "math"]
    assert rank_backends(call, NO_FLASH_ATTN) == ["cudnn", "flash", "efficient", "math"]


@pytest.mark.parametrize(
    ("backend", "device_type", "padded", "expected"),
    [
        ("cudnn", "cuda", False, PADDING_NONE),
        ("cudnn", "cuda", True, PADDING_GROUP),
        ("flash", "cuda", True, PADDING_GROUP),
        ("efficient", "cuda", True, PADDING_GROUP),
        ("flash_attn", "cuda", True, PADDING_VARLEN),
        ("flash", "cpu", True, PADDING_MASK),
        ("math", "cuda", True, PADDING_MASK),
    ],
)
def test_padding_strategy_never_gives_fast_kernels_a_mask(backend, device_type, padded, expected):
    assert padding_strategy(backend, device_type, padded) == expected


# --------------------------------------------------------------------------------------------
# selection by name and by config


def test_a_backend_that_cannot_run_the_call_is_an_error_saying_why():
    query, key, value = make_qkv()
    with pytest.raises(ValueError, match="'cudnn' cannot run this call: needs a CUDA device"):
        attention(query, key, value, backend="cudnn")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attention(query, key, value, backend="fast")
    with pytest.raises(ValueError, match=r"model.kernels.attention_backend"):
        apex_kernels.set_attention_backend("fast")


def test_configured_default_is_used_and_restored(monkeypatch):
    seen = []
    original = attention_module._sdpa

    def recording(backend):
        seen.append(backend)
        return original(backend)

    monkeypatch.setattr(attention_module, "_sdpa", recording)
    query, key, value = make_qkv()
    assert apex_kernels.get_attention_backend() == "auto"
    with apex_kernels.attention_backend("math"):
        attention(query, key, value)
    attention(query, key, value)
    assert seen == ["math", "flash"]
    assert apex_kernels.get_attention_backend() == "auto"


def test_kernel_config_section_validates_and_configures():
    assert ATTENTION_BACKENDS == apex_kernels.BACKEND_CHOICES
    config = load_config(
        None, ["model.kernels.attention_backend=math", "model.kernels.fused=false"]
    )
    try:
        apex_kernels.configure(config.model.kernels.attention_backend, config.model.kernels.fused)
        assert apex_kernels.get_attention_backend() == "math"
        assert apex_kernels.get_fused_kernels() == "never"
    finally:
        apex_kernels.configure()
    assert apex_kernels.get_fused_kernels() == "auto"
    with pytest.raises(ConfigError) as error:
        load_config(
            None, ["model.kernels.attention_backend=cudnm", "model.kernels.compile_blocks=true"]
        )
    message = str(error.value)
    assert "model.kernels.attention_backend" in message and "did you mean 'cudnn'" in message
    assert "model.kernels.compile_blocks=true needs model.kernels.fused=false" in message
