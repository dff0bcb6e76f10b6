"""RMSNorm of queries or keys per head fused with the rotary embedding.

Qwen-Image normalises every head of q and k with an RMSNorm (learned gain over head_dim), then
rotates channel pairs (2i, 2i+1) by the token's rotary angle i. Eager PyTorch reads and writes
the (B, S, H, D) tensor about six times (mean square, scale, gain, float copy, rotation, cast);
the fused kernel reads it once and writes it once, and its backward reads input and gradient
once each.

`rms_norm_rotary_reference` is the eager composition (the same operations and rounding as
`apex_dist.models.qwen_image.RMSNorm` followed by `apply_rotary`); `rms_norm_rotary` runs the
Triton kernel where `fused_kernels_enabled` allows and the reference otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from apex_kernels.fused import fused_kernels_enabled, triton_kernels

HALF_DTYPES = (torch.float16, torch.bfloat16)


def rms_norm_rotary_reference(
    hidden: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float
) -> Tensor:
    """RMSNorm over the last dimension, then rotation of channel pairs, in eager PyTorch.

    Args:
        hidden: (B, S, H, D) queries or keys.
        weight: (D,) gain of the RMSNorm.
        cos, sin: (S, D / 2) of each token's rotary angles.
        eps: added to the mean square.

    Returns:
        (B, S, H, D) in weight's dtype when it is bf16/fp16, else in the promoted float dtype
        (as the model's RMSNorm returns).
    """
    mean_square = hidden.float().pow(2).mean(-1, keepdim=True)
    normalised = hidden * torch.rsqrt(mean_square + eps)
    if weight.dtype in HALF_DTYPES:
        normalised = normalised.to(weight.dtype)
    normalised = normalised * weight
    real, imaginary = normalised.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], dim=-1)
    return rotated.flatten(-2).to(normalised.dtype)


def _output_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype `rms_norm_rotary_reference` returns."""
    if weight.dtype in HALF_DTYPES:
        return weight.dtype
    return torch.promote_types(torch.promote_types(hidden.dtype, torch.float32), weight.dtype)


class _RmsNormRotary(torch.autograd.Function):
    """Triton forward and backward; the saved state is the input and one fp32 rstd per row."""

    @staticmethod
    def forward(context, hidden, weight, cos, sin, eps):
        kernels = triton_kernels()
        hidden = hidden.contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        output, rstd = kernels.rms_norm_rotary_forward(
            hidden, weight.contiguous(), cos, sin, eps, _output_dtype(hidden, weight)
        )
        context.save_for_backward(hidden, weight, cos, sin, rstd)
        return output

    @staticmethod
    def backward(context, grad_output):
        hidden, weight, cos, sin, rstd = context.saved_tensors
        grad_input, grad_weight = triton_kernels().rms_norm_rotary_backward(
            grad_output, hidden, weight.contiguous(), cos, sin, rstd, context.needs_input_grad[1]
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_input, grad_weight, None, None, None


def rms_norm_rotary(
    hidden: Tensor,
    weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: float,
    *,
    fused: Optional[bool] = None,
) -> Tensor:
    """RMSNorm of each head then the rotary embedding (see `rms_norm_rotary_reference`).

    Args:
        hidden: (B, S, H, D) queries or keys (D even).
        weight: (D,) RMSNorm gain.
        cos, sin: (S, D / 2) rotary tables of the S tokens of `hidden`.
        eps: RMSNorm epsilon.
        fused: True/False forces the Triton kernel or the reference; None asks
            `fused_kernels_enabled`.
    """
    _, tokens, _, head_dim = hidden.shape
    if head_dim % 2 or tuple(weight.shape) != (head_dim,):
        raise ValueError(
            f"rms_norm_rotary: hidden {tuple(hidden.shape)} needs an even head_dim and weight "
            f"of shape ({head_dim},) (got {tuple(weight.shape)})"
        )
    if tuple(cos.shape) != (tokens, head_dim // 2) or cos.shape != sin.shape:
        raise ValueError(
            f"rms_norm_rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
            f"(tokens, head_dim / 2) = ({tokens}, {head_dim // 2})"
        )
    if fused is None:
        fused = fused_kernels_enabled(hidden)
    if not fused:
        return rms_norm_rotary_reference(hidden, weight, cos, sin, eps)
    return _RmsNormRotary.apply(hidden, weight, cos, sin, eps)
