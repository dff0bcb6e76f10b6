"""Decoding samples of each kind and collating them into batches.

Sample kinds and the tar members they read (the key's members, by extension):

- ``prompt``: ``txt`` (the caption) or ``json`` (its caption field); the data-free mode.
- ``image_text``: one image (``jpg``, ``jpeg``, ``png`` or ``webp``) and a caption as above.
- ``precomputed``: ``safetensors`` with ``text`` (S, D) float, ``text_mask`` (S,) bool or
  uint8, and optionally ``latents`` (N, C) with ``image_shape`` (3,) = (frames, h, w) of the
  latent patch grid, N = frames * h * w; a caption is optional. Written by
  tools/encode_prompts.py. The member's header is checked like any safetensors file the project
  reads (offsets, dtypes, sizes), and the tensors are checked for their dtypes, shapes and
  finite values: a sample that fails is bad, never a crash later in `collate` or a NaN in the
  model.

A ``json`` member, when present, is returned whole as the sample's ``metadata`` (the synthetic
dataset stores each scene's structured spec there).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PRECOMPUTED_EXTENSION = "safetensors"

# Image sides are multiples of 16: Qwen-Image's VAE downsamples by 8 and the transformer packs
# 2x2 latent patches.
IMAGE_SIDE_MULTIPLE = 16


class BadSample(ValueError):
    """A sample that cannot be used (missing field, empty caption, undecodable member)."""


@dataclass
class Decoded:
    """A decoded sample and the bucket it is batched in (batches hold one bucket).

    `widths` are the sizes that every row of a stream must share, whatever its bucket (the
    text feature width, the latent channels): the stream refuses rows that differ from the
    first it read.
    """

    key: str
    bucket: str
    fields: dict[str, Any] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)


def bucket_sizes(resolution: int, aspect_ratios: list[float]) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio (width / height), of about resolution^2 pixels."""
    if not aspect_ratios:
        return [(resolution, resolution)]
    sizes = []
    for ratio in aspect_ratios:
        width = round(resolution * math.sqrt(ratio) / IMAGE_SIDE_MULTIPLE) * IMAGE_SIDE_MULTIPLE
        height = round(resolution / math.sqrt(ratio) / IMAGE_SIDE_MULTIPLE) * IMAGE_SIDE_MULTIPLE
        sizes.append((max(height, IMAGE_SIDE_MULTIPLE), max(width, IMAGE_SIDE_MULTIPLE)))
    return sizes


def nearest_bucket(height: int, width: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, in log scale."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: abs(math.log(size[1] / size[0]) - ratio))


def caption_of(members: dict[str, bytes], caption_key: str, required: bool) -> str | None:
    """The caption from ``txt``, else from the ``json`` member's `caption_key`."""
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8", errors="strict").strip()
        except UnicodeDecodeError as error:
            raise BadSample(
                f"txt caption is not UTF-8 (byte {members['txt'][error.start]:#04x} at position "
                f"{error.start}); re-encode the captions as UTF-8"
            ) from None
    elif "json" in members:
        metadata = json.loads(members["json"])
        caption = metadata.get(caption_key) if isinstance(metadata, dict) else None
        if caption is None:
            if required:
                raise BadSample(f"json member has no caption field {caption_key!r}")
            return None
        caption = str(caption).strip()
    else:
        if required:
            raise BadSample("no caption: the sample has neither a txt nor a json member")
        return None
    if not caption and required:
        raise BadSample("empty caption")
    return caption or None


def load_image(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode, resize to cover (height, width) and crop the centre: uint8 (height, width, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly, which is much faster for large files
        image.draft("RGB", (width, height))
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left = (image.width - width) // 2
        top = (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
        return np.array(image, dtype=np.uint8)  # a writable copy


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


class SampleDecoder:
    """Turns a tar sample's members into the fields of one batch row, or raises BadSample."""

    def __init__(
        self,
        sample_kind: str,
        caption_key: str = "caption",
        resolution: int = 512,
        aspect_ratios: list[float] = (),
    ):
        self.sample_kind = sample_kind
        self.caption_key = caption_key
        self.sizes = bucket_sizes(resolution, list(aspect_ratios))

    def __call__(self, key: str, members: dict[str, bytes]) -> Decoded:
        try:
            return self._decode(key, members)
        except BadSample:
            raise
        except Exception as error:  # any decoder failure makes the sample bad, not the run
            raise BadSample(f"{type(error).__name__}: {error}") from error

    def _decode(self, key: str, members: dict[str, bytes]) -> Decoded:
        fields: dict[str, Any] = {}
        if "json" in members:
            fields["metadata"] = json.loads(members["json"])
        if self.sample_kind == "prompt":
            fields["prompt"] = caption_of(members, self.caption_key, required=True)
            return Decoded(key, "prompt", fields)
        if self.sample_kind == "image_text":
            fields["prompt"] = caption_of(members, self.caption_key, required=True)
            extension = next((name for name in IMAGE_EXTENSIONS if name in members), None)
            if extension is None:
                raise BadSample(f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
            data = members[extension]
            height, width = nearest_bucket(*image_size(data), self.sizes)
            pixels = load_image(data, height, width)
            fields["image"] = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
            return Decoded(key, f"{height}x{width}", fields)
        if self.sample_kind == "precomputed":
            return self._decode_precomputed(key, members, fields)
        raise ValueError(f"unknown sample kind {self.sample_kind!r}")

    def _decode_precomputed(self, key: str, members: dict[str, bytes], fields: dict) -> Decoded:
        from safetensors.torch import load as load_safetensors

        from apex_dist.export.safetensors_io import check_safetensors_bytes
        from apex_dist.export.torch_archive import CheckpointFormatError

        if PRECOMPUTED_EXTENSION not in members:
            raise BadSample(f"no {PRECOMPUTED_EXTENSION} member with the text features")
        data = members[PRECOMPUTED_EXTENSION]
        try:
            check_safetensors_bytes(data, f"{PRECOMPUTED_EXTENSION} member")
        except CheckpointFormatError as error:
            raise BadSample(str(error)) from None
        tensors = load_safetensors(data)
        for name in ("text", "text_mask"):
            if name not in tensors:
                raise BadSample(f"{PRECOMPUTED_EXTENSION} member has no tensor {name!r}")
        text, mask = tensors["text"], tensors["text_mask"]
        if text.ndim != 2 or mask.shape != text.shape[:1] or text.shape[0] < 1:
            raise BadSample(
                f"text must be (S, D) with S >= 1 and text_mask (S,) (got {tuple(text.shape)} and "
                f"{tuple(mask.shape)})"
            )
        _check_floats("text", text)
        if mask.dtype not in MASK_DTYPES:
            raise BadSample(f"text_mask must be bool or uint8 (got {mask.dtype})")
        fields["text"], fields["text_mask"] = text.float(), mask.bool()
        widths = {"text width": int(text.shape[1])}
        caption = caption_of(members, self.caption_key, required=False)
        if caption is not None:
            fields["prompt"] = caption
        bucket = "text"
        if "latents" in tensors:
            if "image_shape" not in tensors:
                raise BadSample("latents without image_shape (frames, h, w)")
            latents, image_shape = tensors["latents"], tensors["image_shape"]
            if (
                image_shape.shape != (3,)
                or image_shape.is_floating_point()
                or image_shape.dtype == torch.bool
                or not bool((image_shape >= 1).all())
            ):
                raise BadSample(
                    f"image_shape must be 3 positive integers (frames, h, w) (got "
                    f"{image_shape.tolist()} of dtype {image_shape.dtype})"
                )
            shape = tuple(int(value) for value in image_shape.tolist())
            if latents.ndim != 2 or latents.shape[0] != math.prod(shape):
                raise BadSample(
                    f"latents must be (N, C) with N = frames * h * w = {math.prod(shape)} for "
                    f"image_shape {list(shape)} (got {tuple(latents.shape)})"
                )
            _check_floats("latents", latents)
            fields["latents"] = latents.float()
            fields["image_shape"] = shape
            widths["latent channels"] = int(latents.shape[1])
            bucket = "x".join(str(value) for value in shape)
        return Decoded(key, bucket, fields, widths)


# Dtypes a precomputed text mask may have (tools/encode_prompts.py writes uint8).
MASK_DTYPES = (torch.bool, torch.uint8)


def _check_floats(name: str, tensor: torch.Tensor) -> None:
    """A floating-point tensor without nan or inf, or BadSample naming it."""
    if not tensor.is_floating_point():
        raise BadSample(f"{name} must be floating point (got {tensor.dtype})")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise BadSample(f"{name} holds {bad} nan or inf value(s) of {tensor.numel()}")


def collate(rows: list[Decoded]) -> dict[str, Any]:
    """A batch dict from decoded rows of one bucket (see build_stream for the fields)."""
    first = rows[0].fields
    batch: dict[str, Any] = {"key": [row.key for row in rows]}
    if "prompt" in first:
        batch["prompt"] = [row.fields.get("prompt", "") for row in rows]
    if "image" in first:
        batch["image"] = torch.stack([row.fields["image"] for row in rows])
    if "text" in first:
        longest = max(row.fields["text"].shape[0] for row in rows)
        width = first["text"].shape[1]
        text = torch.zeros(len(rows), longest, width)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for index, row in enumerate(rows):
            length = row.fields["text"].shape[0]
            text[index, :length] = row.fields["text"]
            mask[index, :length] = row.fields["text_mask"]
        batch["text"], batch["text_mask"] = text, mask
    if "latents" in first:
        batch["latents"] = torch.stack([row.fields["latents"] for row in rows])
        batch["image_shape"] = first["image_shape"]
    if any("metadata" in row.fields for row in rows):
        batch["metadata"] = [row.fields.get("metadata") for row in rows]
    return batch
