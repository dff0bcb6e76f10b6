"""Adaptive-norm modulation and the gated residual of DiT blocks, fused.

Every Qwen-Image block does, per stream and twice (before attention and before the MLP):

    modulated = layer_norm(x) * (1 + scale) + shift      # LayerNorm without affine
    x = x + gate * branch(modulated)                      # gated residual

with shift, scale and gate one vector per row of the batch. Eagerly, the modulation is four
passes over the (B, S, D) activations (norm, 1 + scale broadcast product, add) and the gated
residual two; the fused kernels make one pass each. Backward passes are a Triton kernel
(modulation) and PyTorch (gated residual: two elementwise products and a reduction).

`*_reference` functions are the eager compositions the kernels are tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional

from apex_kernels.fused import fused_kernels_enabled, triton_kernels


def _per_row_vector(vector: Tensor, batch: int, width: int, name: str) -> Tensor:
    """(B, D) view of a per-row vector given as (B, D) or (B, 1, D); differentiable."""
    if vector.numel() != batch * width or vector.shape[0] != batch or vector.shape[-1] != width:
        raise ValueError(
            f"{name} has shape {tuple(vector.shape)}; expected ({batch}, {width}) or "
            f"({batch}, 1, {width}): one vector per row of the batch"
        )
    return vector.reshape(batch, width)


def _check_hidden(hidden: Tensor, name: str) -> tuple[int, int, int]:
    if hidden.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(hidden.shape)}; expected (batch, tokens, width)")
    return tuple(hidden.shape)


# --------------------------------------------------------------------------------------------
# layer_norm(x) * (1 + scale) + shift


def layer_norm_modulate_reference(
    hidden: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> Tensor:
    """LayerNorm without affine over the last dimension, then * (1 + scale) + shift.

    Args:
        hidden: (B, S, D).
        shift, scale: (B, D) or (B, 1, D).
        eps: LayerNorm epsilon.
    """
    batch, _, width = _check_hidden(hidden, "hidden")
    shift = _per_row_vector(shift, batch, width, "shift")[:, None, :]
    scale = _per_row_vector(scale, batch, width, "scale")[:, None, :]
    return functional.layer_norm(hidden, (width,), eps=eps) * (1 + scale) + shift


class _LayerNormModulate(torch.autograd.Function):
    """Triton forward and backward; saves the input and fp32 mean and rstd per row."""

    @staticmethod
    def forward(context, hidden, shift, scale, eps):
        output_dtype = torch.promote_types(
            torch.promote_types(hidden.dtype, shift.dtype), scale.dtype
        )
        hidden, shift, scale = hidden.contiguous(), shift.contiguous(), scale.contiguous()
        output, mean, rstd = triton_kernels().layer_norm_modulate_forward(
            hidden, shift, scale, eps, output_dtype
        )
        context.save_for_backward(hidden, scale, mean, rstd)
        context.vector_dtypes = (shift.dtype, scale.dtype)
        return output

    @staticmethod
    def backward(context, grad_output):
        hidden, scale, mean, rstd = context.saved_tensors
        grad_input, grad_shift, grad_scale = triton_kernels().layer_norm_modulate_backward(
            grad_output, hidden, scale, mean, rstd
        )
        shift_dtype, scale_dtype = context.vector_dtypes
        return grad_input, grad_shift.to(shift_dtype), grad_scale.to(scale_dtype), None


def layer_norm_modulate(
    hidden: Tensor, shift: Tensor, scale: Tensor, eps: float, *, fused: Optional[bool] = None
) -> Tensor:
    """layer_norm(hidden) * (1 + scale) + shift (see `layer_norm_modulate_reference`).

    Args:
        hidden: (B, S, D) tokens.
        shift, scale: (B, D) or (B, 1, D) per-row modulation.
        eps: LayerNorm epsilon.
        fused: True/False forces the Triton kernel or the reference; None asks
            `fused_kernels_enabled`.
    """
    if fused is None:
        fused = fused_kernels_enabled(hidden)
    if not fused:
        return layer_norm_modulate_reference(hidden, shift, scale, eps)
    batch, _, width = _check_hidden(hidden, "hidden")
    shift = _per_row_vector(shift, batch, width, "shift")
    scale = _per_row_vector(scale, batch, width, "scale")
    return _LayerNormModulate.apply(hidden, shift, scale, eps)


# --------------------------------------------------------------------------------------------
# residual + gate * update


def gated_residual_reference(residual: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """residual + gate * update with residual, update (B, S, D) and gate (B, D) or (B, 1, D)."""
    batch, _, width = _check_hidden(residual, "residual")
    return residual + _per_row_vector(gate, batch, width, "gate")[:, None, :] * update


class _GatedResidual(torch.autograd.Function):
    """Triton forward, PyTorch backward (d residual = g, d update = g * gate,
    d gate = sum over tokens of g * update)."""

    @staticmethod
    def forward(context, residual, gate, update):
        output_dtype = torch.promote_types(
            torch.promote_types(residual.dtype, gate.dtype), update.dtype
        )
        output = triton_kernels().gated_residual_forward(
            residual.contiguous(), gate.contiguous(), update.contiguous(), output_dtype
        )
        context.save_for_backward(gate, update)
        context.residual_dtype = residual.dtype
        return output

    @staticmethod
    def backward(context, grad_output):
        gate, update = context.saved_tensors
        grad_residual = grad_update = grad_gate = None
        if context.needs_input_grad[0]:
            grad_residual = grad_output.to(context.residual_dtype)
        if context.needs_input_grad[1]:
            grad_gate = (grad_output.float() * update.float()).sum(dim=1).to(gate.dtype)
        if context.needs_input_grad[2]:
            grad_update = (grad_output * gate[:, None, :]).to(update.dtype)
        return grad_residual, grad_gate, grad_update


def gated_residual(
    residual: Tensor, gate: Tensor, update: Tensor, *, fused: Optional[bool] = None
) -> Tensor:
    """residual + gate * update (see `gated_residual_reference`).

    Args:
        residual: (B, S, D) the stream.
        gate: (B, D) or (B, 1, D) per-row gate.
        update: (B, S, D) the branch output.
        fused: True/False forces the Triton kernel or the reference; None asks
            `fused_kernels_enabled`.
    """
    if fused is None:
        fused = fused_kernels_enabled(residual)
    if not fused:
        return gated_residual_reference(residual, gate, update)
    batch, _, width = _check_hidden(residual, "residual")
    if update.shape != residual.shape:
        raise ValueError(
            f"update has shape {tuple(update.shape)}; expected the residual's "
            f"{tuple(residual.shape)}"
        )
    return _GatedResidual.apply(residual, _per_row_vector(gate, batch, width, "gate"), update)
