"""Checkpoints that are complete or invisible, and resuming from them.

Layout (the converter reads it; docs/training.md):

    <output_dir>/checkpoints/
        latest                         the tag of the newest complete checkpoint
        step_00000100/                 one tag per save: step_<8-digit step>
            (DeepSpeed's files: mp_rank_00_model_states.pt, *_optim_states.pt, ...)
            config.yaml                the resolved config of the run that saved it
            rank_state_00000.pt        per rank: step, RNG states, data position, world size
            ema_rank_00000.pt          per rank, when an EMA is kept (format in shadow.py)
            frozen_rank_00000.pt       per rank, a frozen copy (full fine-tuning, frozen_base)

A save writes everything under `.incomplete_step_XXXXXXXX`; after a barrier (every rank done)
rank 0 renames it to `step_XXXXXXXX` and then replaces `latest` atomically. A run killed during
a save leaves only the `.incomplete_` directory, which resuming ignores and the next save
removes. Older complete checkpoints beyond `checkpoint.keep_last` are deleted after the rename.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy
import torch
import yaml

from apex_dist.config import Config, save_config, to_dict
from apex_dist.distributed.runtime import RankInfo, barrier, logger

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
INCOMPLETE_PREFIX = ".incomplete_"
LATEST_FILE = "latest"
CONFIG_FILE = "config.yaml"
RANK_STATE_FORMAT = "apex_dist.rank_state/1"
# Config sections whose change makes a checkpoint a different model: resuming across them is
# refused unless checkpoint.allow_config_changes. The condition shift is part of the model.
MODEL_DEFINING_PREFIXES = ("model.", "method.condition_shift.", "parallel.zero_stage")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(prefix: str, rank: int) -> str:
    return f"{prefix}_rank_{rank:05d}.pt"


def rank_state_file(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


def atomic_torch_save(value: Any, path: Path) -> None:
    """torch.save to a temporary name in the same directory, then rename."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(value, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator this rank draws from."""
    state = {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every setting that differs."""
    old, new = _flatten(saved), _flatten(current)
    return [
        (key, old.get(key, "<absent>"), new.get(key, "<absent>"))
        for key in sorted(set(old) | set(new))
        if old.get(key, "<absent>") != new.get(key, "<absent>")
    ]


class ResumeRefusedError(RuntimeError):
    """The checkpoint belongs to a different model or world size."""


class CheckpointManager:
    """Saves and finds checkpoints under `<output_dir>/checkpoints` (see the module doc)."""

    def __init__(self, config: Config, info: RankInfo):
        self.config = config
        self.info = info
        self.directory = Path(config.train.output_dir) / "checkpoints"

    # ---- finding ----------------------------------------------------------------------------

    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.directory.iterdir()
            if entry.is_dir() and TAG_PATTERN.match(entry.name)
        )

    def resolve_resume(self) -> Optional[Path]:
        """The checkpoint directory to resume from, or None to start fresh."""
        resume = self.config.checkpoint.resume
        if resume is None:
            return None
        if resume == "latest":
            latest = self.directory / LATEST_FILE
            if not latest.is_file():
                logger.info(
                    "checkpoint.resume=latest: no checkpoint in %s, starting fresh", self.directory
                )
                return None
            tag = latest.read_text().strip()
            path = self.directory / tag
            if not path.is_dir():
                raise FileNotFoundError(
                    f"{latest} names checkpoint {tag!r} but {path} does not exist; remove the "
                    "latest file or point checkpoint.resume at a complete step_XXXXXXXX directory"
                )
            return path
        path = Path(resume)
        if not path.is_dir() or not TAG_PATTERN.match(path.name):
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r} is not a checkpoint directory "
                "(<output_dir>/checkpoints/step_XXXXXXXX); use 'latest' or null"
            )
        return path

    # ---- saving -----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        deepspeed_engine,
        rank_state: dict[str, Any],
        shadows: dict[str, Any],
        exclude_frozen_parameters: bool,
    ) -> Path:
        """Collective: every rank must call it. Returns the complete checkpoint directory."""
        tag = tag_for_step(step)
        temporary_tag = INCOMPLETE_PREFIX + tag
        temporary = self.directory / temporary_tag
        if self.info.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(INCOMPLETE_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        deepspeed_engine.save_checkpoint(
            str(self.directory),
            tag=temporary_tag,
            save_latest=False,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
        temporary.mkdir(parents=True, exist_ok=True)
        state = {
            "format": RANK_STATE_FORMAT,
            "step": step,
            "world_size": self.info.world_size,
            "rank": self.info.rank,
            "rng": rng_state(self.info.device),
            **rank_state,
        }
        atomic_torch_save(state, temporary / rank_state_file(self.info.rank))
        for prefix, shadow in shadows.items():
            if shadow.zero_stage == 3 or self.info.is_main:
                atomic_torch_save(
                    shadow.state_dict(), temporary / rank_file(prefix, self.info.rank)
                )
        if self.info.is_main:
            save_config(self.config, temporary / CONFIG_FILE)
        barrier()  # every rank's files are on disk
        final = self.directory / tag
        if self.info.is_main:
            self._publish(temporary, final, tag)
        barrier()
        return final

    def _publish(self, temporary: Path, final: Path, tag: str) -> None:
        """Rename the finished save into place, point `latest` at it, prune old ones."""
        if final.exists():  # saved twice at one step (e.g. a signal at the last step)
            shutil.rmtree(final)
        os.replace(temporary, final)
        atomic_write_text(self.directory / LATEST_FILE, tag + "\n")
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.config.checkpoint.keep_last)]:
            shutil.rmtree(self.directory / old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)

    # ---- resuming ---------------------------------------------------------------------------

    def check_compatible(self, path: Path) -> list[tuple[str, Any, Any]]:
        """Compare the checkpoint's config and world size with this run's; raise
        ResumeRefusedError listing model-changing differences unless allowed. Returns every
        difference (the caller logs them)."""
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} is missing: {path} is not a complete checkpoint"
            )
        with open(config_path) as handle:
            saved = yaml.safe_load(handle) or {}
        differences = config_differences(saved, to_dict(self.config))
        state = torch.load(path / rank_state_file(0), map_location="cpu", weights_only=False)
        blocking = [
            f"{key}: {old!r} -> {new!r}"
            for key, old, new in differences
            if key.startswith(MODEL_DEFINING_PREFIXES)
        ]
        if state["world_size"] != self.info.world_size:
            blocking.append(f"world size: {state['world_size']} -> {self.info.world_size}")
        if blocking and not self.config.checkpoint.allow_config_changes:
            listed = "\n".join(f"  - {line}" for line in blocking)
            raise ResumeRefusedError(
                f"refusing to resume from {path}: it was saved with a different model or world "
                f"size:\n{listed}\nrestore those settings, start a new output_dir, or set "
                "checkpoint.allow_config_changes=true"
            )
        return differences

    def load_rank_state(self, path: Path) -> dict[str, Any]:
        file = path / rank_state_file(self.info.rank)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the checkpoint was saved by fewer ranks than this run has "
                f"({self.info.world_size})"
            )
        state = torch.load(file, map_location="cpu", weights_only=False)
        if state.get("format") != RANK_STATE_FORMAT:
            raise ValueError(f"{file}: unknown format {state.get('format')!r}")
        return state

    def load_shadow(self, path: Path, prefix: str, shadow) -> None:
        rank = self.info.rank if shadow.zero_stage == 3 else 0
        file = path / rank_file(prefix, rank)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the run keeps {prefix} weights but the checkpoint has none "
                "(was it saved with another method.reference.mode?)"
            )
        shadow.load_state_dict(torch.load(file, map_location="cpu", weights_only=True), str(file))
