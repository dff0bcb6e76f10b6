"""Qwen-Image's VAE behind a small wrapper: images <-> packed, normalised latents.

Qwen-Image's transformer reads latents that are (1) the VAE posterior's mean, (2) normalised per
channel by the VAE config's `latents_mean` / `latents_std`, and (3) packed into 2x2 patches:
a (B, C, H/8, W/8) latent becomes (B, H/16 * W/16, 4C) tokens, each token holding one channel's
2x2 patch after another. `QwenImageVae.encode` produces exactly that, with the patch grid
`image_shape = (1, H/16, W/16)` the transformer takes; `decode` inverts it. The packing order is
diffusers' `QwenImagePipeline._pack_latents` (tests/test_vae.py checks it).

diffusers is imported only when a VAE is built or loaded, with a clear error if it is missing;
`pack_latents` / `unpack_latents` are pure tensor functions that need nothing else.

    vae = QwenImageVae.from_snapshot("/ckpt/Qwen-Image", dtype=torch.bfloat16, device="cuda")
    latents, image_shape = vae.encode(images)  # images (B, 3, H, W) in [-1, 1]
    images = vae.decode(latents, image_shape)  # (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

# Side of the square latent patch packed into one transformer token (Qwen-Image's patch_size).
PATCH_SIZE = 2
# class name of Qwen-Image's VAE in a diffusers config.json (`_class_name`).
QWEN_IMAGE_VAE_CLASS = "AutoencoderKLQwenImage"
# Tolerance above 1 in absolute value accepted on input images (rounding of uint8 -> [-1, 1]).
IMAGE_RANGE_TOLERANCE = 1e-3
IMAGE_CHANNELS = 3  # RGB


def _diffusers_vae_class():
    try:
        from diffusers import AutoencoderKLQwenImage
    except ImportError as error:
        raise ImportError(
            "the Qwen-Image VAE needs diffusers (pip install the pinned version from "
            "requirements.txt); it is only needed to encode images or decode latents"
        ) from error
    return AutoencoderKLQwenImage


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches (row-major grid).

    Token (i, j) holds, for each channel in turn, the patch values [2i, 2j], [2i, 2j+1],
    [2i+1, 2j], [2i+1, 2j+1]: the layout of diffusers' `QwenImagePipeline._pack_latents`.
    A (B, C, 1, H, W) latent (one frame, as the VAE returns it) is accepted too.
    """
    if latents.dim() == 5:
        if latents.shape[2] != 1:
            raise ValueError(
                f"pack_latents takes one frame; got latents of shape {tuple(latents.shape)} "
                "(B, C, frames, H, W) with more than one frame"
            )
        latents = latents[:, :, 0]
    if latents.dim() != 4:
        raise ValueError(
            f"pack_latents needs (B, C, H, W) latents, got shape {tuple(latents.shape)}"
        )
    batch, channels, height, width = latents.shape
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(
            f"latent height and width must be even to pack 2x2 patches, got {height}x{width}"
        )
    grid_height, grid_width = height // PATCH_SIZE, width // PATCH_SIZE
    patches = latents.reshape(batch, channels, grid_height, PATCH_SIZE, grid_width, PATCH_SIZE)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return patches.reshape(batch, grid_height * grid_width, channels * PATCH_SIZE * PATCH_SIZE)


def unpack_latents(packed: Tensor, image_shape: Sequence[int]) -> Tensor:
    """(B, h*w, 4C) tokens -> (B, C, 2h, 2w) latents; the inverse of `pack_latents`.

    `image_shape` is (frames, h, w) of the patch grid, frames = 1 for images.
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (frames, height, width), got {image_shape!r}")
    frames, grid_height, grid_width = (int(size) for size in image_shape)
    if frames != 1:
        raise ValueError(
            f"unpack_latents handles images (frames = 1), got image_shape {image_shape}"
        )
    if packed.dim() != 3:
        raise ValueError(f"packed latents must be (B, tokens, 4C), got shape {tuple(packed.shape)}")
    batch, tokens, token_width = packed.shape
    patch_area = PATCH_SIZE * PATCH_SIZE
    if tokens != grid_height * grid_width or token_width % patch_area:
        raise ValueError(
            f"packed latents of shape {tuple(packed.shape)} do not fit image_shape {image_shape}: "
            f"expected {grid_height * grid_width} tokens of a multiple of {patch_area} features"
        )
    channels = token_width // patch_area
    patches = packed.reshape(batch, grid_height, grid_width, channels, PATCH_SIZE, PATCH_SIZE)
    patches = patches.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return patches.reshape(batch, channels, grid_height * PATCH_SIZE, grid_width * PATCH_SIZE)


class QwenImageVae:
    """Frozen `AutoencoderKLQwenImage` that speaks the transformer's packed latent layout.

    Args:
        model: a diffusers `AutoencoderKLQwenImage` (frozen and put in eval mode here; its
            device and dtype are used as they are).

    Attributes:
        latent_channels: C, the VAE's z_dim (16 for Qwen-Image; tokens have 4C features).
        downsample_factor: image pixels per latent pixel along each side (8 for Qwen-Image).
        pixels_per_token: image pixels per token along each side (downsample_factor * 2); image
            height and width must be multiples of it.
    """

    def __init__(self, model: nn.Module):
        vae_class = _diffusers_vae_class()
        if not isinstance(model, vae_class):
            raise TypeError(
                f"QwenImageVae needs an AutoencoderKLQwenImage, got {type(model).__name__}"
            )
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.latent_channels = int(config.z_dim)
        self.downsample_factor = 2 ** len(config.temperal_downsample)
        self.pixels_per_token = self.downsample_factor * PATCH_SIZE
        for name in ("latents_mean", "latents_std"):
            values = getattr(config, name)
            if len(values) != self.latent_channels:
                raise ValueError(
                    f"VAE config {name} has {len(values)} values but z_dim is "
                    f"{self.latent_channels}: one value per latent channel is needed"
                )
        if min(config.latents_std) <= 0:
            raise ValueError(f"VAE config latents_std must be positive, got {config.latents_std}")
        # (1, C, 1, 1) statistics in fp32; normalisation is computed in fp32.
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_snapshot(
        cls,
        snapshot_dir: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> QwenImageVae:
        """Load `vae/` of a Hugging Face snapshot directory (checked before weights are read)."""
        vae_class = _diffusers_vae_class()
        vae_dir = Path(snapshot_dir) / "vae"
        config_path = vae_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} is missing: a Qwen-Image snapshot has a vae/ folder with "
                "config.json and the weights (point at the snapshot's root)"
            )
        class_name = json.loads(config_path.read_text()).get("_class_name")
        if class_name != QWEN_IMAGE_VAE_CLASS:
            raise ValueError(
                f"{config_path}: _class_name is {class_name!r}, expected "
                f"{QWEN_IMAGE_VAE_CLASS!r} (Qwen-Image's VAE)"
            )
        model = vae_class.from_pretrained(vae_dir, torch_dtype=dtype).to(device)
        return cls(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(frames, h, w) of the patch grid of a height x width image (checked divisible)."""
        step = self.pixels_per_token
        if height % step or width % step:
            nearest = [max(step, round(size / step) * step) for size in (height, width)]
            raise ValueError(
                f"image height and width must be multiples of {step} (the VAE's "
                f"{self.downsample_factor}x downsampling times the 2x2 packing), got "
                f"{height}x{width}: resize or crop, e.g. to {nearest[0]}x{nearest[1]}"
            )
        return (1, height // self.pixels_per_token, width // self.pixels_per_token)

    def normalize(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) raw VAE latents -> (latents - mean) / std per channel, in fp32."""
        mean = self.latents_mean.to(latents.device)
        std = self.latents_std.to(latents.device)
        return (latents.float() - mean) / std

    def denormalize(self, latents: Tensor) -> Tensor:
        """Inverse of `normalize`, in fp32."""
        mean = self.latents_mean.to(latents.device)
        std = self.latents_std.to(latents.device)
        return latents.float() * std + mean

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Images (B, 3, H, W) in [-1, 1] -> (packed latents (B, h*w, 4C), image_shape).

        Uses the posterior mean (no sampling). Latents are returned in the VAE's dtype;
        image_shape = (1, H/16, W/16) for Qwen-Image.
        """
        if images.dim() != 4 or images.shape[1] != IMAGE_CHANNELS:
            raise ValueError(
                f"images must be (B, {IMAGE_CHANNELS}, H, W), got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point in [-1, 1], got dtype {images.dtype}: "
                "convert uint8 pixels with pixels / 127.5 - 1"
            )
        image_shape = self.image_shape(images.shape[2], images.shape[3])
        low, high = float(images.min()), float(images.max())
        if low < -1 - IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
            raise ValueError(
                f"images must be in [-1, 1], got values in [{low:.3g}, {high:.3g}]: "
                "convert pixels in [0, 255] with pixels / 127.5 - 1"
            )
        video = images.to(device=self.device, dtype=self.dtype)[:, :, None]  # (B, 3, 1, H, W)
        posterior = self.model.encode(video).latent_dist
        latents = self.normalize(posterior.mean[:, :, 0])  # (B, C, H/8, W/8) fp32
        return pack_latents(latents).to(self.dtype), image_shape

    @torch.no_grad()
    def decode(self, packed: Tensor, image_shape: Sequence[int]) -> Tensor:
        """Packed normalised latents (B, h*w, 4C) -> images (B, 3, 16h, 16w) in [-1, 1]."""
        latents = unpack_latents(packed.to(self.device), image_shape)  # (B, C, 2h, 2w)
        if latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"packed latents carry {latents.shape[1]} channels but the VAE has "
                f"{self.latent_channels} (z_dim): tokens must have {4 * self.latent_channels} "
                f"features, got {packed.shape[-1]}"
            )
        raw = self.denormalize(latents).to(self.dtype)[:, :, None]  # (B, C, 1, 2h, 2w)
        return self.model.decode(raw).sample[:, :, 0]

    def __repr__(self) -> str:
        return (
            f"QwenImageVae(latent_channels={self.latent_channels}, "
            f"downsample_factor={self.downsample_factor}, dtype={self.dtype})"
        )
