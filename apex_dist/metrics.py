"""Training metrics: throughput, MFU, memory and loss terms -> rank-0 console and wandb.

- Console (rank 0, every `logging.every_steps`): step/total, loss, samples/s, ETA, plus the
  skipped-step count when any.
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
import os
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch

from apex_dist.config import Config

logger = logging.getLogger("apex_dist")

# Dense bf16 tensor-core peak per device in TFLOP/s (vendor data sheets, without sparsity).
PEAK_TFLOPS_BY_DEVICE = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
# Kilobytes per unit of ru_maxrss on Linux.
MAXRSS_UNIT_BYTES = 1024


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

    def __init__(self, config: Config, rank: int, world_size: int, device: torch.device):
        self.config = config
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
        self.skipped_total = 0
        self.run = None
        self.last_report: dict[str, float] = {}
        if self.is_main and config.logging.wandb != "disabled":
            self.run = self._start_wandb()

    def _start_wandb(self):
        import wandb

        from apex_dist.config import to_dict

        output_dir = Path(self.config.train.output_dir)
        return wandb.init(
            project=self.config.logging.project,
            name=self.config.logging.run_name or output_dir.name,
            dir=str(output_dir),
            mode=self.config.logging.wandb,
            config=to_dict(self.config),
            resume="allow",
            id=os.environ.get("WANDB_RUN_ID") or output_dir.name,
        )

    def start(self) -> None:
        """Start the timing window (call when the loop starts)."""
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_sums = {}

    def set_flops_per_step(self, flops: Optional[float]) -> None:
        if flops:
            self.flops_per_step = flops

    def record(self, step: int, metrics: dict[str, float]) -> Optional[dict[str, float]]:
        """Add one optimizer step; return (and print) the report when one is due."""
        self.window_steps += 1
        self.skipped_total += int(metrics.get("skipped", 0))
        for name, value in metrics.items():
            if math.isfinite(value):
                self.window_sums[name] = self.window_sums.get(name, 0.0) + value
        if step % self.config.logging.every_steps and step != self.config.train.steps:
            return None
        return self._report(step)

    def _report(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        report = {name: total / self.window_steps for name, total in self.window_sums.items()}
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
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_sums = {}
        self.last_report = report
        return report

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """Log PNG files (name -> path) to wandb (rank 0)."""
        if self.run is None:
            return
        import wandb

        self.run.log(
            {f"samples/{name}": wandb.Image(str(path)) for name, path in images.items()}, step=step
        )

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
