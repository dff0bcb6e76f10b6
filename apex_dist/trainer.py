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

from apex_dist.config import Config, save_config
from apex_dist.data.prepare import BatchPreparer
from apex_dist.distributed.checkpoint import CheckpointManager
from apex_dist.distributed.engine import TrainingEngine
from apex_dist.distributed.launcher_watch import LauncherWatch
from apex_dist.distributed.runtime import (
    PreemptionFlag,
    RankInfo,
    any_rank,
    barrier,
    init_distributed,
    logger,
)
from apex_dist.distributed.watchdog import Watchdog
from apex_dist.evaluation.training import PeriodicEvaluation
from apex_dist.metrics import MetricsLogger, quiet_library_output, resolve_run_id
from apex_dist.validation import ValidationGrid

# Rank offset of per-rank seeds (seed + RANK_SEED_STRIDE * rank keeps ranks' streams apart).
RANK_SEED_STRIDE = 1

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


class Trainer:
    """Builds everything of one run and trains it (module doc).

    Args:
        config: the run's validated config.
        info: this process's rank (None: create the process group).
        stream_factory: `(config, rank, world_size, micro_batch_size, seed) -> stream`.
        initial_state: weights to start from instead of the built ones (a state dict of a
            model built from the same model settings; `TrainingEngine`, `load_initial_state`).
    """

    def __init__(
        self,
        config: Config,
        info: Optional[RankInfo] = None,
        stream_factory: StreamFactory = default_stream_factory,
        initial_state: Optional[dict[str, torch.Tensor]] = None,
    ):
        self.config = config
        quiet_library_output()
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
        self.engine = TrainingEngine(config, self.info, initial_state)
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
        self.checkpoints.track("data", self.stream)  # saved and restored with every checkpoint
        self.prepare = BatchPreparer(config, self.info.device, self.rank_seed)
        self.run_id = resolve_run_id(self.output_dir, resume=config.checkpoint.resume is not None)
        self.metrics = MetricsLogger(
            config, self.info.rank, self.info.world_size, self.info.device, run_id=self.run_id
        )
        self.validation = ValidationGrid(self, fresh=resume_from is None)
        self.evaluation = PeriodicEvaluation.for_trainer(self)  # logging.eval_every_steps
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Optional[Path] = None
        self._batches: Optional[Iterator[dict]] = None
        if resume_from is not None:
            self._resume(resume_from)

    # ---- state ------------------------------------------------------------------------------

    def _resume(self, path: Path) -> None:
        differences = self.checkpoints.check_compatible(path)
        for key, old, new in differences:
            logger.info("resuming with a changed setting %s: %r -> %r", key, old, new)
        state = self.engine.load(self.checkpoints, path)  # model, optimizer, scheduler, shadows
        self.checkpoints.restore_components(state, path)  # data position, RNG
        self.step = int(state["step"])
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        self.last_checkpoint = self.engine.save(self.checkpoints, self.step)
        return self.last_checkpoint

    def next_batches(self) -> list[dict]:
        if self._batches is None:
            self._batches = iter(self.stream)
        return [next(self._batches) for _ in range(self.config.train.gradient_accumulation_steps)]

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> TrainSummary:
        config = self.config
        preemption = PreemptionFlag().install() if config.checkpoint.save_on_signal else None
        watch = LauncherWatch.for_this_process(preemption) if preemption is not None else None
        stopped_by = "steps"
        saved_at = self.step if self.last_checkpoint is not None else -1  # resumed: saved
        watchdog = Watchdog.start(self.output_dir, self.info, config.train.watchdog_seconds)
        try:
            if config.logging.sample_every_steps and self.step == 0:
                self.validation.write(self.step)
            if self.evaluation is not None and self.step == 0:
                self.evaluation.run(self.step)
            self.metrics.start()
            while self.step < config.train.steps:
                raw = self.next_batches()
                batches = [
                    self.prepare(batch, step=self.step, micro_batch=index)
                    for index, batch in enumerate(raw)
                ]
                result = self.engine.train_step(
                    batches, count_flops=self.metrics.flops_per_step is None
                )
                self.step += 1
                watchdog.progress(self.step)
                self.metrics.set_flops_per_step(result.flops)
                result.metrics["truncated_prompts"] = float(
                    sum(batch.truncated_prompts for batch in batches)
                )
                result.metrics["text_dropped"] = float(sum(batch.text_dropped for batch in batches))
                keys = [key for batch in batches for key in batch.keys]
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
                    self.validation.write(self.step)
                if self.evaluation is not None and self.evaluation.due(self.step):
                    self.evaluation.run(self.step)
                if config.checkpoint.every_steps and self.step % config.checkpoint.every_steps == 0:
                    self.save()
                    saved_at = self.step
                signalled = preemption is not None and preemption.received is not None
                if preemption is not None and any_rank(signalled, self.info.device):
                    if not signalled:
                        stopped_by = "signal (other rank)"
                    elif preemption.reason is not None:
                        stopped_by = preemption.reason
                    else:
                        stopped_by = f"signal {preemption.name}"
                    logger.warning(
                        "%s received: saving at step %d and stopping", stopped_by, self.step
                    )
                    break
            if saved_at != self.step:
                self.save()
        finally:
            if watch is not None:
                watch.stop()
            watchdog.stop()
            if preemption is not None:
                preemption.uninstall()
        return TrainSummary(self.step, stopped_by, self.last_checkpoint, self.history)

    def close(self) -> None:
        """Finish wandb and free gathered parameters (the process group stays for the caller)."""
        self.metrics.close()
        self.engine.close()
        self.checkpoints.close()
