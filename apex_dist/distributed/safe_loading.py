"""Reading checkpoint files without running code, and DeepSpeed's own reads and writes routed here.

A `.pt` file is a pickle: `torch.load(weights_only=False)` calls whatever function a crafted
file names, so resuming from a checkpoint someone else could write would run their code. Every
file a resume reads goes through `safe_torch_load`: `torch.load(weights_only=True)`, which
rebuilds only tensors, containers and plain values, plus the exact allowlist below.

The allowlist (`deepspeed_safe_globals`) holds the classes DeepSpeed 0.19.8 pickles besides
those, found by listing the globals of every file of ZeRO-2 and ZeRO-3 saves, LoRA and full
fine-tuning, in fp32 and bf16 (`torch.serialization.get_unsafe_globals_in_checkpoint`):
`LossScaler` (the ZeRO optimizers' loss scaler, a static scale of 1 outside fp16),
`ZeroStageEnum` (the stage in the optimizer states) and `fragment_address` (ZeRO-2's
parameter slice table). fp16 with dynamic loss scaling (`loss_scale: 0` in the generated JSON)
stores a `DynamicLossScaler` instead of the `LossScaler`. Reconstructing these sets attributes
of a plain object; none of them runs code on load.

`unsafe_globals` lists the globals of a file outside the allowlist without unpickling it (it
reads only the small pickle record of the archive). Resuming runs it on every file a rank will
read before DeepSpeed's collective load starts, so that a refused file ends every rank at the
same point rather than one rank raising while the others wait for it.

DeepSpeed reads and writes its files through the `checkpoint_engine` attribute of its engine
(model states, ZeRO partitions, the state-dict loader). `install_guarded_engine` replaces that
one attribute of our engine by `GuardedCheckpointEngine` rather than patching `torch.load`
process-wide: every DeepSpeed read of this run becomes a safe load, nothing else in the process
changes, and the write side gets one place to catch an I/O error (a full disk) on one rank. A
write error is recorded instead of raised, so the rank still passes DeepSpeed's barriers with
the others, and the checkpoint manager then ends every rank together (checkpoint.py). DeepSpeed
copies its recovery scripts into the checkpoint outside the engine; that one method of our
engine instance is guarded the same way.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that is refused: not loadable safely, or not a torch archive."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint file whose pickle names functions or classes outside the allowlist."""


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed 0.19.8 pickles into its checkpoint files (module doc)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def unsafe_globals(path: str | Path) -> list[str]:
    """Names of the functions and classes in the file's pickle that a safe load refuses.

    Reads the pickle record only (no tensor data, nothing executed). Raises CheckpointLoadError
    when the file is not a torch zip archive.
    """
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except FileNotFoundError:
        raise
    except (ValueError, RuntimeError, KeyError, OSError) as error:
        raise CheckpointLoadError(
            f"{path} is not a readable torch archive ({error}); the file is truncated or was not "
            "written by torch.save: resume from another checkpoint"
        ) from error


def check_loadable(path: str | Path) -> None:
    """Raise UnsafeCheckpointError naming the file when loading it would need code to run."""
    found = unsafe_globals(path)
    if found:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle names {', '.join(found)}, which a safe load "
            "does not run (only tensors, containers, numbers and the few DeepSpeed classes "
            "listed in apex_dist/distributed/safe_loading.py are rebuilt); the file was not "
            "written by apex_dist and DeepSpeed 0.19.8, or it was altered: do not use this "
            "checkpoint"
        )


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` with the DeepSpeed allowlist; errors name the file."""
    check_loadable(path)
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: the safe loader rejected it ({error}); do not use this "
            "checkpoint"
        ) from error


@dataclass(frozen=True)
class WriteFailure:
    """The first write that failed on this rank during a save."""

    path: str
    error: OSError

    def describe(self) -> str:
        reason = self.error.strerror or str(self.error)
        return f"{self.path}: {reason} (errno {self.error.errno})"


def _torch_checkpoint_engine() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine


def _guarded_engine_class() -> type:
    base = _torch_checkpoint_engine()

    class GuardedCheckpointEngine(base):
        """DeepSpeed's torch checkpoint engine with safe loads and recorded write errors."""

        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.failure: Optional[WriteFailure] = None

        def record(self, path: str, error: OSError) -> None:
            if self.failure is None:
                self.failure = WriteFailure(str(path), error)

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

        def save(self, state_dict, path: str):
            if self.failure is not None:  # this save already failed here: write nothing more
                return None
            try:
                return super().save(state_dict, path)
            except OSError as error:
                self.record(path, error)
                Path(path).unlink(missing_ok=True)
                return None

        def makedirs(self, path, exist_ok=False):
            if self.failure is not None:
                return None
            try:
                return super().makedirs(path, exist_ok=exist_ok)
            except OSError as error:
                self.record(path, error)
                return None

    return GuardedCheckpointEngine


_GUARDED_CLASS: Optional[type] = None


def guarded_engine_class() -> type:
    """The GuardedCheckpointEngine class (built on first use: it subclasses DeepSpeed's)."""
    global _GUARDED_CLASS
    if _GUARDED_CLASS is None:
        _GUARDED_CLASS = _guarded_engine_class()
    return _GUARDED_CLASS


def install_guarded_engine(deepspeed_engine) -> Any:
    """Route every checkpoint read and write of `deepspeed_engine` through a
    GuardedCheckpointEngine (idempotent); return it."""
    guarded_class = guarded_engine_class()
    current = deepspeed_engine.checkpoint_engine
    if isinstance(current, guarded_class):
        return current
    if type(current) is not _torch_checkpoint_engine():
        raise RuntimeError(
            f"DeepSpeed uses the checkpoint engine {type(current).__name__}; apex_dist saves and "
            "loads through DeepSpeed's torch engine only: remove the 'checkpoint' writer or "
            "datastates settings from the DeepSpeed configuration"
        )
    guarded = guarded_class(getattr(deepspeed_engine, "_config", None))
    deepspeed_engine.checkpoint_engine = guarded
    copy_recovery_script = deepspeed_engine._copy_recovery_script

    def guarded_copy(save_path):
        if guarded.failure is not None:
            return None
        try:
            return copy_recovery_script(save_path)
        except OSError as error:
            guarded.record(save_path, error)
            return None

    deepspeed_engine._copy_recovery_script = guarded_copy
    return guarded
