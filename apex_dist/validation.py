"""Validation grids a person wants to look at: the teacher beside the student, decoded, labelled.

Every `logging.sample_every_steps` (and at step 0) the trainer calls `ValidationGrid.write`:

- the prompts and the starting noise are fixed for the whole run: the first
  `logging.sample_count` rows of the data stream opened with a seed of its own
  (train.seed + VALIDATION_SEED_OFFSET), and noise from a generator with that seed;
- rows of the grid: the teacher (the starting weights: the LoRA base, or the frozen copy) with
  `logging.teacher_steps` Euler steps and classifier-free guidance `logging.teacher_guidance_scale`,
  then the student at 1, 2 and 4 NFE (method.md section 7). The teacher's samples are computed
  once and kept in `samples/teacher.safetensors`, so a resumed run shows the same teacher row
  (a full fine-tuning run without a frozen copy has no teacher after step 0: its step-0 row is
  the teacher);
- images are decoded (the VAE for latent models, the pixel codec in pixel space; the 2-D toy's
  points are drawn as dots in the plane), one column per prompt with the prompt written under it
  and the sampler written at the left of each row;
- written as `samples/step_XXXXXXXX.png` in the run directory (atomically) and logged to wandb
  as one image per sampler row and prompt, with the prompt as its caption.

Collective: every rank samples (ZeRO-3 gathers each layer from every rank); rank 0 writes.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from apex_dist.atomic import atomic_path
from apex_dist.data.batch import TrainBatch
from apex_dist.method import sample, sample_euler

logger = logging.getLogger("apex_dist")

# Offset of the validation stream's seed from the training seed (a disjoint random stream).
VALIDATION_SEED_OFFSET = 10_007
# Student NFEs shown in the grid (method.md section 7: the sampler's 1, 2 and 4 NFE grids).
STUDENT_NFES = (1, 2, 4)
# Smallest side of one image cell in pixels: tiny test images are enlarged to it (nearest
# neighbour) so that the labels fit under them.
MIN_CELL_PIXELS = 128
# Pixels of text: the width of one character and the height of one line of PIL's default
# bitmap font, used to lay out labels.
CHARACTER_PIXELS, LINE_PIXELS = 6, 11
# Lines of prompt text under each column (longer prompts are cut with an ellipsis).
CAPTION_LINES = 4
# Width of the left margin that holds the sampler names.
ROW_LABEL_PIXELS = 96
# Side in pixels of one cell drawn from 2-D points, and the half-width of the square of the data
# plane shown (the toy's classes lie within radius 4 + 1.2 of the origin).
POINT_CELL_PIXELS = 128
POINT_VIEW_RADIUS = 6.0
TEACHER_FILE = "teacher.safetensors"


class ValidationGrid:
    """Fixed validation prompts and noise, sampled and drawn on demand (module doc).

    Args:
        trainer: the Trainer (its config, engine, preparer, stream factory, metrics, rank).
        fresh: the run starts at step 0 (not resumed): a teacher file left by an earlier run of
            the directory is not this run's and is removed.
    """

    def __init__(self, trainer, fresh: bool = True):
        self.trainer = trainer
        self.config = trainer.config
        self.directory = Path(self.config.train.output_dir) / "samples"
        self._batch: Optional[TrainBatch] = None
        self._noise: Optional[Tensor] = None
        self._teacher: Optional[Tensor] = None
        if fresh and trainer.info.is_main:
            (self.directory / TEACHER_FILE).unlink(missing_ok=True)

    # ---- the fixed batch ---------------------------------------------------------------------

    def batch(self) -> TrainBatch:
        """`logging.sample_count` prepared rows, the same on every rank."""
        if self._batch is None:
            config, trainer = self.config, self.trainer
            seed = config.train.seed + VALIDATION_SEED_OFFSET
            count = config.logging.sample_count
            stream = trainer.stream_factory(config, 0, 1, count, seed)
            batch = trainer.prepare(next(iter(stream)), step=0, micro_batch=0, training=False)
            guidance = config.logging.teacher_guidance_scale
            if guidance != 1.0 and batch.neg_text is None:
                try:
                    batch.neg_text, batch.neg_text_mask = trainer.prepare.negative()
                except (ValueError, FileNotFoundError) as error:
                    logger.warning(
                        "validation teacher without guidance: the negative prompt cannot be "
                        "encoded (%s)",
                        error,
                    )
            self._batch = batch
        return self._batch

    def noise(self) -> Tensor:
        """The starting noise of every sampler, fixed for the run (the validation seed)."""
        if self._noise is None:
            generator = torch.Generator().manual_seed(
                self.config.train.seed + VALIDATION_SEED_OFFSET
            )
            shape = self.batch().generated_shape()
            self._noise = torch.randn(shape, generator=generator).to(self.trainer.info.device)
        return self._noise

    def teacher_guidance_scale(self) -> float:
        """logging.teacher_guidance_scale, or 1 when the negative prompt is not available."""
        if self.batch().neg_text is None:
            return 1.0
        return self.config.logging.teacher_guidance_scale

    # ---- sampling ----------------------------------------------------------------------------

    def _sample(self, model, nfe: Optional[int]) -> Tensor:
        """The teacher (nfe None: Euler with CFG) or the student at `nfe` evaluations."""
        batch, noise, engine = self.batch(), self.noise(), self.trainer.engine
        text, mask = batch.text, batch.text_mask
        with engine.evaluation():
            if nfe is None:
                return sample_euler(
                    model,
                    noise,
                    text,
                    mask,
                    steps=self.config.logging.teacher_steps,
                    guidance_scale=self.teacher_guidance_scale(),
                    neg_text=batch.neg_text,
                    neg_text_mask=batch.neg_text_mask,
                    image_shape=batch.image_shape,
                ).cpu()
            generator = torch.Generator(device=noise.device).manual_seed(
                self.config.train.seed + VALIDATION_SEED_OFFSET + nfe
            )
            return sample(
                model,
                noise,
                text,
                mask,
                nfe=nfe,
                generator=generator,
                image_shape=batch.image_shape,
            ).cpu()

    def teacher_samples(self, step: int) -> Optional[Tensor]:
        """The teacher's samples: from memory, from the run directory, or sampled now."""
        if self._teacher is not None:
            return self._teacher
        from safetensors.torch import load_file, save_file

        path = self.directory / TEACHER_FILE
        if path.is_file():
            self._teacher = load_file(path)["samples"]
            return self._teacher
        engine = self.trainer.engine
        teacher = engine.teacher()
        if teacher is None and step == 0:
            teacher = engine.inference_model()  # the student is still the teacher
        if teacher is None:
            return None
        self._teacher = self._sample(teacher, None)
        if self.trainer.info.is_main:
            with atomic_path(path) as temporary:
                save_file({"samples": self._teacher.contiguous()}, str(temporary))
        return self._teacher

    # ---- the grid ----------------------------------------------------------------------------

    def write(self, step: int) -> Optional[Path]:
        """Sample every row of the grid, draw it and log it (collective; rank 0 writes)."""
        from apex_dist.distributed.runtime import barrier

        batch = self.batch()
        rows: list[tuple[str, str, Tensor]] = []  # (wandb name, grid label, samples)
        teacher = self.teacher_samples(step)
        if teacher is not None:
            steps = self.config.logging.teacher_steps
            scale = self.teacher_guidance_scale()
            rows.append(("teacher", f"teacher\n{steps} steps\ncfg {scale:g}", teacher))
        student = self.trainer.engine.inference_model()
        for nfe in STUDENT_NFES:
            rows.append((f"student_{nfe}nfe", f"student\n{nfe} NFE", self._sample(student, nfe)))
        path = None
        if self.trainer.info.is_main:
            pictures = {name: self.pictures(samples) for name, _, samples in rows}
            path = self.directory / f"step_{step:08d}.png"
            labels = batch.labels()
            save_labelled_grid([(label, pictures[name]) for name, label, _ in rows], labels, path)
            self.trainer.metrics.log_images(step, pictures, labels, grid=path)
            logger.info("validation grid %s", path)
        barrier()
        return path

    def pictures(self, samples: Tensor) -> list[Tensor]:
        """(3, H, W) images in [0, 1], one per row of `samples`."""
        batch = self.batch()
        if samples.dim() == 2 and samples.shape[1] == 2:
            return [draw_point(point) for point in samples]
        images = self.trainer.prepare.decode(samples, batch.image_shape).cpu()
        return [((image + 1) / 2).clamp(0, 1) for image in images]


def draw_point(point: Tensor) -> Tensor:
    """A 2-D point as a dot on a white square showing [-6, 6]^2 of the plane."""
    canvas = torch.ones(3, POINT_CELL_PIXELS, POINT_CELL_PIXELS)
    column, row = (
        int(((coordinate / POINT_VIEW_RADIUS + 1) / 2 * (POINT_CELL_PIXELS - 1)).round())
        for coordinate in (point[0], -point[1])
    )
    if 0 <= column < POINT_CELL_PIXELS and 0 <= row < POINT_CELL_PIXELS:
        canvas[:, max(0, row - 2) : row + 3, max(0, column - 2) : column + 3] = 0
    return canvas


def caption_lines(text: str, width_pixels: int) -> list[str]:
    """`text` wrapped to the cell width, at most CAPTION_LINES lines."""
    characters = max(4, width_pixels // CHARACTER_PIXELS)
    lines = textwrap.wrap(text, characters) or [""]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][: characters - 3] + "..."
    return lines


def save_labelled_grid(
    rows: list[tuple[str, list[Tensor]]], prompts: list[str], path: Path
) -> None:
    """One column per prompt (written under it), one row per sampler (named at its left);
    written atomically as PNG."""
    from PIL import Image, ImageDraw

    height, width = rows[0][1][0].shape[1:]
    scale = max(1, -(-MIN_CELL_PIXELS // max(height, width)))  # enlarge tiny images
    cell_height, cell_width = height * scale, width * scale
    gap = 4
    caption_height = CAPTION_LINES * LINE_PIXELS + gap
    canvas_width = ROW_LABEL_PIXELS + len(prompts) * (cell_width + gap)
    canvas_height = len(rows) * (cell_height + gap) + caption_height
    canvas = Image.new("RGB", (canvas_width, canvas_height), "white")
    draw = ImageDraw.Draw(canvas)
    for row_index, (label, pictures) in enumerate(rows):
        top = row_index * (cell_height + gap)
        draw.multiline_text((4, top + 4), label, fill="black")
        for column, picture in enumerate(pictures):
            array = (picture.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            image = Image.fromarray(array).resize((cell_width, cell_height), Image.NEAREST)
            canvas.paste(image, (ROW_LABEL_PIXELS + column * (cell_width + gap), top))
    caption_top = len(rows) * (cell_height + gap)
    for column, prompt in enumerate(prompts):
        left = ROW_LABEL_PIXELS + column * (cell_width + gap)
        draw.multiline_text(
            (left, caption_top), "\n".join(caption_lines(prompt, cell_width)), fill="black"
        )
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")
