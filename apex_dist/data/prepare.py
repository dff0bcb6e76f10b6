"""From a stream batch to the batch an objective trains on.

A stream yields whatever its shards hold: prompts, prompts with images, precomputed text
features with or without latents, synthetic scenes, or the 2-D toy's points. `BatchPreparer`
turns each of them into one layout, a `TrainBatch` (apex_dist.data.batch):

    text (B, S, D), text_mask (B, S)        from the features, or the text encoder on prompts
    latents (B, N, C) and image_shape       from the latents, or the VAE / pixel codec on images
    latent_shape (N, C) and image_shape     prompt-only data: the shape of what the student
                                            generates, from data.resolution and aspect_buckets
    neg_text (1, S', D), neg_text_mask      the negative prompt's features, when guidance or
                                            text dropout needs them
    keys, prompts                           the stream's sample keys and prompts (labels, logs)
    truncated_prompts, text_dropped         what this batch's preparation counted

Prompt-only batches take their image size from `data.aspect_buckets` (one bucket per
micro-batch): the bucket of micro-batch m of optimizer step s is drawn from a generator seeded
by (train.seed, s, m), so every rank generates the same size at the same step (their
collectives see equal shapes) and a resumed run draws what the uninterrupted one drew.

`data.text_dropout` replaces the text of that fraction of rows by the negative prompt's
features (the unconditional branch classifier-free guidance needs), drawn per rank from
(seed, step, micro-batch); the 2-D toy's stream applies it itself.

Which objectives can train without images is decided by `apex_dist.config.image_requirement`;
a prompt-only stream that meets a method needing images is refused by the config's validation
(data.sample_kind prompt) or here (precomputed features without latents), with what to change.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

import torch
from torch import Tensor

from apex_dist.config import Config, image_requirement
from apex_dist.data.batch import TrainBatch
from apex_dist.data.samples import bucket_sizes
from apex_dist.models.spec import LatentGeometry, model_spec

logger = logging.getLogger("apex_dist")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed_of(*parts: Any) -> int:
    """A 63-bit seed from a tuple of values, stable across processes and runs."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def latent_geometry(config: Config) -> LatentGeometry:
    """The geometry of `config.model`, from its spec (the snapshot's sizes when pretrained)."""
    spec = model_spec(config.model.preset)
    return spec.geometry(spec.architecture(config.model))


class BatchPreparer:
    """Turns stream batches into objective batches (module doc).

    Args:
        config: the run's config.
        device: where the batch goes (and the text encoder and VAE run).
        rank_seed: this rank's seed (text dropout differs between ranks).
    """

    def __init__(self, config: Config, device: torch.device, rank_seed: int):
        self.config = config
        self.device = device
        self.rank_seed = rank_seed
        self.geometry = latent_geometry(config)
        self.bucket_sizes = bucket_sizes(config.data.resolution, list(config.data.aspect_buckets))
        self.dtype = DTYPES[config.model.dtype]
        self._text_encoder = None
        self._codec = None
        self._negative: Optional[tuple[Tensor, Tensor]] = None

    # ---- encoders, built on first use --------------------------------------------------------

    def _snapshot(self, what: str) -> str:
        if not self.config.model.pretrained:
            advice = "give a snapshot directory with text_encoder/, tokenizer/ and vae/"
            if self.config.data.sample_kind != "precomputed":
                advice += (
                    ", or precompute the features and latents with tools/encode_prompts.py "
                    "(data.sample_kind: precomputed)"
                )
            raise ValueError(f"the data needs {what} but model.pretrained is null: {advice}")
        return self.config.model.pretrained

    def text_encoder(self, why: str = "it holds prompts, not features"):
        """The snapshot's text encoder in model.dtype, keeping model.text_max_length tokens."""
        if self._text_encoder is None:
            from apex_dist.models.text_encoder import QwenTextEncoder

            self._text_encoder = QwenTextEncoder.from_snapshot(
                self._snapshot(f"the text encoder ({why})"),
                dtype=self.dtype,
                device=self.device,
                max_length=self.config.model.text_max_length,
            )
            logger.info(
                "text encoder: %s, %s, at most %d tokens per prompt",
                self.config.model.pretrained,
                self.config.model.dtype,
                self.config.model.text_max_length,
            )
        return self._text_encoder

    def codec(self):
        """Images <-> latents: the snapshot's VAE, or the pixel codec of pixel-space presets."""
        if self._codec is None:
            if self.geometry.kind == "pixels":
                from apex_dist.models.pixels import PixelCodec

                self._codec = PixelCodec()
            elif self.geometry.kind == "vae":
                from apex_dist.models.vae import QwenImageVae

                self._codec = QwenImageVae.from_snapshot(
                    self._snapshot("the VAE (it holds images, not latents)"),
                    dtype=self.dtype,
                    device=self.device,
                )
            else:
                raise ValueError(f"model.preset {self.config.model.preset!r} has no image space")
        return self._codec

    def negative(self) -> tuple[Tensor, Tensor]:
        """The negative prompt's features (1, S, D) and mask, encoded once."""
        if self._negative is None:
            why = "for method.guidance.negative_prompt, which text dropout and CFG use"
            features, mask = self.text_encoder(why).negative(
                self.config.method.guidance.negative_prompt
            )
            self._negative = (features.to(self.device).float(), mask.to(self.device))
        return self._negative

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor, int]:
        """Features (B, S, D) in float32, mask (B, S), and how many prompts were cut at
        model.text_max_length."""
        encoder = self.text_encoder()
        text, mask = encoder.encode(list(prompts))
        return text.float(), mask, int(encoder.last_truncated)

    def decode(self, latents: Tensor, image_shape) -> Tensor:
        """Latents (B, N, C) -> images (B, 3, H, W) in [-1, 1] (VAE or pixel codec)."""
        return self.codec().decode(latents.to(self.device), image_shape).float()

    # ---- one batch ---------------------------------------------------------------------------

    def bucket(self, step: int, micro_batch: int) -> tuple[int, int]:
        """(height, width) of prompt-only micro-batch `micro_batch` of optimizer step `step`:
        the same on every rank (seeded by train.seed, never by the rank)."""
        if len(self.bucket_sizes) == 1:
            return self.bucket_sizes[0]
        generator = torch.Generator().manual_seed(
            _seed_of(self.config.train.seed, "bucket", step, micro_batch)
        )
        index = int(torch.randint(len(self.bucket_sizes), (1,), generator=generator))
        return self.bucket_sizes[index]

    def __call__(
        self, raw: dict, step: int = 0, micro_batch: int = 0, training: bool = True
    ) -> TrainBatch:
        """The TrainBatch of stream batch `raw` at (step, micro_batch) on this preparer's
        device; `training` False (validation) applies no text dropout."""
        batch = TrainBatch.from_dict(self._with_text(raw)).to(self.device)
        if batch.latents is None and "image" in raw:
            latents, image_shape = self.codec().encode(raw["image"].to(self.device))
            batch.latents, batch.image_shape = latents.float(), image_shape
        if batch.latents is None:
            self._check_prompt_only()
            height, width = self.bucket(step, micro_batch)
            batch.latent_shape = self.geometry.latent_shape(height, width)
            if self.geometry.kind != "points":
                batch.image_shape = self.geometry.image_shape(height, width)
        if self._needs_negative() and batch.neg_text is None:
            batch.neg_text, batch.neg_text_mask = self.negative()
        if training and self.config.data.text_dropout > 0 and self.config.data.kind != "toy":
            self._drop_text(batch, step, micro_batch)
        return batch

    def _with_text(self, raw: dict) -> dict:
        """`raw` with text features: its own, or its prompts encoded (and the truncation
        count)."""
        if "text" in raw:
            return raw
        if "prompt" not in raw:
            raise KeyError(
                f"the stream batch has neither 'text' features nor 'prompt' (keys: "
                f"{sorted(raw)}): check data.sample_kind against what the shards hold"
            )
        text, mask, truncated = self.encode_prompts(raw["prompt"])
        return {**raw, "text": text, "text_mask": mask, "truncated_prompts": truncated}

    def _needs_negative(self) -> bool:
        method = self.config.method
        guided = method.guidance.ratio > 0 and method.objective == "apex_v0"
        return guided or self.config.data.text_dropout > 0

    def _check_prompt_only(self) -> None:
        problem = image_requirement(self.config.method)
        if problem is not None:
            raise ValueError(
                f"the data has no images or latents (prompt-only), but {problem}; or give "
                "image_text data, or precomputed shards with latents (tools/encode_prompts.py "
                "--images)"
            )

    def _drop_text(self, batch: TrainBatch, step: int, micro_batch: int) -> None:
        """Replace the text of a data.text_dropout fraction of rows by the negative prompt."""
        text, mask = batch.text, batch.text_mask
        generator = torch.Generator().manual_seed(
            _seed_of(self.rank_seed, "text_dropout", step, micro_batch)
        )
        dropped = torch.rand(text.shape[0], generator=generator) < self.config.data.text_dropout
        if not bool(dropped.any()):
            return
        negative, negative_mask = batch.neg_text, batch.neg_text_mask
        length = max(text.shape[1], negative.shape[1])
        text, mask = _pad_tokens(text, mask, length)
        negative, negative_mask = _pad_tokens(negative[:1], negative_mask[:1], length)
        rows = dropped.to(text.device)
        batch.text = torch.where(rows[:, None, None], negative.to(text.dtype), text)
        batch.text_mask = torch.where(rows[:, None], negative_mask, mask)
        batch.text_dropped = int(dropped.sum())


def _pad_tokens(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad (B, S, D) features and their (B, S) mask to `length` tokens."""
    missing = length - text.shape[1]
    if missing <= 0:
        return text, mask.bool()
    text = torch.nn.functional.pad(text, (0, 0, 0, missing))
    mask = torch.nn.functional.pad(mask.bool(), (0, missing), value=False)
    return text, mask
