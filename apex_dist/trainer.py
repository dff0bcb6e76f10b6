"""The training loop of apex_dist.

    trainer = Trainer(config)          # process group, engine, data, checkpoints, metrics
    summary = trainer.train()          # steps until train.steps or a preemption signal
    trainer.close()

One optimizer step reads like the algorithm:
    micro-batches <- data stream (resumable position)
    batch <- text features and latents (precomputed, or the encoders)
    loss <- objective(student, batch, reference); backward; DeepSpeed step (engine)
    EMA update on the local partition (engine); metrics; periodic grid and checkpoint

A resumed run (checkpoint.resume) continues with the same model, optimizer, scheduler, EMA,
step, per-rank RNG and data position, so its losses and sample keys are those of the
uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy
import torch
from torch import Tensor

from apex_dist.config import Config, save_config
from apex_dist.distributed.checkpoint import CheckpointManager, set_rng_state
from apex_dist.distributed.engine import TrainingEngine
from apex_dist.distributed.runtime import (
    PreemptionFlag,
    RankInfo,
    any_rank,
    barrier,
    init_distributed,
    logger,
)
from apex_dist.distributed.watchdog import Watchdog
from apex_dist.method import sample, sample_euler
from apex_dist.metrics import MetricsLogger

# Offset of the validation stream's seed from the training seed (a disjoint random stream).
VALIDATION_SEED_OFFSET = 10_007
# Rank offset of per-rank seeds (seed + RANK_SEED_STRIDE * rank keeps ranks' streams apart).
RANK_SEED_STRIDE = 1
# Side in pixels of one cell of a validation grid drawn from 2-D points.
POINT_CELL_PIXELS = 128
# Half-width of the square of the data plane shown for 2-D points (the toy's classes lie
# within radius 4 + 1.2 of the origin).
POINT_VIEW_RADIUS = 6.0

StreamFactory = Callable[..., Any]


def default_stream_factory(
    config: Config, rank: int, world_size: int, micro_batch_size: int, seed: int
):
    """`apex_dist.data.build_stream` (WebDataset, synthetic shapes or the 2-D toy)."""
    from apex_dist.data import build_stream

    return build_stream(
        config.data, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, seed=seed
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@dataclass
class TrainSummary:
    """What `train()` did; `history` has one entry per step (step, loss, keys) on every rank."""

    steps_done: int
    stopped_by: str
    last_checkpoint: Optional[Path]
    history: list[dict[str, Any]] = field(default_factory=list)


class BatchPreparer:
    """Turns a stream batch into an objective batch: text features + mask, latents, the
    negative prompt's embedding when guidance is on, and `image_shape`.

    Precomputed fields are used as they are; "prompt" rows go through the text encoder and
    "image" rows through the VAE (both built on first use from model.pretrained)."""

    def __init__(self, config: Config, device: torch.device):
        self.config = config
        self.device = device
        self._text_encoder = None
        self._vae = None
        self._negative: Optional[tuple[Tensor, Tensor]] = None

    def text_encoder(self):
        if self._text_encoder is None:
            from apex_dist.models.text_encoder import QwenTextEncoder

            if not self.config.model.pretrained:
                raise ValueError(
                    "the data has prompts but no text features, and model.pretrained is null: "
                    "give a snapshot with text_encoder/ and tokenizer/, or precompute features "
                    "with tools/encode_prompts.py"
                )
            self._text_encoder = QwenTextEncoder.from_snapshot(
                self.config.model.pretrained, device=self.device
            )
        return self._text_encoder

    def vae(self):
        if self._vae is None:
            from apex_dist.models.vae import QwenImageVae

            self._vae = QwenImageVae.from_snapshot(self.config.model.pretrained, device=self.device)
        return self._vae

    def negative(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if self._negative is None:
            features, mask = self.text_encoder().negative(
                self.config.method.guidance.negative_prompt
            )
            self._negative = (features.to(self.device), mask.to(self.device))
        return self._negative

    def __call__(self, raw: dict) -> dict:
        batch = {
            key: value.to(self.device) if isinstance(value, Tensor) else value
            for key, value in raw.items()
        }
        if "text" not in batch:
            if "prompt" not in batch:
                raise KeyError(
                    f"batch has neither 'text' features nor 'prompt' (keys: {sorted(batch)})"
                )
            batch["text"], batch["text_mask"] = self.text_encoder().encode(list(batch["prompt"]))
        if "latents" not in batch and "image" in batch:
            batch["latents"], batch["image_shape"] = self.vae().encode(batch["image"])
        needs_negative = (
            self.config.method.guidance.ratio > 0 and self.config.method.objective == "apex_v0"
        )
        if needs_negative and "neg_text" not in batch:
            batch["neg_text"], batch["neg_text_mask"] = self.negative(batch["text"])
        return batch


class Trainer:
    """Builds everything of one run and trains it (module doc)."""

    def __init__(
        self,
        config: Config,
        info: Optional[RankInfo] = None,
        stream_factory: StreamFactory = default_stream_factory,
    ):
        self.config = config
        self.info = info or init_distributed()
        self.output_dir = Path(config.train.output_dir)
        # the run lock, leftovers, the fresh-start rule and the resume checks, before anything
        # is written to output_dir or a model is built (checkpoint.py)
        self.checkpoints = CheckpointManager(config, self.info)
        resume_from = self.checkpoints.prepare_run()
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
        barrier()
        self.engine = TrainingEngine(config, self.info)
        self.rank_seed = config.train.seed + RANK_SEED_STRIDE * self.info.rank
        seed_everything(self.rank_seed)
        self.stream_factory = stream_factory
        self.stream = stream_factory(
            config,
            self.info.rank,
            self.info.world_size,
            config.train.micro_batch_size,
            self.rank_seed,
        )
        self.prepare = BatchPreparer(config, self.info.device)
        self.metrics = MetricsLogger(config, self.info.rank, self.info.world_size, self.info.device)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Optional[Path] = None
        self._batches: Optional[Iterator[dict]] = None
        self._validation: Optional[dict] = None
        if resume_from is not None:
            self._resume(resume_from)

    # ---- state ------------------------------------------------------------------------------

    def _resume(self, path: Path) -> None:
        differences = self.checkpoints.check_compatible(path)
        for key, old, new in differences:
            logger.info("resuming with a changed setting %s: %r -> %r", key, old, new)
        state = self.engine.load(self.checkpoints, path)
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"], self.info.device)
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)

    def rank_state(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict()}

    def save(self) -> Path:
        self.last_checkpoint = self.engine.save(self.checkpoints, self.step, self.rank_state())
        return self.last_checkpoint

    def next_batches(self) -> list[dict]:
        if self._batches is None:
            self._batches = iter(self.stream)
        return [next(self._batches) for _ in range(self.config.train.gradient_accumulation_steps)]

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> TrainSummary:
        config = self.config
        preemption = PreemptionFlag().install() if config.checkpoint.save_on_signal else None
        stopped_by = "steps"
        saved_at = self.step if self.last_checkpoint is not None else -1  # resumed: saved
        watchdog = Watchdog.start(self.output_dir, self.info, config.train.watchdog_seconds)
        try:
            if config.logging.sample_every_steps and self.step == 0:
                self.write_validation_grid()
            self.metrics.start()
            while self.step < config.train.steps:
                raw = self.next_batches()
                batches = [self.prepare(batch) for batch in raw]
                result = self.engine.train_step(
                    batches, count_flops=self.metrics.flops_per_step is None
                )
                self.step += 1
                watchdog.progress(self.step)
                self.metrics.set_flops_per_step(result.flops)
                keys = [key for batch in raw for key in batch.get("key", [])]
                self.history.append(
                    {
                        "step": self.step,
                        "loss": result.metrics.get("loss"),
                        "keys": keys,
                        "skipped": not result.applied,
                    }
                )
                self.metrics.record(self.step, result.metrics)
                every = config.logging.sample_every_steps
                if every and self.step % every == 0:
                    self.write_validation_grid()
                if config.checkpoint.every_steps and self.step % config.checkpoint.every_steps == 0:
                    self.save()
                    saved_at = self.step
                signalled = preemption is not None and preemption.received is not None
                if preemption is not None and any_rank(signalled, self.info.device):
                    stopped_by = f"signal {preemption.name}" if signalled else "signal (other rank)"
                    logger.warning(
                        "%s received: saving at step %d and stopping", stopped_by, self.step
                    )
                    break
            if saved_at != self.step:
                self.save()
        finally:
            watchdog.stop()
            if preemption is not None:
                preemption.uninstall()
        return TrainSummary(self.step, stopped_by, self.last_checkpoint, self.history)

    def close(self) -> None:
        """Finish wandb and free gathered parameters (the process group stays for the caller)."""
        self.metrics.close()
        self.engine.close()
        self.checkpoints.close()

    # ---- validation grids -------------------------------------------------------------------

    def validation_batch(self) -> dict:
        """A fixed batch of `logging.sample_count` rows, the same on every rank."""
        if self._validation is None:
            count = self.config.logging.sample_count
            stream = self.stream_factory(
                self.config, 0, 1, count, self.config.train.seed + VALIDATION_SEED_OFFSET
            )
            batch = self.prepare(next(iter(stream)))
            generator = torch.Generator().manual_seed(
                self.config.train.seed + VALIDATION_SEED_OFFSET
            )
            if "latents" in batch:
                shape = tuple(batch["latents"].shape)
            else:  # prompt-only data (data-free mode): the shape of one row's latents
                shape = (len(batch["text"]), *batch["latent_shape"])
            batch["noise"] = torch.randn(shape, generator=generator).to(self.info.device)
            self._validation = batch
        return self._validation

    def _sample_rows(self, model, batch: dict, teacher: bool) -> Tensor:
        from apex_dist.distributed.engine import _image_shape

        model.image_shape = _image_shape(batch)
        text, mask = batch["text"], batch["text_mask"]
        with self.engine.evaluation():
            if teacher:
                return sample_euler(
                    model, batch["noise"], text, mask, steps=self.config.logging.teacher_steps
                ).cpu()
            return sample(model, batch["noise"], text, mask, nfe=1).cpu()

    def write_validation_grid(self) -> Optional[Path]:
        """Student at 1 NFE beside the teacher (cached from the start of the run) as PNG.
        Collective: every rank samples (ZeRO gathers), rank 0 writes."""
        batch = self.validation_batch()
        directory = self.output_dir / "samples"
        teacher_file = directory / "teacher_samples.pt"
        teacher_samples = None
        if teacher_file.is_file():
            teacher_samples = torch.load(teacher_file, weights_only=True)
        else:
            teacher = self.engine.teacher()
            if teacher is None and self.step == 0:
                teacher = self.engine.inference_model()  # the student is still the teacher
            if teacher is not None:
                teacher_samples = self._sample_rows(teacher, batch, teacher=True)
                if self.info.is_main:
                    directory.mkdir(parents=True, exist_ok=True)
                    torch.save(teacher_samples, teacher_file)
        student_samples = self._sample_rows(self.engine.inference_model(), batch, teacher=False)
        path = None
        if self.info.is_main:
            columns = (
                [student_samples] if teacher_samples is None else [teacher_samples, student_samples]
            )
            path = directory / f"step_{self.step:08d}.png"
            save_grid(columns, batch, path)
            self.metrics.log_images(self.step, {"student_1nfe_vs_teacher": path})
        barrier()
        return path


# --------------------------------------------------------------------------------------------
# pictures


def _normalise(image: Tensor) -> Tensor:
    low, high = image.amin(), image.amax()
    return ((image - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)


def to_pictures(samples: Tensor, batch: dict) -> list[Tensor]:
    """(3, H, W) images in [0, 1], one per row: 2-D points become a dot in the plane; packed
    latents are unpacked and their first three channels shown."""
    from apex_dist.distributed.engine import _image_shape

    if samples.dim() == 2 and samples.shape[1] == 2:
        pictures = []
        for point in samples:
            canvas = torch.ones(3, POINT_CELL_PIXELS, POINT_CELL_PIXELS)
            column, row = (
                ((coordinate / POINT_VIEW_RADIUS + 1) / 2 * (POINT_CELL_PIXELS - 1)).round().long()
                for coordinate in (point[0], -point[1])
            )
            if 0 <= column < POINT_CELL_PIXELS and 0 <= row < POINT_CELL_PIXELS:
                canvas[:, max(0, row - 2) : row + 3, max(0, column - 2) : column + 3] = 0
            pictures.append(canvas)
        return pictures
    shape = _image_shape(batch)
    if samples.dim() == 3 and shape is not None:
        _, height, width = shape
        channels_per_token = samples.shape[-1]
        patch = 2 if channels_per_token % 4 == 0 else 1
        channels = channels_per_token // (patch * patch)
        images = samples.reshape(-1, height, width, channels, patch, patch)
        images = images.permute(0, 3, 1, 4, 2, 5).reshape(
            -1, channels, height * patch, width * patch
        )
        samples = images
    if samples.dim() == 4:
        if samples.shape[1] >= 3:
            return [_normalise(image[:3]) for image in samples]
        return [_normalise(image[:1]).expand(3, -1, -1) for image in samples]
    raise ValueError(f"cannot draw samples of shape {tuple(samples.shape)}")


def save_grid(columns: list[Tensor], batch: dict, path: Path) -> None:
    """One row per validation prompt, one column per sampler; written atomically as PNG."""
    from PIL import Image

    pictures = [to_pictures(column, batch) for column in columns]
    rows = len(pictures[0])
    height, width = pictures[0][0].shape[1:]
    gap = max(2, width // 32)
    grid = torch.ones(3, rows * (height + gap), len(columns) * (width + gap))
    for column_index, column in enumerate(pictures):
        for row_index, picture in enumerate(column):
            top, left = row_index * (height + gap), column_index * (width + gap)
            resized = torch.nn.functional.interpolate(picture[None], size=(height, width))[0]
            grid[:, top : top + height, left : left + width] = resized
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(temporary, format="PNG")
    temporary.replace(path)
