"""Pixel space in place of a VAE, packed the way Qwen-Image packs its latents.

Qwen-Image's transformer reads packed latents: each token holds a 2x2 patch of the latent's C
channels (in_channels = 4 C) and predicts the same (out_channels = C). `PixelCodec` plays the
VAE for RGB images: a space-to-depth by 2 makes a "latent" of C = 12 channels at half the
resolution (channel (dy, dx, rgb) is pixel (2i + dy, 2j + dx) of the image), which is then
packed into 2x2 patches like a real latent. So one token is a 4x4 pixel patch (48 values), a
32x32 image is 8x8 = 64 tokens, and the quickstart's preset `qwen-image-pixels-tiny`
(in_channels 48, out_channels 12) trains directly on pixels, with the tools that expect a VAE
(`tools/encode_prompts.encode_shard`):

    codec = PixelCodec()
    latents, image_shape = codec.encode(images)   # (B, 3, H, W) in [-1, 1] -> (B, H/4*W/4, 48)
    images = codec.decode(latents, image_shape)   # and back, exactly

The latent's first three channels are the RGB of every other pixel, so the training loop's
validation grids (which show a latent's first three channels) show the image at half size.
"""

from __future__ import annotations

from torch import Tensor

# Space-to-depth factor that turns pixels into the "latent" (the VAE's downsampling plays it).
DEPTH_FACTOR = 2
# Side of the latent patch packed into one token (Qwen-Image's transformer patch size).
PATCH_SIZE = 2
# RGB.
IMAGE_CHANNELS = 3
# Pixels per token side, and values per token.
PIXELS_PER_TOKEN_SIDE = DEPTH_FACTOR * PATCH_SIZE
TOKEN_FEATURES = IMAGE_CHANNELS * PIXELS_PER_TOKEN_SIDE**2


class PixelCodec:
    """Packs images into tokens of 4x4 pixel patches and unpacks them (module doc).

    A token's 48 values are ordered (latent channel, patch row, patch column), the order of
    diffusers' `QwenImagePipeline._pack_latents`, with latent channel = (dy, dx, rgb);
    `image_shape` is (frames = 1, H / 4, W / 4), the token grid.
    """

    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, 3, H, W) -> (packed (B, H/4 * W/4, 48), image_shape (1, H/4, W/4))."""
        if images.dim() != 4 or images.shape[1] != IMAGE_CHANNELS:
            raise ValueError(
                f"PixelCodec.encode takes images (B, {IMAGE_CHANNELS}, H, W) (got "
                f"{tuple(images.shape)})"
            )
        batch, channels, height, width = images.shape
        side = PIXELS_PER_TOKEN_SIDE
        if height % side or width % side:
            raise ValueError(f"image sides must be multiples of {side} (got {height}x{width})")
        rows, columns = height // side, width // side
        # pixel row = side * token_row + DEPTH_FACTOR * patch_row + dy (columns alike)
        grid = images.reshape(
            batch, channels, rows, PATCH_SIZE, DEPTH_FACTOR, columns, PATCH_SIZE, DEPTH_FACTOR
        )
        # -> (B, token_row, token_column, dy, dx, rgb, patch_row, patch_column)
        packed = grid.permute(0, 2, 5, 4, 7, 1, 3, 6).reshape(batch, rows * columns, TOKEN_FEATURES)
        return packed, (1, rows, columns)

    def decode(self, packed: Tensor, image_shape) -> Tensor:
        """Packed (B, N, 48) and image_shape (1, h, w) -> images (B, 3, 4h, 4w)."""
        _, rows, columns = (int(size) for size in image_shape)
        batch, tokens, features = packed.shape
        if tokens != rows * columns or features != TOKEN_FEATURES:
            raise ValueError(
                f"packed pixels {tuple(packed.shape)} do not match image_shape "
                f"{tuple(image_shape)}: expected (B, {rows * columns}, {TOKEN_FEATURES})"
            )
        grid = packed.reshape(
            batch, rows, columns, DEPTH_FACTOR, DEPTH_FACTOR, IMAGE_CHANNELS, PATCH_SIZE, PATCH_SIZE
        )
        # -> (B, rgb, token_row, patch_row, dy, token_column, patch_column, dx)
        images = grid.permute(0, 5, 1, 6, 3, 2, 7, 4)
        side = PIXELS_PER_TOKEN_SIDE
        return images.reshape(batch, IMAGE_CHANNELS, rows * side, columns * side)
