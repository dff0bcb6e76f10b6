"""Training metrics: throughput, MFU, memory and loss terms -> rank-0 console and wandb.

- Console (rank 0, every `logging.every_steps`): step/total, loss, samples/s, ETA, plus the
  skipped-step count when any.
- Every report covers all ranks: at each report every rank enters one all-reduce of its
  window's sums and counts (one stacked tensor), so a loss term is the mean over ranks and
  steps of the finite values, and the row counters (`SUMMED_OVER_RANKS`) are totals over ranks
  per step. Grad norm, learning rate and skipped steps are the same on every rank already.
- wandb (`logging.wandb`: online, offline or disabled; rank 0 only): every loss term the
  objective reports, grad norm, learning rate, samples/s, MFU, peak memory, validation grids.
- MFU = FLOPs of one optimizer step per rank / step time / peak FLOP/s of one device. The
  FLOPs are counted by torch's FLOP counter over one real step (objective with all its no-grad
  passes, backward, recomputation included), so they follow whatever the objective does.
- Peak memory: the accelerator's peak allocation since the last report (CPU: the process's
  peak resident set).
"""

from __future__ import annotations

import logging
import math
import resource
import secrets
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from apex_dist.atomic import atomic_write_text
from apex_dist.config import Config

logger = logging.getLogger("apex_dist")

# Dense bf16 tensor-core peak per device in TFLOP/s (vendor data sheets, without sparsity).
PEAK_TFLOPS_BY_DEVICE = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
# Kilobytes per unit of ru_maxrss on Linux.
MAXRSS_UNIT_BYTES = 1024
# The run directory's file that holds the run's unique id (wandb's run id).
RUN_ID_FILE = "run_id"
# Hex digits of randomness in a run id (after the directory name): 2^32 ids per name.
RUN_ID_RANDOM_HEX = 8
# Step metrics that count rows on each rank: reported as totals over ranks (per step), not means.
SUMMED_OVER_RANKS = ("truncated_prompts", "text_dropped")
# Library warnings that DeepSpeed triggers on every step (it calls collectives torch has
# deprecated); they would outnumber the progress lines.
REPEATED_LIBRARY_WARNINGS = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)


def quiet_library_output() -> None:
    """Silence per-step library warnings and the transformers loading bars in training logs."""
    for pattern in REPEATED_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def resolve_run_id(output_dir: Path, resume: bool) -> str:
    """The run's unique id: created at the first start and stored in `<output_dir>/run_id`,
    read back when the run resumes (checkpoint.resume set), so wandb continues the same run.
    A fresh start (checkpoint.resume null) gets a new id. Every rank computes it the same way
    after rank 0 wrote the file (call after a barrier); only rank 0 writes."""
    import torch.distributed as dist

    path = Path(output_dir) / RUN_ID_FILE
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main and (not resume or not path.is_file()):
        name = Path(output_dir).resolve().name or "run"
        run_id = f"{name}-{secrets.token_hex(RUN_ID_RANDOM_HEX // 2)}"
        atomic_write_text(path, run_id + "\n")
    if dist.is_initialized():
        dist.barrier()
    return path.read_text().strip()


def peak_flops_per_second(config: Config, device: torch.device) -> Optional[float]:
    """logging.peak_tflops, or the device's data-sheet peak; None when unknown (CPU)."""
    if config.logging.peak_tflops > 0:
        return config.logging.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS_BY_DEVICE.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * MAXRSS_UNIT_BYTES)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class MetricsLogger:
    """Accumulates step metrics and reports them every `logging.every_steps` (rank 0)."""

    def __init__(
        self,
        config: Config,
        rank: int,
        world_size: int,
        device: torch.device,
        run_id: Optional[str] = None,
    ):
        self.config = config
        self.run_id = run_id
        self.is_main = rank == 0
        self.world_size = world_size
        self.device = device
        self.samples_per_step = (
            config.train.micro_batch_size * config.train.gradient_accumulation_steps * world_size
        )
        self.peak_flops = peak_flops_per_second(config, device)
        self.flops_per_step: Optional[float] = None
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_sums: dict[str, float] = {}
        self.window_counts: dict[str, int] = {}  # finite values per metric
        self.skipped_total = 0
        self.run = None
        if self.is_main and config.logging.wandb != "disabled":
            self.run = self._start_wandb()

    def _start_wandb(self):
        import wandb

        from apex_dist.config import to_dict

        output_dir = Path(self.config.train.output_dir)
        return wandb.init(
            project=self.config.logging.project,
            name=self.config.logging.run_name or output_dir.resolve().name,
            dir=str(output_dir),
            mode=self.config.logging.wandb,
            config=to_dict(self.config),
            resume="allow",
            id=self.run_id,
        )

    def start(self) -> None:
        """Start the timing window (call when the loop starts)."""
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_sums = {}
        self.window_counts = {}

    def set_flops_per_step(self, flops: Optional[float]) -> None:
        if flops:
            self.flops_per_step = flops

    def record(self, step: int, metrics: dict[str, float]) -> Optional[dict[str, float]]:
        """Add one optimizer step; return (and print) the report when one is due.

        Collective when a report is due: every rank must call it at every step (the trainer
        does), with the same metric names."""
        self.window_steps += 1
        self.skipped_total += int(metrics.get("skipped", 0))
        for name, value in metrics.items():
            finite = math.isfinite(value)
            self.window_sums[name] = self.window_sums.get(name, 0.0) + (value if finite else 0.0)
            self.window_counts[name] = self.window_counts.get(name, 0) + int(finite)
        if step % self.config.logging.every_steps and step != self.config.train.steps:
            return None
        return self._report(step)

    def window_means_over_ranks(self) -> dict[str, float]:
        """Each metric of the window over all ranks: the mean of its finite values (nan when
        none), or for SUMMED_OVER_RANKS the total over ranks per step. One all-reduce that
        every rank enters."""
        import torch.distributed as dist

        names = sorted(self.window_sums)
        totals = torch.tensor(
            [
                [self.window_sums[name] for name in names],
                [self.window_counts[name] for name in names],
            ],
            dtype=torch.float64,
            device=self.device,
        )
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        sums, counts = totals.tolist()
        means = {}
        for name, total, count in zip(names, sums, counts, strict=True):
            if name in SUMMED_OVER_RANKS:
                means[name] = total / self.window_steps
            else:
                means[name] = total / count if count else float("nan")
        return means

    def _report(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        report = self.window_means_over_ranks()
        seconds_per_step = elapsed / self.window_steps
        report["samples_per_second"] = self.samples_per_step / seconds_per_step
        report["seconds_per_step"] = seconds_per_step
        report["peak_memory_gb"] = peak_memory_bytes(self.device) / 1e9
        report["skipped_total"] = float(self.skipped_total)
        if self.flops_per_step:
            report["tflops_per_device"] = self.flops_per_step / seconds_per_step / 1e12
            if self.peak_flops:
                report["mfu"] = self.flops_per_step / seconds_per_step / self.peak_flops
        remaining = (self.config.train.steps - step) * seconds_per_step
        if self.is_main:
            extra = f" skipped {self.skipped_total}" if self.skipped_total else ""
            if report.get("truncated_prompts"):
                extra += f" truncated prompts/step {report['truncated_prompts']:.2g}"
            mfu = f" mfu {report['mfu']:.1%}" if "mfu" in report else ""
            logger.info(
                "step %d/%d loss %.4g samples/s %.1f%s eta %s%s",
                step,
                self.config.train.steps,
                report.get("loss", float("nan")),
                report["samples_per_second"],
                mfu,
                format_duration(remaining),
                extra,
            )
            if self.run is not None:
                self.run.log({f"train/{name}": value for name, value in report.items()}, step=step)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start()
        return report

    def log_images(
        self,
        step: int,
        rows: dict[str, list[torch.Tensor]],
        captions: list[str],
        grid: Optional[Path] = None,
    ) -> None:
        """Log validation images to wandb (rank 0): per sampler row (name -> images (3, H, W)
        in [0, 1]) one image per prompt with the prompt as its caption, and the grid's PNG."""
        if self.run is None:
            return
        import wandb

        logged: dict[str, Any] = {
            f"samples/{name}": [
                wandb.Image(
                    (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"), caption=caption
                )
                for image, caption in zip(images, captions, strict=True)
            ]
            for name, images in rows.items()
        }
        if grid is not None:
            logged["samples/grid"] = wandb.Image(str(grid), caption=" | ".join(captions))
        self.run.log(logged, step=step)

    def log_values(self, step: int, values: dict[str, float]) -> None:
        """Log named scalars (evaluation scores) to wandb at `step` (rank 0; finite values)."""
        if self.run is not None:
            self.run.log(
                {name: value for name, value in values.items() if math.isfinite(value)}, step=step
            )

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
