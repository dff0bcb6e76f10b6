"""The student's GenEval-style score and CLIP score during training (logging.eval_every_steps).

At step 0 and every `logging.eval_every_steps` steps:

- the prompts are a fixed subset of the prompt set (`prompts.generate_prompt_set` with GenEval's
  seed; the first `logging.eval_prompt_count` taken round-robin over the six tasks), each with
  noise from its own seed (train.seed + EVALUATION_SEED_OFFSET + prompt index), so the images do
  not depend on the number of ranks;
- every rank generates its share (prompts rank, rank + world size, ...) with the student at
  EVALUATION_NFE, in micro-batches of train.micro_batch_size, decoded by the run's VAE (or pixel
  codec) at data.resolution;
- rank 0 gathers the images, scores them (`Evaluator`, models from `logging.eval_clip` and
  `logging.eval_detector`, kept on the CPU between evaluations), logs the scores to the console
  and wandb (`eval/geneval`, `eval/clip_score`, `eval/<task>`), and writes
  `<output_dir>/evaluation/step_XXXXXXXX/results.{json,md}`.

Collectives: every rank runs the same number of generation batches of the same size (a rank
with a shorter share repeats a prompt and drops the extra images), because under ZeRO-3 each
forward pass gathers the weights from every rank; then one gather of the images and one
broadcast of rank 0's outcome. A rank that is faster waits in the gather; a failure of the
scoring on rank 0 ends every rank at the same point instead of leaving them in the next
collective. The models are loaded on rank 0 when the trainer starts, and a missing or wrong
snapshot stops every rank there, before any training step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from apex_dist.evaluation.prompts import PromptSpec, generate_prompt_set, interleaved_subset

logger = logging.getLogger("apex_dist")

# Offset of the evaluation noise seeds from train.seed (apart from the validation grid's 10_007).
EVALUATION_SEED_OFFSET = 20_011
# The student's number of function evaluations in the periodic evaluation (the one-step
# student is what the run distils; method.md section 7).
EVALUATION_NFE = 1
# Images per forward pass of the scoring models on rank 0.
SCORING_BATCH = 8


def rank_share(count: int, rank: int, world_size: int) -> list[int]:
    """The prompt indices rank `rank` generates: rank, rank + world_size, ..."""
    return list(range(rank, count, world_size))


def share_size(count: int, world_size: int) -> int:
    """Images every rank generates (the largest share; shorter shares are padded to it)."""
    return math.ceil(count / world_size)


def generate_share(
    generate: Callable[[list[int]], Tensor],
    count: int,
    rank: int,
    world_size: int,
    batch_size: int,
) -> Tensor:
    """This rank's images (uint8, (share, 3, H, W)) from `generate(prompt indices)`.

    Every rank calls `generate` equally often with equally many indices (a short share repeats
    its last index, or index 0 when it is empty), so that ranks stay in step in the collectives
    of a sharded model's forward passes; the repeated images are dropped."""
    indices = rank_share(count, rank, world_size)
    padded = indices + [indices[-1] if indices else 0] * (
        share_size(count, world_size) - len(indices)
    )
    batches = [
        generate(padded[start : start + batch_size]) for start in range(0, len(padded), batch_size)
    ]
    return torch.cat(batches)[: len(indices)]


def gather_images(local: Tensor, count: int, device: torch.device) -> Optional[Tensor]:
    """All ranks' images on rank 0 in prompt order (uint8, (count, 3, H, W)); None elsewhere.
    One gather of equal-sized buffers (every rank enters it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    world_size, rank = dist.get_world_size(), dist.get_rank()
    size = share_size(count, world_size)
    buffer = torch.zeros((size, *local.shape[1:]), dtype=torch.uint8, device=device)
    buffer[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(buffer) for _ in range(world_size)] if rank == 0 else None
    dist.gather(buffer, parts, dst=0)
    if rank != 0:
        return None
    return torch.stack(
        [parts[index % world_size][index // world_size] for index in range(count)]
    ).cpu()


def to_pictures(images: Tensor) -> list:
    """uint8 (B, 3, H, W) -> PIL images."""
    from PIL import Image

    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images.cpu()]


class PeriodicEvaluation:
    """The evaluation hook of the trainer (module doc).

    Args:
        trainer: the Trainer (config, rank info, engine, preparer, metrics).
        scorer: the evaluator on rank 0 (default: loaded from the config's snapshots).
        generate: prompt indices -> uint8 images (default: the student at EVALUATION_NFE).
    """

    def __init__(self, trainer, scorer=None, generate: Optional[Callable] = None):
        self.trainer = trainer
        options = trainer.config.logging
        self.every = options.eval_every_steps
        self.specs: list[PromptSpec] = interleaved_subset(
            generate_prompt_set(), options.eval_prompt_count
        )
        self.generate = generate or self.student_images
        self.scorer = scorer
        problem = None
        if trainer.info.is_main and scorer is None:
            from apex_dist.evaluation.evaluator import Evaluator

            try:
                self.scorer = Evaluator.from_snapshots(
                    options.eval_clip, options.eval_detector, device="cpu"
                )
            except (OSError, ValueError) as error:
                problem = f"logging.eval_clip / logging.eval_detector: {error}"
        self._agree(problem, "the evaluation models could not be loaded on rank 0")

    @classmethod
    def for_trainer(cls, trainer) -> Optional[PeriodicEvaluation]:
        """The hook, or None when logging.eval_every_steps is 0."""
        return cls(trainer) if trainer.config.logging.eval_every_steps else None

    def _agree(self, problem: Optional[str], elsewhere: str) -> None:
        """Raise on every rank when `problem` is set on any (one small all-reduce)."""
        from apex_dist.distributed.runtime import ranks_where

        failed = ranks_where(problem is not None, self.trainer.info.device)
        if failed:
            raise RuntimeError(problem or f"{elsewhere} (see the log of rank {failed[0]})")

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    # ---- generation (every rank) -------------------------------------------------------------

    def student_images(self, indices: list[int]) -> Tensor:
        """The student's images of prompts `indices` at EVALUATION_NFE, uint8 (B, 3, H, W)."""
        from apex_dist.method import sample

        trainer = self.trainer
        prepare, engine = trainer.prepare, trainer.engine
        text, text_mask, _ = prepare.encode_prompts([self.specs[index].prompt for index in indices])
        height, width = prepare.bucket_sizes[0]
        latent_shape = prepare.geometry.latent_shape(height, width)
        image_shape = prepare.geometry.image_shape(height, width)
        seed = trainer.config.train.seed + EVALUATION_SEED_OFFSET
        noise = torch.stack(
            [
                torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + index))
                for index in indices
            ]
        ).to(trainer.info.device)
        with engine.evaluation():
            latents = sample(
                engine.inference_model(),
                noise,
                text,
                text_mask,
                nfe=EVALUATION_NFE,
                image_shape=image_shape,
            )
        images = prepare.decode(latents, image_shape).float().clamp(-1, 1)
        return ((images + 1) * 127.5).round().to(torch.uint8).cpu()

    # ---- one evaluation (collective) ---------------------------------------------------------

    def run(self, step: int) -> Optional[dict[str, Any]]:
        """Generate on every rank, score on rank 0; the summary on rank 0, None elsewhere."""
        info = self.trainer.info
        count = len(self.specs)
        start = time.perf_counter()
        local = generate_share(
            self.generate,
            count,
            info.rank,
            info.world_size,
            self.trainer.config.train.micro_batch_size,
        )
        images = gather_images(local, count, info.device)
        summary, problem = None, None
        if info.is_main:
            try:
                summary = self.score(images, step, time.perf_counter() - start)
            except Exception as error:  # reported on every rank by _agree, then raised
                logger.exception("evaluation at step %d failed", step)
                problem = f"evaluation at step {step} failed on rank 0: {error}"
        self._agree(problem, f"evaluation at step {step} failed on rank 0")
        return summary

    def score(self, images: Tensor, step: int, generation_seconds: float) -> dict[str, Any]:
        """Score the gathered images on rank 0; log and write the report."""
        from apex_dist.evaluation.evaluator import summarize, write_report

        start = time.perf_counter()
        pictures = to_pictures(images)
        device = self.trainer.info.device
        self.scorer.to(device)
        try:
            results = []
            for first in range(0, len(pictures), SCORING_BATCH):
                specs = self.specs[first : first + SCORING_BATCH]
                results += self.scorer.evaluate(
                    pictures[first : first + SCORING_BATCH],
                    [spec.prompt for spec in specs],
                    specs,
                    files=[f"prompt_{index}" for index in range(first, first + len(specs))],
                )
        finally:
            self.scorer.to("cpu")
        summary = summarize(results)
        scoring_seconds = time.perf_counter() - start
        output = Path(self.trainer.config.train.output_dir) / "evaluation" / f"step_{step:08d}"
        write_report(
            output,
            summary,
            results,
            {
                "step": step,
                "nfe": EVALUATION_NFE,
                "generation_seconds": generation_seconds,
                "scoring_seconds": scoring_seconds,
            },
        )
        values = {"eval/clip_score": summary["clip_score"]}
        if summary["geneval"] is not None:
            values["eval/geneval"] = summary["geneval"]
        for tag, entry in summary["tasks"].items():
            if entry["score"] is not None:
                values[f"eval/{tag}"] = entry["score"]
        self.trainer.metrics.log_values(step, values)
        tasks = " ".join(
            f"{tag} {entry['score']:.2f}"
            for tag, entry in summary["tasks"].items()
            if entry["score"] is not None
        )
        geneval = "-" if summary["geneval"] is None else f"{summary['geneval']:.3f}"
        logger.info(
            "evaluation step %d: GenEval %s (%s) CLIP score %.2f; %d prompts at %d NFE, "
            "generated in %.1f s, scored in %.1f s -> %s",
            step,
            geneval,
            tasks or "no detector",
            summary["clip_score"],
            len(results),
            EVALUATION_NFE,
            generation_seconds,
            scoring_seconds,
            output,
        )
        return summary
