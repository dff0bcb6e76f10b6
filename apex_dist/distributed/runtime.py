"""Process-group setup, rank-aware logging, collectives on flags, and preemption signals.

Works under `deepspeed launcher/run.py` (which passes --local_rank and sets RANK, WORLD_SIZE,
MASTER_ADDR), `torchrun` (the same environment variables) and plain `python` (one process: a
single-rank group on a free local port is created).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("apex_dist")

# Signals that clusters send before preempting or at the end of a time limit (SLURM's
# `--signal=USR1@120` sends SIGUSR1; a cancel or preemption sends SIGTERM), and Ctrl-C in the
# launcher's terminal (SIGINT reaches every process of the foreground group).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: global rank, world size, rank within its node, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_logging(rank: int) -> None:
    """INFO logs from rank 0; warnings and errors from every rank, prefixed with the rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def init_distributed() -> RankInfo:
    """Create the process group (gloo on CPU, nccl on CUDA) through DeepSpeed; idempotent."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python launcher/run.py`: a group of one
        os.environ.update(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # ranks sharing a CPU must not oversubscribe its cores: with more threads than
            # cores, small matmuls run hundreds of times slower (busy-waiting threads)
            ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    info = RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    setup_logging(info.rank)
    return info


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (one tiny all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def ranks_where(flag: bool, device: torch.device) -> list[int]:
    """The ranks on which `flag` is True, the same list on every rank (one small all-reduce).

    Used where one rank's failure (a refused file, a full disk) must end every rank at the same
    point instead of leaving the others waiting in the next collective.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), device=device)
    flags[dist.get_rank()] = 1.0 if flag else 0.0
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return [rank for rank, value in enumerate(flags.tolist()) if value > 0]


def broadcast_integer(value: int, device: torch.device, source: int = 0) -> int:
    """`value` of rank `source` on every rank (a decision one rank takes for all)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=source)
    return int(tensor.item())


class PreemptionFlag:
    """Records SIGTERM / SIGUSR1 instead of dying, so the loop can save and stop cleanly.

    The flag is local to the process; the trainer combines it across ranks with `any_rank`
    each step, so every rank stops after the same step even when the signal reached only some.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.reason: str | None = None  # set when the stop is not a signal (launcher exited)
        self._previous: dict[int, object] = {}

    def _handle(self, signal_number: int, frame) -> None:
        del frame
        self.received = signal_number

    def raise_flag(self, reason: str) -> None:
        """Stop as for SIGTERM, for `reason` (called from another thread)."""
        self.reason = reason
        self.received = signal.SIGTERM

    def install(self) -> PreemptionFlag:
        for signal_number in PREEMPTION_SIGNALS:
            self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def uninstall(self) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        if self.reason is not None:
            return self.reason
        return signal.Signals(self.received).name if self.received else "none"
