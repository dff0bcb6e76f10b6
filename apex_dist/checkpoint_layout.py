"""The on-disk layout of a run's checkpoints, in one place, without torch.

The training engine (`apex_dist.distributed.checkpoint`) writes it and the converter
(`apex_dist.export.deepspeed_checkpoint`) reads it; both take every name from here.

    <output_dir>/
        run.lock                        the run using the directory (distributed/run_lock.py)
        checkpoints/                    CHECKPOINTS_SUBDIRECTORY
            latest                      LATEST_FILE: the tag of the newest published save
            step_00000100/              a tag: TAG_PATTERN, `tag_for_step`
                mp_rank_00_model_states.pt                  DeepSpeed (ZeRO-1/2, rank 0)
                zero_pp_rank_<r>_mp_rank_00_model_states.pt DeepSpeed (ZeRO-3, every rank)
                [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  DeepSpeed optimizer
                config.yaml             CONFIG_FILE: the resolved config of the saving run
                rank_state_<r:05d>.json `rank_state_file`: step, RNG, data position (JSON)
                ema_rank_<r:05d>.pt     `shadow_file("ema", r)`: EMA partition (SHADOW_FORMAT)
                frozen_rank_<r:05d>.pt  `shadow_file("frozen", r)`: frozen copy, same format
            .incomplete_step_XXXXXXXX/  a save in progress (INCOMPLETE_PREFIX), never read
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

CHECKPOINTS_SUBDIRECTORY = "checkpoints"
LATEST_FILE = "latest"
CONFIG_FILE = "config.yaml"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
# Names of directories on their way in or out (never a published checkpoint).
INCOMPLETE_PREFIX = ".incomplete_"
REPLACED_PREFIX = ".replaced_"
REMOVING_PREFIX = ".removing_checkpoints_"

# DeepSpeed's file names (deepspeed/runtime/engine.py).
ZERO2_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
OPTIMIZER_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")

# apex_dist's per-rank files.
RANK_STATE_FORMAT = "apex_dist.rank_state/2"
SHADOW_FORMAT = "apex_dist.ema/1"
SHADOW_PREFIXES = ("ema", "frozen")
SHADOW_FILE = re.compile(r"^(ema|frozen)_rank_(\d+)\.pt$")
EMA_FILE = re.compile(r"^ema_rank_(\d+)\.pt$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int:
    match = TAG_PATTERN.match(tag)
    if match is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_XXXXXXXX)")
    return int(match.group(1))


def rank_state_file(rank: int) -> str:
    return f"rank_state_{rank:05d}.json"


def legacy_rank_state_file(rank: int) -> str:
    """The pickled rank state of earlier versions, never loaded (it could run code)."""
    return f"rank_state_{rank:05d}.pt"


def shadow_file(prefix: str, rank: int) -> str:
    """The shadow-weights file of `prefix` ("ema" or "frozen") for `rank`."""
    return f"{prefix}_rank_{rank:05d}.pt"


def rank_model_states_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def published_tags(directory: Path) -> list[str]:
    """Published checkpoints of a checkpoints directory, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_dir() and TAG_PATTERN.match(entry.name)
    )


class LatestFileError(ValueError):
    """`latest` names something that is not a checkpoint of its directory."""


def read_latest(directory: Path) -> Optional[str]:
    """The tag `<directory>/latest` names, or None when there is no `latest` file.

    The tag must be a step_XXXXXXXX directory directly inside `directory` (after resolving
    links): a `latest` holding an absolute path, `../` or anything else is refused, so nothing
    outside a run's checkpoints is ever read through it.
    """
    latest = directory / LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_text(errors="replace").strip()
    path = directory / text
    inside = (
        TAG_PATTERN.match(text) is not None
        and path.is_dir()
        and path.resolve().parent == directory.resolve()
    )
    if not inside:
        raise LatestFileError(
            f"{latest} names {text[:200]!r}, which is not a checkpoint of this run (a "
            f"step_XXXXXXXX directory in {directory}): it was edited, damaged or written by "
            "something else. Delete it to use the newest checkpoint "
            f"({', '.join(published_tags(directory)[-3:]) or 'none'}), or name a tag explicitly"
        )
    return text
