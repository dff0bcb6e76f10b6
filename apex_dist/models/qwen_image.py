"""The Qwen-Image MMDiT as an APEX velocity model, state-dict compatible with diffusers.

`QwenImageTransformer` computes what diffusers' `QwenImageTransformer2DModel` computes, with
parameters of the same names and shapes, so a diffusers checkpoint loads into it directly. It
adds the two APEX pieces (method.md sections 1-2), the only keys diffusers does not have:

- `time_text_embed_2.*`: the second time embedding E2, a module of its own built like E1
  (`time_text_embed`) and set to E1's values by `conditioning.init_apex_weights`, combined as
  temb = E1(t) + E2(tt) * (t - tt). The prefix is the one the method's released code
  (LINs-lab/APEX, TwinFlow lineage) uses, so their checkpoints and ours name E2 alike.
- `condition_shift.*`: c_fake = a*c + b on the text tokens of fake rows, applied after
  `txt_norm` and `txt_in` (`conditioning.ConditionShift`).

The interface is the velocity model's, on packed latents:
``model(x_t, t, tt, text, text_mask, fake_rows, image_shape=(frames, height, width))``.
At tt = t and no fake rows the output equals diffusers' for ``timestep=t``.

The model is a plain module: no distributed library, one attention entry point
(`apex_kernels.attention`), and activation checkpointing that callers switch on from outside.

Its size presets and everything else about the family (loading, text encoder, VAE, LoRA
targets, export keys) are declared by its specs, `apex_dist.models.specs.qwen_image` and
`apex_dist.models.specs.qwen_image_pixels`; `QWEN_IMAGE_PRESETS` here is their union.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

import apex_kernels
from apex_dist.models.conditioning import (
    DEFAULT_CONDITION_SHIFT,
    MAX_PERIOD,
    TIME_EMBEDDING_SCALE,
    ConditionShift,
    combine_time_embeddings,
    init_apex_weights,
    is_apex_key,
)

# Width of the sinusoidal timestep features (diffusers' `Timesteps(num_channels=256)`).
TIMESTEP_FEATURES = 256
# Base of the rotary frequencies (diffusers' `QwenEmbedRope(theta=10000)`).
ROPE_THETA = 10000.0
# Epsilon of every LayerNorm and RMSNorm in Qwen-Image (diffusers passes eps=1e-6 everywhere).
NORM_EPS = 1e-6
# Hidden width of the feed-forward networks relative to the model width (diffusers' FeedForward).
MLP_RATIO = 4
# Modulation outputs per stream and block: (shift, scale, gate) for attention and for the MLP.
MODULATION_PARAMETERS = 6
# diffusers clips fp16 activations to this range after every block to avoid overflow.
FP16_MAX = torch.finfo(torch.float16).max

# Keys of diffusers' config.json that this model reads; every other key is rejected unless it
# is listed as ignored or unsupported below.
DIFFUSERS_CONFIG_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "axes_dims_rope",
    "guidance_embeds",
)
# Written in Qwen-Image's config.json but unused by the model (diffusers ignores it as well).
IGNORED_DIFFUSERS_CONFIG_FIELDS = ("pooled_projection_dim",)
# Options of newer Qwen-Image variants (Edit-2511, Layered) that this model does not implement;
# accepted only at their default value False.
UNSUPPORTED_DIFFUSERS_CONFIG_FIELDS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


def __getattr__(name: str) -> Any:
    """`QWEN_IMAGE_PRESETS`: the presets of every spec that builds this model, read from the
    spec registry on first use (the specs import this module, so not at import time)."""
    if name == "QWEN_IMAGE_PRESETS":
        from apex_dist.models.spec import model_specs
        from apex_dist.models.specs.qwen_image import QwenImageSpec

        return {
            preset: architecture
            for spec in model_specs().values()
            if isinstance(spec, QwenImageSpec)
            for preset, architecture in spec.presets.items()
        }
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# building blocks (attribute names follow diffusers' state-dict keys)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, rounding as diffusers' `RMSNorm` does.

    The mean square is taken in fp32; in bf16/fp16 the normalised tensor is cast to the weight's
    dtype before the gain is applied.

    Args:
        dim: size of the normalised last dimension.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden: Tensor, rotary: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """hidden (..., dim) -> (..., dim).

        With `rotary` = (cos, sin), each (S, dim / 2), hidden is (B, S, heads, dim) and the
        rotary embedding follows the norm in one fused kernel (`apex_kernels.rms_norm_rotary`);
        called through the module so that hooks that gather `weight` (ZeRO-3) run.
        """
        if rotary is not None:
            return apex_kernels.rms_norm_rotary(hidden, self.weight, *rotary, self.eps)
        mean_square = hidden.float().pow(2).mean(-1, keepdim=True)
        normalised = hidden * torch.rsqrt(mean_square + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normalised = normalised.to(self.weight.dtype)
        return normalised * self.weight


def timestep_features(time: Tensor, features: int = TIMESTEP_FEATURES) -> Tensor:
    """(B,) times -> (B, features) fp32 [cos | sin] of 1000 * time * frequency.

    The operations and their order are diffusers' `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0, scale=1000)`: the product time * frequency is taken in fp32 and
    only then scaled by 1000, so the features match bit for bit (also for bf16 `time`).

    Args:
        time: (B,) times in [0, 1] (negative values are allowed), already in the model dtype.
        features: number of output features (even).
    """
    half = features // 2
    exponent = (
        -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=time.device) / half
    )
    frequencies = torch.exp(exponent)  # (half,)
    angles = TIME_EMBEDDING_SCALE * (time[:, None].float() * frequencies[None, :])  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    """Two linear layers with a SiLU between (diffusers' `TimestepEmbedding`).

    Args:
        in_features: width of the sinusoidal features.
        hidden_size: width of the model.
    """

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, in_features) -> (B, hidden_size)."""
        return self.linear_2(functional.silu(self.linear_1(features)))


class TimeEmbedding(nn.Module):
    """Sinusoidal features of 1000*t followed by an MLP: Qwen-Image's time embedding E1.

    Args:
        hidden_size: width of the model.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(TIMESTEP_FEATURES, hidden_size)

    def forward(self, time: Tensor, dtype: torch.dtype) -> Tensor:
        """time (B,) in the model dtype -> (B, hidden_size) in `dtype`.

        The MLP runs in its own weights' dtype: the model dtype for E1, fp32 for an E2 trained
        next to fp32 LoRA adapters on a bf16 base (the same numbers as diffusers whenever the
        two dtypes agree).
        """
        weight_dtype = self.timestep_embedder.linear_1.weight.dtype
        return self.timestep_embedder(timestep_features(time).to(weight_dtype)).to(dtype)


class GeluProjection(nn.Module):
    """Linear layer followed by the tanh-approximated GELU (diffusers' `GELU`).

    Args:
        in_features: input width.
        out_features: output width.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (..., in_features) -> (..., out_features)."""
        return functional.gelu(self.proj(hidden), approximate="tanh")


class FeedForward(nn.Module):
    """Width -> MLP_RATIO * width -> width MLP with a tanh GELU.

    `net` is a Sequential whose middle entry is an identity so that the keys read `net.0.proj`
    and `net.2` as in diffusers (whose index 1 is a parameterless dropout).

    Args:
        dim: model width.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            GeluProjection(dim, MLP_RATIO * dim), nn.Identity(), nn.Linear(MLP_RATIO * dim, dim)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, S, dim) -> (B, S, dim)."""
        return self.net(hidden)


def rotary_angles(positions: Tensor, axes_dims: Sequence[int]) -> Tensor:
    """Rotary angles of 3-axis positions: (S, 3) positions -> (S, sum(axes_dims) / 2) angles.

    Axis a (frame, height, width) owns axes_dims[a] / 2 frequencies
    1 / ROPE_THETA^(2i / axes_dims[a]); the angle of a token is its position on that axis
    times each frequency, computed in fp32 as diffusers does.

    Args:
        positions: (S, 3) float32 positions (frame, height, width) of each token.
        axes_dims: head-dimension channels given to each axis (each even; they sum to head_dim).
    """
    angles = []
    for axis, axis_dim in enumerate(axes_dims):
        exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=positions.device)
        inverse_frequencies = 1.0 / torch.pow(ROPE_THETA, exponents / axis_dim)  # (axis_dim/2,)
        angles.append(positions[:, axis, None] * inverse_frequencies[None, :])
    return torch.cat(angles, dim=-1)


def joint_rotary_embedding(
    image_shape: tuple[int, int, int], text_tokens: int, axes_dims: Sequence[int], device
) -> tuple[Tensor, Tensor]:
    """cos and sin, each (text_tokens + frames*height*width, head_dim / 2), text first.

    Qwen-Image's positions ("scale_rope"): image tokens sit on a grid centred on zero, height
    index h at h - ceil(height/2) and likewise for width, frame f at f; text token j sits at
    max(height // 2, width // 2) + j on all three axes, just past the image's largest position.
    Padding text at the end leaves the positions of real tokens unchanged.

    Args:
        image_shape: (frames, height, width) of the latent patch grid.
        text_tokens: length of the (padded) text sequence.
        axes_dims: head-dimension channels per axis (frame, height, width).
        device: where to build the tables.
    """
    frames, height, width = image_shape
    frame_index = torch.arange(frames, dtype=torch.float32, device=device)
    height_index = torch.arange(height, dtype=torch.float32, device=device) - (height - height // 2)
    width_index = torch.arange(width, dtype=torch.float32, device=device) - (width - width // 2)
    grid = torch.meshgrid(frame_index, height_index, width_index, indexing="ij")
    image_positions = torch.stack(grid, dim=-1).reshape(-1, 3)  # (N, 3), row-major like x_t
    text_offset = max(height // 2, width // 2)
    text_index = text_offset + torch.arange(text_tokens, dtype=torch.float32, device=device)
    text_positions = text_index[:, None].expand(text_tokens, 3)  # (L, 3)
    angles = rotary_angles(torch.cat([text_positions, image_positions]), axes_dims)  # (L+N, D/2)
    # torch.polar as in diffusers: its cosines can differ from torch.cos by one ulp
    rotations = torch.polar(torch.ones_like(angles), angles)  # (L+N, D/2) complex64
    return rotations.real.contiguous(), rotations.imag.contiguous()


def apply_rotary(hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of each head by the token's angles, in fp32.

    Args:
        hidden: (B, S, heads, head_dim) queries or keys.
        cos: (S, head_dim / 2) cosines of the angles.
        sin: (S, head_dim / 2) sines of the angles.
    """
    real, imaginary = hidden.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], dim=-1)
    return rotated.flatten(-2).to(hidden.dtype)


def modulate(hidden: Tensor, parameters: Tensor) -> tuple[Tensor, Tensor]:
    """adaLN: hidden * (1 + scale) + shift, and the gate of the residual branch.

    Args:
        hidden: (B, S, D) normalised tokens.
        parameters: (B, 3D) concatenated (shift, scale, gate).
    """
    shift, scale, gate = parameters[:, None, :].chunk(3, dim=-1)  # (B, 1, D) each
    return hidden * (1 + scale) + shift, gate


def norm_modulate(norm: nn.LayerNorm, hidden: Tensor, parameters: Tensor) -> tuple[Tensor, Tensor]:
    """`modulate(norm(hidden), parameters)`, as one fused kernel where apex_kernels enables it.

    Args:
        norm: LayerNorm without affine parameters.
        hidden: (B, S, D) tokens.
        parameters: (B, 3D) concatenated (shift, scale, gate).
    """
    if apex_kernels.fused_kernels_enabled(hidden):
        shift, scale, gate = parameters[:, None, :].chunk(3, dim=-1)  # (B, 1, D) each
        return apex_kernels.layer_norm_modulate(hidden, shift, scale, norm.eps), gate
    return modulate(norm(hidden), parameters)


def gated_residual(residual: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """residual + gate * update, as one fused kernel where apex_kernels enables it.

    Args:
        residual: (B, S, D) stream; gate: (B, 1, D); update: (B, S, D) branch output.
    """
    if apex_kernels.fused_kernels_enabled(residual):
        return apex_kernels.gated_residual(residual, gate, update)
    return residual + gate * update


class JointAttention(nn.Module):
    """Attention over the joint sequence [text tokens, image tokens] with per-stream weights.

    Each stream has its own Q/K/V and output projections and its own RMSNorm on queries and
    keys; rotary embeddings are applied after the norms; one softmax attention runs over both
    streams (diffusers' `Attention` with `QwenDoubleStreamAttnProcessor2_0`).

    Args:
        dim: model width (heads * head_dim).
        num_heads: number of attention heads.
        head_dim: width of one head.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.add_q_proj = nn.Linear(dim, dim)
        # a list so that the key reads `to_out.0` as in diffusers (whose entry 1 is a dropout)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.norm_added_q = RMSNorm(head_dim)
        self.norm_added_k = RMSNorm(head_dim)

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        rotary: tuple[Tensor, Tensor],
        key_padding_mask: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Joint attention of both streams.

        Args:
            image: (B, N, dim) modulated image tokens.
            text: (B, L, dim) modulated text tokens.
            rotary: (cos, sin), each (L + N, head_dim / 2), text first.
            key_padding_mask: (B, L + N) bool, True for real tokens, or None without padding.

        Returns:
            image output (B, N, dim) and text output (B, L, dim).
        """
        text_tokens = text.shape[1]

        def split_heads(hidden: Tensor) -> Tensor:  # (B, S, dim) -> (B, S, heads, head_dim)
            return hidden.unflatten(-1, (self.num_heads, self.head_dim))

        cos, sin = rotary
        # fused: RMSNorm and rotary in one kernel per stream, at the stream's own positions
        fused = apex_kernels.fused_kernels_enabled(image)
        text_positions, image_positions = slice(None, text_tokens), slice(text_tokens, None)

        def norm_heads(norm: RMSNorm, hidden: Tensor, positions: slice) -> Tensor:
            if fused:
                return norm(split_heads(hidden), (cos[positions], sin[positions]))
            return norm(split_heads(hidden))

        query = torch.cat(
            [
                norm_heads(self.norm_added_q, self.add_q_proj(text), text_positions),
                norm_heads(self.norm_q, self.to_q(image), image_positions),
            ],
            dim=1,
        )  # (B, L+N, H, Dh)
        key = torch.cat(
            [
                norm_heads(self.norm_added_k, self.add_k_proj(text), text_positions),
                norm_heads(self.norm_k, self.to_k(image), image_positions),
            ],
            dim=1,
        )
        value = torch.cat([split_heads(self.add_v_proj(text)), split_heads(self.to_v(image))], 1)
        if not fused:
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        joint = apex_kernels.attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_padding_mask
        )  # (B, H, L+N, Dh)
        joint = joint.transpose(1, 2).flatten(2)  # (B, L+N, dim)
        # contiguous slices take the same matmul path as diffusers (bit-equal in bf16 on CPU)
        image_output = self.to_out[0](joint[:, text_tokens:].contiguous())  # (B, N, dim)
        text_output = self.to_add_out(joint[:, :text_tokens].contiguous())  # (B, L, dim)
        return image_output, text_output


class QwenImageBlock(nn.Module):
    """One MMDiT block: adaLN-modulated joint attention and MLPs for the image and text streams.

    Both streams are modulated by the same condition (the time embedding) through their own
    `img_mod` / `txt_mod` projections (diffusers' `QwenImageTransformerBlock`).

    Args:
        dim: model width.
        num_heads: number of attention heads.
        head_dim: width of one head.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, MODULATION_PARAMETERS * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn = JointAttention(dim, num_heads, head_dim)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, MODULATION_PARAMETERS * dim))
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_mlp = FeedForward(dim)

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        condition: Tensor,
        rotary: tuple[Tensor, Tensor],
        key_padding_mask: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """One block on both streams.

        Args:
            image: (B, N, dim) image tokens.
            text: (B, L, dim) text tokens.
            condition: (B, dim) time embedding temb.
            rotary: (cos, sin), each (L + N, head_dim / 2), text first.
            key_padding_mask: (B, L + N) bool, True for real tokens, or None without padding.

        Returns:
            updated image (B, N, dim) and text (B, L, dim) tokens.
        """
        image_attention_mod, image_mlp_mod = self.img_mod(condition).chunk(2, dim=-1)  # (B, 3D)
        text_attention_mod, text_mlp_mod = self.txt_mod(condition).chunk(2, dim=-1)

        image_input, image_gate = norm_modulate(self.img_norm1, image, image_attention_mod)
        text_input, text_gate = norm_modulate(self.txt_norm1, text, text_attention_mod)
        image_attention, text_attention = self.attn(
            image_input, text_input, rotary, key_padding_mask
        )
        image = gated_residual(image, image_gate, image_attention)
        text = gated_residual(text, text_gate, text_attention)

        image_input, image_gate = norm_modulate(self.img_norm2, image, image_mlp_mod)
        image = gated_residual(image, image_gate, self.img_mlp(image_input))
        text_input, text_gate = norm_modulate(self.txt_norm2, text, text_mlp_mod)
        text = gated_residual(text, text_gate, self.txt_mlp(text_input))

        if text.dtype == torch.float16:
            text = text.clip(-FP16_MAX, FP16_MAX)
        if image.dtype == torch.float16:
            image = image.clip(-FP16_MAX, FP16_MAX)
        return image, text


class OutputNorm(nn.Module):
    """LayerNorm modulated by the condition: norm(x) * (1 + scale) + shift (diffusers'
    `AdaLayerNormContinuous`, whose projection yields scale first, then shift).

    Args:
        dim: model width.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, hidden: Tensor, condition: Tensor) -> Tensor:
        """hidden (B, N, dim), condition (B, dim) -> (B, N, dim)."""
        modulation = self.linear(functional.silu(condition).to(hidden.dtype))  # (B, 2*dim)
        scale, shift = modulation[:, None, :].chunk(2, dim=-1)  # (B, 1, dim) each
        return self.norm(hidden) * (1 + scale) + shift


# --------------------------------------------------------------------------------------------
# the model


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of `module` (works on the meta device)."""
    return sum(parameter.numel() for parameter in module.parameters())


class QwenImageTransformer(nn.Module):
    """Qwen-Image's MMDiT with APEX's second time embedding and condition shift.

    Parameter names and shapes equal diffusers' `QwenImageTransformer2DModel` built from the
    same config; the APEX additions live under `time_text_embed_2.` (E2, built with random
    values of its own, after every other module; `conditioning.init_apex_weights` sets it to
    E1) and `condition_shift.` (a, b). Presets: declared by the specs (`QWEN_IMAGE_PRESETS`).

    Args:
        patch_size: side of the square latent patches packed into one token.
        in_channels: channels of a packed token (patch_size^2 * latent channels).
        out_channels: latent channels predicted per patch position; the output token has
            patch_size^2 * out_channels channels, which must equal in_channels so that the
            velocity has the shape of x_t.
        num_layers: number of MMDiT blocks.
        attention_head_dim: width of one attention head.
        num_attention_heads: number of heads; the model width is heads * head_dim.
        joint_attention_dim: width of the text encoder's hidden states.
        axes_dims_rope: head channels for the rotary embedding of the (frame, height, width)
            axes; each even, summing to attention_head_dim.
        guidance_embeds: diffusers' guidance-distilled variant; must be False (Qwen-Image has
            no guidance embedding).
        shift_scale: a of the condition shift c_fake = a*c + b (method.md section 2).
        shift_bias: b of the condition shift.
        shift_learnable: train a and b as parameters instead of fixed buffers.
    """

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
        guidance_embeds: bool = False,
        shift_scale: float = DEFAULT_CONDITION_SHIFT.scale,
        shift_bias: float = DEFAULT_CONDITION_SHIFT.bias,
        shift_learnable: bool = DEFAULT_CONDITION_SHIFT.learnable,
    ):
        super().__init__()
        axes_dims_rope = tuple(int(axis_dim) for axis_dim in axes_dims_rope)
        problems = []
        if guidance_embeds:
            problems.append("guidance_embeds=True is not supported: Qwen-Image has no guidance")
        if patch_size * patch_size * out_channels != in_channels:
            problems.append(
                f"patch_size^2 * out_channels = {patch_size}^2 * {out_channels} must equal "
                f"in_channels = {in_channels}: the velocity must have the shape of x_t"
            )
        if len(axes_dims_rope) != 3 or any(axis_dim % 2 for axis_dim in axes_dims_rope):
            problems.append(
                f"axes_dims_rope {axes_dims_rope} must be three even numbers (frame, height, width)"
            )
        if sum(axes_dims_rope) != attention_head_dim:
            problems.append(
                f"axes_dims_rope {axes_dims_rope} sums to {sum(axes_dims_rope)} but must equal "
                f"attention_head_dim = {attention_head_dim}"
            )
        if problems:
            raise ValueError("QwenImageTransformer: " + "; ".join(problems))

        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.attention_head_dim = attention_head_dim
        self.num_attention_heads = num_attention_heads
        self.joint_attention_dim = joint_attention_dim
        self.axes_dims_rope = axes_dims_rope
        self.inner_dim = num_attention_heads * attention_head_dim

        self.time_text_embed = TimeEmbedding(self.inner_dim)  # E1, pretrained
        self.txt_norm = RMSNorm(joint_attention_dim)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(self.inner_dim, num_attention_heads, attention_head_dim)
            for _ in range(num_layers)
        )
        self.norm_out = OutputNorm(self.inner_dim)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * out_channels)

        # APEX additions (method.md sections 1-2). E2 is built last, so that every other weight
        # is drawn as without it; its random values are replaced by E1's (init_apex_weights)
        self.time_text_embed_2 = TimeEmbedding(self.inner_dim)
        self.condition_shift = ConditionShift(shift_scale, shift_bias, shift_learnable)

        # indices of the blocks whose activations are recomputed in the backward pass
        self.checkpointed_blocks: frozenset[int] = frozenset()

    # ---- construction helpers --------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **apex_options: Any) -> QwenImageTransformer:
        """Build a preset of `QWEN_IMAGE_PRESETS` (shift_* options pass through); E2 is set
        from E1 by `conditioning.init_apex_weights` afterwards."""
        presets = __getattr__("QWEN_IMAGE_PRESETS")
        if name not in presets:
            raise ValueError(f"Qwen-Image preset {name!r} is unknown; known: {', '.join(presets)}")
        return cls(**presets[name], **apex_options)

    @classmethod
    def from_diffusers_config(
        cls, config: Mapping[str, Any], **apex_options: Any
    ) -> QwenImageTransformer:
        """Build from the fields of a diffusers transformer config.json (shift_* pass through).

        Keys starting with "_" and `IGNORED_DIFFUSERS_CONFIG_FIELDS` are skipped; the options
        of newer variants (`UNSUPPORTED_DIFFUSERS_CONFIG_FIELDS`) must be false; any other
        unknown key is an error, so a misspelled or new setting is not silently dropped.
        """
        arguments, problems = {}, []
        for key, value in config.items():
            if key.startswith("_") or key in IGNORED_DIFFUSERS_CONFIG_FIELDS:
                continue
            if key in UNSUPPORTED_DIFFUSERS_CONFIG_FIELDS:
                if value:
                    problems.append(f"{key}={value!r} (a Qwen-Image variant not implemented)")
            elif key in DIFFUSERS_CONFIG_FIELDS:
                arguments[key] = value
            else:
                problems.append(f"unknown key {key!r}")
        if problems:
            raise ValueError("diffusers transformer config: " + "; ".join(problems))
        if arguments.get("out_channels") is None:  # diffusers: None means in_channels
            arguments["out_channels"] = arguments.get("in_channels", 64)
        return cls(**arguments, **apex_options)

    def diffusers_config(self) -> dict[str, Any]:
        """The config.json fields that rebuild the diffusers-compatible part in diffusers."""
        return {
            "_class_name": "QwenImageTransformer2DModel",
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "guidance_embeds": False,
            "axes_dims_rope": list(self.axes_dims_rope),
        }

    def parameter_counts(self) -> dict[str, int]:
        """Parameter elements: `pretrained` (the diffusers-compatible part), `apex` (E2 and a
        learnable shift), `total`. Works on the meta device."""
        apex = sum(
            parameter.numel() for name, parameter in self.named_parameters() if is_apex_key(name)
        )
        total = count_parameters(self)
        return {"pretrained": total - apex, "apex": apex, "total": total}

    def load_pretrained_state_dict(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load a diffusers (or apex_dist) state dict; return the APEX keys it lacked.

        Every diffusers key must be present and no unknown key may appear. If the state dict
        has no E2 (a plain diffusers checkpoint), E2 is set to the loaded E1
        (`init_apex_weights`); a missing condition shift keeps its constructor values.
        """
        result = self.load_state_dict(state_dict, strict=False)
        missing_pretrained = [key for key in result.missing_keys if not is_apex_key(key)]
        if missing_pretrained or result.unexpected_keys:
            raise ValueError(
                f"state dict does not fit QwenImageTransformer: missing {missing_pretrained}, "
                f"unexpected {result.unexpected_keys}"
            )
        if any(key.startswith("time_text_embed_2.") for key in result.missing_keys):
            init_apex_weights(self)
        return list(result.missing_keys)

    # ---- activation checkpointing (switched from outside) ------------------------------------

    def enable_activation_checkpointing(self, every: int = 1) -> None:
        """Recompute the activations of blocks 0, every, 2*every, ... in the backward pass.

        Uses torch.utils.checkpoint with use_reentrant=False; outputs and gradients are
        unchanged. Only applies while gradients are enabled.

        Args:
            every: checkpoint one block in `every` (1 = all blocks).
        """
        if every < 1:
            raise ValueError(
                f"activation checkpointing every={every} must be >= 1 (1 checkpoints every "
                "block); use disable_activation_checkpointing() to turn it off"
            )
        self.checkpointed_blocks = frozenset(range(0, self.num_layers, every))

    def disable_activation_checkpointing(self) -> None:
        """Keep the activations of every block (the default)."""
        self.checkpointed_blocks = frozenset()

    # ---- forward -------------------------------------------------------------------------

    def _check_inputs(
        self,
        x_t: Tensor,
        t: Tensor,
        target_time: Tensor,
        text: Tensor,
        text_mask: Optional[Tensor],
        fake_rows: Optional[Tensor],
        image_shape: Optional[Sequence[int]],
    ) -> tuple[int, int, int]:
        """Raise a ValueError naming the argument, its shape and the expected one."""
        if x_t.dim() != 3 or x_t.shape[-1] != self.in_channels:
            raise ValueError(
                f"x_t has shape {tuple(x_t.shape)}; expected packed latents (batch, image "
                f"tokens, in_channels={self.in_channels})"
            )
        batch, image_tokens = x_t.shape[:2]
        for name, value in (("t", t), ("tt", target_time)):
            if tuple(value.shape) != (batch,):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}; expected ({batch},), one time per "
                    "row of x_t"
                )
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != self.joint_attention_dim:
            raise ValueError(
                f"text has shape {tuple(text.shape)}; expected (batch={batch}, text tokens, "
                f"joint_attention_dim={self.joint_attention_dim})"
            )
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"text_mask has shape {tuple(text_mask.shape)}; expected {tuple(text.shape[:2])}"
                " (batch, text tokens), True for real tokens"
            )
        if fake_rows is not None and tuple(fake_rows.shape) != (batch,):
            raise ValueError(
                f"fake_rows has shape {tuple(fake_rows.shape)}; expected ({batch},) booleans"
            )
        if image_shape is None:
            raise ValueError(
                "image_shape=(frames, height, width) of the latent patch grid is required: the "
                "rotary embedding needs the grid of the packed image tokens "
                f"(x_t has {image_tokens} tokens)"
            )
        if (
            not isinstance(image_shape, Sequence)
            or len(image_shape) != 3
            or any(int(size) < 1 for size in image_shape)
        ):
            raise ValueError(
                f"image_shape {image_shape!r} must be three positive integers "
                "(frames, height, width) in latent patches"
            )
        frames, height, width = (int(size) for size in image_shape)
        if frames * height * width != image_tokens:
            raise ValueError(
                f"image_shape {(frames, height, width)} gives {frames * height * width} image "
                f"tokens but x_t has shape {tuple(x_t.shape)} with {image_tokens}: "
                "frames * height * width must equal the token count"
            )
        return frames, height, width

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        target_time: Tensor,
        text: Tensor,
        text_mask: Optional[Tensor] = None,
        fake_rows: Optional[Tensor] = None,
        *,
        image_shape: Optional[Sequence[int]] = None,
    ) -> Tensor:
        """The mean velocity F(x_t, t, tt, c) on packed latents.

        Args:
            x_t: (B, N, in_channels) packed noisy latents, N = frames * height * width.
            t: (B,) current times in [0, 1]; fed to E1 as diffusers feeds `timestep`.
            target_time: (B,) target times tt <= t; tt = t gives the pretrained model.
            text: (B, L, joint_attention_dim) text encoder hidden states.
            text_mask: (B, L) bool, True for real tokens; None or all True means no padding
                (then no mask reaches attention and the fused kernels stay usable).
            fake_rows: (B,) bool; rows whose text tokens get the condition shift, or None.
            image_shape: (frames, height, width) of the latent patch grid, the same for every
                row; required (keyword only).

        Returns:
            (B, N, in_channels) velocity, the shape of x_t.
        """
        grid = self._check_inputs(x_t, t, target_time, text, text_mask, fake_rows, image_shape)
        image = self.img_in(x_t)  # (B, N, D)
        dtype = image.dtype

        # temb = E1(t) + E2(tt) * (t - tt); diffusers casts the timestep to the model dtype
        condition = combine_time_embeddings(
            self.time_text_embed(t.to(dtype), dtype),  # (B, D)
            self.time_text_embed_2(target_time.to(dtype), dtype),  # (B, D)
            t,
            target_time,
        )

        # c = txt_in(txt_norm(text)); fake rows get c_fake = a*c + b
        if fake_rows is not None:
            fake_rows = fake_rows.to(torch.bool)
        text_hidden = self.condition_shift(self.txt_in(self.txt_norm(text)), fake_rows)  # (B,L,D)

        key_padding_mask = None
        if text_mask is not None and not bool(text_mask.all()):  # one host sync per forward
            image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
            key_padding_mask = torch.cat([text_mask.to(torch.bool), image_mask], dim=1)  # (B,L+N)

        rotary = joint_rotary_embedding(grid, text.shape[1], self.axes_dims_rope, image.device)

        for index, block in enumerate(self.transformer_blocks):
            if index in self.checkpointed_blocks and torch.is_grad_enabled():
                image, text_hidden = checkpoint(
                    block,
                    image,
                    text_hidden,
                    condition,
                    rotary,
                    key_padding_mask,
                    use_reentrant=False,
                )
            else:
                image, text_hidden = block(image, text_hidden, condition, rotary, key_padding_mask)

        return self.proj_out(self.norm_out(image, condition))  # (B, N, p*p*out_channels)
