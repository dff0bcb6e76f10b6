"""Triton kernels of the fused ops and their launchers (imported lazily by `apex_kernels.fused`).

Every kernel computes in fp32 and rounds once when it stores. Tensors are addressed as rows of
a contiguous last dimension:

- q/k RMSNorm + rotary: rows are (batch, token, head) of a (B, S, H, D) tensor; channel pairs
  (2i, 2i+1) are rotated by the token's angle i.
- adaptive LayerNorm modulation and gated residual: rows are (batch, token) of a (B, S, D)
  tensor; the per-batch vectors (shift, scale, gate) are (B, D).

Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported) runs the same
kernels on CPU tensors; `LAUNCHES` counts launches per kernel so that tests can tell a kernel
ran rather than a fallback.
"""

from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# True when the kernels below were defined under Triton's interpreter (CPU tensors allowed).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Number of launches of each kernel since import.
LAUNCHES: collections.Counter[str] = collections.Counter()

# Elements of fp32 work per program tile: 4096 keeps a tile in registers on current GPUs
# (16 KiB of fp32) while giving each program enough rows of small widths.
TILE_ELEMENTS = 4096


def _tile(width: int) -> tuple[int, int]:
    """(rows per program, padded width) for rows of `width` elements."""
    block_width = triton.next_power_of_2(width)
    return max(1, TILE_ELEMENTS // block_width), block_width


@triton.jit
def _sum(values, axis):
    """Sum along `axis`, as `tl.sum` computes it for fp32.

    `tl.sum` is itself a jitted library function that keeps the mode (compiled or interpreted)
    of the first `import triton`, which may come before TRITON_INTERPRET=1 is set; reducing
    with its combine function works in both modes (the interpreter sums it with numpy).
    """
    return tl.reduce(values, axis, tl.standard._sum_combine)


# --------------------------------------------------------------------------------------------
# RMSNorm of q/k per head fused with the rotary embedding


@triton.jit
def _rms_norm_rotary_forward_kernel(
    input_pointer,
    weight_pointer,
    cos_pointer,
    sin_pointer,
    output_pointer,
    rstd_pointer,
    rows,
    heads,
    tokens,
    half_dim,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pair = tl.arange(0, BLOCK_PAIRS)
    row_valid = row < rows
    pair_valid = pair < half_dim
    valid = row_valid[:, None] & pair_valid[None, :]
    even_offset = row[:, None] * (2 * half_dim) + 2 * pair[None, :]
    even = tl.load(input_pointer + even_offset, mask=valid, other=0.0).to(tl.float32)
    odd = tl.load(input_pointer + even_offset + 1, mask=valid, other=0.0).to(tl.float32)
    mean_square = (_sum(even * even, axis=1) + _sum(odd * odd, axis=1)) / (2 * half_dim)
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    weight_even = tl.load(weight_pointer + 2 * pair, mask=pair_valid, other=0.0).to(tl.float32)
    weight_odd = tl.load(weight_pointer + 2 * pair + 1, mask=pair_valid, other=0.0).to(tl.float32)
    real = even * rstd[:, None] * weight_even[None, :]
    imaginary = odd * rstd[:, None] * weight_odd[None, :]
    token = (row // heads) % tokens
    angle_offset = token[:, None] * half_dim + pair[None, :]
    cos = tl.load(cos_pointer + angle_offset, mask=valid, other=0.0).to(tl.float32)
    sin = tl.load(sin_pointer + angle_offset, mask=valid, other=0.0).to(tl.float32)
    output_type = output_pointer.dtype.element_ty
    tl.store(output_pointer + even_offset, (real * cos - imaginary * sin).to(output_type), valid)
    tl.store(
        output_pointer + even_offset + 1, (real * sin + imaginary * cos).to(output_type), valid
    )
    tl.store(rstd_pointer + row, rstd, mask=row_valid)


@triton.jit
def _rms_norm_rotary_backward_kernel(
    grad_output_pointer,
    input_pointer,
    weight_pointer,
    cos_pointer,
    sin_pointer,
    rstd_pointer,
    grad_input_pointer,
    grad_weight_partial_pointer,
    rows,
    heads,
    tokens,
    half_dim,
    COMPUTE_WEIGHT_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    program = tl.program_id(0)
    row = program * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pair = tl.arange(0, BLOCK_PAIRS)
    row_valid = row < rows
    pair_valid = pair < half_dim
    valid = row_valid[:, None] & pair_valid[None, :]
    even_offset = row[:, None] * (2 * half_dim) + 2 * pair[None, :]
    grad_even = tl.load(grad_output_pointer + even_offset, mask=valid, other=0.0).to(tl.float32)
    grad_odd = tl.load(grad_output_pointer + even_offset + 1, mask=valid, other=0.0).to(tl.float32)
    token = (row // heads) % tokens
    angle_offset = token[:, None] * half_dim + pair[None, :]
    cos = tl.load(cos_pointer + angle_offset, mask=valid, other=0.0).to(tl.float32)
    sin = tl.load(sin_pointer + angle_offset, mask=valid, other=0.0).to(tl.float32)
    # the rotation's transpose takes the gradient back to the normalised, scaled channels
    grad_real = grad_even * cos + grad_odd * sin
    grad_imaginary = grad_odd * cos - grad_even * sin
    rstd = tl.load(rstd_pointer + row, mask=row_valid, other=0.0)
    even = tl.load(input_pointer + even_offset, mask=valid, other=0.0).to(tl.float32)
    odd = tl.load(input_pointer + even_offset + 1, mask=valid, other=0.0).to(tl.float32)
    normal_even = even * rstd[:, None]
    normal_odd = odd * rstd[:, None]
    weight_even = tl.load(weight_pointer + 2 * pair, mask=pair_valid, other=0.0).to(tl.float32)
    weight_odd = tl.load(weight_pointer + 2 * pair + 1, mask=pair_valid, other=0.0).to(tl.float32)
    grad_normal_even = grad_real * weight_even[None, :]
    grad_normal_odd = grad_imaginary * weight_odd[None, :]
    # d/dx of x * rstd(x): rstd * (g - n * mean(g * n))
    projection = (
        _sum(grad_normal_even * normal_even, axis=1) + _sum(grad_normal_odd * normal_odd, axis=1)
    ) / (2 * half_dim)
    grad_input_even = rstd[:, None] * (grad_normal_even - normal_even * projection[:, None])
    grad_input_odd = rstd[:, None] * (grad_normal_odd - normal_odd * projection[:, None])
    input_type = grad_input_pointer.dtype.element_ty
    tl.store(grad_input_pointer + even_offset, grad_input_even.to(input_type), valid)
    tl.store(grad_input_pointer + even_offset + 1, grad_input_odd.to(input_type), valid)
    if COMPUTE_WEIGHT_GRAD:
        partial_offset = program * (2 * half_dim) + 2 * pair
        tl.store(
            grad_weight_partial_pointer + partial_offset,
            _sum(grad_real * normal_even, axis=0),
            pair_valid,
        )
        tl.store(
            grad_weight_partial_pointer + partial_offset + 1,
            _sum(grad_imaginary * normal_odd, axis=0),
            pair_valid,
        )


def rms_norm_rotary_forward(
    hidden: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float, output_dtype
) -> tuple[Tensor, Tensor]:
    """hidden (B, S, H, D) contiguous -> (output (B, S, H, D), rstd (B*S*H,) fp32)."""
    batch, tokens, heads, head_dim = hidden.shape
    rows = batch * tokens * heads
    output = torch.empty(hidden.shape, dtype=output_dtype, device=hidden.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    block_rows, block_pairs = _tile(head_dim // 2)
    grid = (triton.cdiv(rows, block_rows),)
    _rms_norm_rotary_forward_kernel[grid](
        hidden, weight, cos, sin, output, rstd, rows, heads, tokens, head_dim // 2, eps,
        BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs,
    )  # fmt: skip
    LAUNCHES["rms_norm_rotary_forward"] += 1
    return output, rstd


def rms_norm_rotary_backward(
    grad_output: Tensor,
    hidden: Tensor,
    weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    rstd: Tensor,
    compute_weight_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of the input (hidden's dtype) and, if asked, of the weight (fp32)."""
    batch, tokens, heads, head_dim = hidden.shape
    rows = batch * tokens * heads
    grad_input = torch.empty_like(hidden)
    block_rows, block_pairs = _tile(head_dim // 2)
    programs = triton.cdiv(rows, block_rows)
    partial = torch.empty(
        (programs if compute_weight_grad else 1, head_dim),
        dtype=torch.float32,
        device=hidden.device,
    )
    _rms_norm_rotary_backward_kernel[(programs,)](
        grad_output.contiguous(), hidden, weight, cos, sin, rstd, grad_input, partial,
        rows, heads, tokens, head_dim // 2,
        COMPUTE_WEIGHT_GRAD=compute_weight_grad, BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs,
    )  # fmt: skip
    LAUNCHES["rms_norm_rotary_backward"] += 1
    return grad_input, (partial.sum(dim=0) if compute_weight_grad else None)


# --------------------------------------------------------------------------------------------
# adaptive LayerNorm modulation: layer_norm(x) * (1 + scale) + shift


@triton.jit
def _layer_norm_modulate_forward_kernel(
    input_pointer,
    shift_pointer,
    scale_pointer,
    output_pointer,
    mean_pointer,
    rstd_pointer,
    tokens,
    width,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    batch = tl.program_id(0)
    token = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.arange(0, BLOCK_WIDTH)
    token_valid = token < tokens
    column_valid = column < width
    valid = token_valid[:, None] & column_valid[None, :]
    row = batch * tokens + token
    offset = row[:, None] * width + column[None, :]
    hidden = tl.load(input_pointer + offset, mask=valid, other=0.0).to(tl.float32)
    mean = _sum(hidden, axis=1) / width
    centred = tl.where(valid, hidden - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(_sum(centred * centred, axis=1) / width + eps)
    normal = centred * rstd[:, None]
    vector_offset = batch * width + column
    shift = tl.load(shift_pointer + vector_offset, mask=column_valid, other=0.0).to(tl.float32)
    scale = tl.load(scale_pointer + vector_offset, mask=column_valid, other=0.0).to(tl.float32)
    output = normal * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(output_pointer + offset, output.to(output_pointer.dtype.element_ty), valid)
    tl.store(mean_pointer + row, mean, mask=token_valid)
    tl.store(rstd_pointer + row, rstd, mask=token_valid)


@triton.jit
def _layer_norm_modulate_backward_kernel(
    grad_output_pointer,
    input_pointer,
    scale_pointer,
    mean_pointer,
    rstd_pointer,
    grad_input_pointer,
    grad_shift_partial_pointer,
    grad_scale_partial_pointer,
    tokens,
    width,
    token_blocks,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    batch = tl.program_id(0)
    block = tl.program_id(1)
    token = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.arange(0, BLOCK_WIDTH)
    token_valid = token < tokens
    column_valid = column < width
    valid = token_valid[:, None] & column_valid[None, :]
    row = batch * tokens + token
    offset = row[:, None] * width + column[None, :]
    grad_output = tl.load(grad_output_pointer + offset, mask=valid, other=0.0).to(tl.float32)
    hidden = tl.load(input_pointer + offset, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(mean_pointer + row, mask=token_valid, other=0.0)
    rstd = tl.load(rstd_pointer + row, mask=token_valid, other=0.0)
    normal = tl.where(valid, (hidden - mean[:, None]) * rstd[:, None], 0.0)
    scale = tl.load(scale_pointer + batch * width + column, mask=column_valid, other=0.0)
    grad_normal = grad_output * (1.0 + scale.to(tl.float32)[None, :])
    # d/dx of layer_norm: rstd * (g - mean(g) - n * mean(g * n))
    grad_mean = _sum(grad_normal, axis=1) / width
    projection = _sum(grad_normal * normal, axis=1) / width
    grad_input = rstd[:, None] * (grad_normal - grad_mean[:, None] - normal * projection[:, None])
    tl.store(grad_input_pointer + offset, grad_input.to(grad_input_pointer.dtype.element_ty), valid)
    partial_offset = (batch * token_blocks + block) * width + column
    tl.store(grad_shift_partial_pointer + partial_offset, _sum(grad_output, axis=0), column_valid)
    tl.store(
        grad_scale_partial_pointer + partial_offset,
        _sum(grad_output * normal, axis=0),
        column_valid,
    )


def layer_norm_modulate_forward(
    hidden: Tensor, shift: Tensor, scale: Tensor, eps: float, output_dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden (B, S, D), shift/scale (B, D), all contiguous -> (output, mean, rstd)."""
    batch, tokens, width = hidden.shape
    output = torch.empty(hidden.shape, dtype=output_dtype, device=hidden.device)
    mean = torch.empty(batch * tokens, dtype=torch.float32, device=hidden.device)
    rstd = torch.empty_like(mean)
    block_rows, block_width = _tile(width)
    grid = (batch, triton.cdiv(tokens, block_rows))
    _layer_norm_modulate_forward_kernel[grid](
        hidden, shift, scale, output, mean, rstd, tokens, width, eps,
        BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width,
    )  # fmt: skip
    LAUNCHES["layer_norm_modulate_forward"] += 1
    return output, mean, rstd


def layer_norm_modulate_backward(
    grad_output: Tensor, hidden: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden (its dtype), shift and scale ((B, D) fp32)."""
    batch, tokens, width = hidden.shape
    block_rows, block_width = _tile(width)
    token_blocks = triton.cdiv(tokens, block_rows)
    grad_input = torch.empty_like(hidden)
    partial_shape = (batch, token_blocks, width)
    grad_shift = torch.empty(partial_shape, dtype=torch.float32, device=hidden.device)
    grad_scale = torch.empty_like(grad_shift)
    _layer_norm_modulate_backward_kernel[(batch, token_blocks)](
        grad_output.contiguous(), hidden, scale, mean, rstd, grad_input, grad_shift, grad_scale,
        tokens, width, token_blocks, BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width,
    )  # fmt: skip
    LAUNCHES["layer_norm_modulate_backward"] += 1
    return grad_input, grad_shift.sum(dim=1), grad_scale.sum(dim=1)


# --------------------------------------------------------------------------------------------
# gated residual: x + gate * y


@triton.jit
def _gated_residual_kernel(
    residual_pointer,
    gate_pointer,
    update_pointer,
    output_pointer,
    tokens,
    width,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    batch = tl.program_id(0)
    token = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.arange(0, BLOCK_WIDTH)
    column_valid = column < width
    valid = (token < tokens)[:, None] & column_valid[None, :]
    offset = (batch * tokens + token)[:, None] * width + column[None, :]
    residual = tl.load(residual_pointer + offset, mask=valid, other=0.0).to(tl.float32)
    update = tl.load(update_pointer + offset, mask=valid, other=0.0).to(tl.float32)
    gate = tl.load(gate_pointer + batch * width + column, mask=column_valid, other=0.0)
    output = residual + gate.to(tl.float32)[None, :] * update
    tl.store(output_pointer + offset, output.to(output_pointer.dtype.element_ty), valid)


def gated_residual_forward(residual: Tensor, gate: Tensor, update: Tensor, output_dtype) -> Tensor:
    """residual, update (B, S, D) and gate (B, D), all contiguous -> residual + gate * update."""
    batch, tokens, width = residual.shape
    output = torch.empty(residual.shape, dtype=output_dtype, device=residual.device)
    block_rows, block_width = _tile(width)
    grid = (batch, triton.cdiv(tokens, block_rows))
    _gated_residual_kernel[grid](
        residual, gate, update, output, tokens, width,
        BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width,
    )  # fmt: skip
    LAUNCHES["gated_residual_forward"] += 1
    return output
