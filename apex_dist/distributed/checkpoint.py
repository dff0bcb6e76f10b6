"""Checkpoints that are complete, finite and loadable without running code; one run per directory.

Layout (the converter reads it; docs/training.md):

    <output_dir>/run.lock              the run using the directory (run_lock.py)
    <output_dir>/checkpoints/
        latest                         the tag of the newest published checkpoint
        step_00000100/                 one tag per save: step_<8-digit step>
            (DeepSpeed's files: mp_rank_00_model_states.pt, *_optim_states.pt, ...)
            config.yaml                the resolved config of the run that saved it
            rank_state_00000.json      per rank: step, RNG states, data position, world size
            ema_rank_00000.pt          per rank, when an EMA is kept (format in shadow.py)
            frozen_rank_00000.pt       per rank, a frozen copy (full fine-tuning, frozen_base)

Starting a run (`prepare_run`, collective, before anything is written to output_dir):
1. rank 0 takes the run lock: a second run on the directory is refused (run_lock.py);
2. rank 0 removes this directory's leftovers, which only a run of this directory writes and the
   lock shows are no one's now: `.incomplete_*` saves of a run killed or failed while saving
   (they would otherwise fill the disk again), and a checkpoint that was being replaced
   (`.replaced_*`, put back if its replacement never arrived);
3. checkpoints of an earlier run are continued or explicitly discarded, never silently mixed
   with new ones: with `checkpoint.resume` null (or a checkpoint outside this directory) a
   directory holding checkpoints is refused, unless `checkpoint.overwrite` is true, which
   deletes them at start; `resume: latest` and a tag of this directory continue them;
4. rank 0 chooses the checkpoint: `latest` must name a `step_XXXXXXXX` directory of this
   checkpoints directory (anything else, such as an absolute path or `../`, is refused); without
   `latest`, the newest tag. Its step is broadcast, so that every rank loads the same checkpoint
   even when a shared filesystem shows the ranks different `latest` files for a moment;
5. the checkpoint's world size must be this run's (ZeRO partitions, EMA partitions and data
   positions are per rank; the refusal says how to continue on another world size), and its
   model settings must match unless `checkpoint.allow_config_changes`.
A refusal on one rank is a refusal on every rank (`ranks_where`), so no rank waits for ever.

Saving (`save`, collective):
1. every rank checks its part of the trainable weights (its ZeRO-3 partition; under ZeRO-2,
   where the weights are whole on every rank, every world_size-th parameter) and of its shadow
   weights; one all-reduce; anything non-finite is never written: NonFiniteWeightsError on
   every rank, naming the step, ranks and tensors, with `latest` left on the last good save;
2. everything is written under `.incomplete_step_XXXXXXXX`. DeepSpeed writes through the
   guarded engine (safe_loading.py), which records an I/O error such as a full disk instead of
   raising it between DeepSpeed's barriers; then every rank reports (one all-reduce) and if any
   write failed every rank raises CheckpointWriteError naming the path, rank 0 removes the
   incomplete save, and `latest` and the earlier checkpoints are untouched;
3. rank 0 publishes: renames the save to `step_XXXXXXXX` (an existing tag of that step is
   renamed aside first and deleted after), replaces `latest` atomically, and prunes: the
   published tag and the `keep_last - 1` newest tags before it are kept; tags after it (a
   continuation abandoned when this run resumed from an earlier checkpoint) are left alone.
So `latest` only ever names a complete checkpoint whose weights were finite.

Resuming (`check_loadable`, `load_local_state`, collective): every rank first checks the
files it will read for pickled code (safe_loading.py) and the ranks agree before DeepSpeed's
load begins; the rank state is JSON (tensors as base64), the shadows and DeepSpeed's files are
read with `weights_only=True` and an exact allowlist.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy
import torch
import yaml
from torch import Tensor, nn

from apex_dist.atomic import atomic_path, atomic_write_text
from apex_dist.checkpoint_layout import (
    CHECKPOINTS_SUBDIRECTORY,
    CONFIG_FILE,
    INCOMPLETE_PREFIX,
    LATEST_FILE,
    RANK_STATE_FORMAT,
    REMOVING_PREFIX,
    REPLACED_PREFIX,
    TAG_PATTERN,
    ZERO2_MODEL_STATES,
    LatestFileError,
    legacy_rank_state_file,
    published_tags,
    rank_state_file,
    read_latest,
    shadow_file,
    step_of_tag,
    tag_for_step,
)
from apex_dist.config import QWEN_IMAGE_PRESET_NAMES, Config, save_config, to_dict
from apex_dist.distributed.run_lock import RunLock
from apex_dist.distributed.runtime import RankInfo, broadcast_integer, logger, ranks_where
from apex_dist.distributed.safe_loading import (
    CheckpointLoadError,
    check_loadable,
    install_guarded_engine,
    safe_torch_load,
)
from apex_dist.distributed.watchdog import mark_progress

# Config sections whose change makes a checkpoint a different model: resuming across them is
# refused unless checkpoint.allow_config_changes. The condition shift is part of the model.
MODEL_DEFINING_PREFIXES = ("model.", "method.condition_shift.", "parallel.zero_stage")
# Broadcast codes of rank 0's choice of checkpoint (a step >= 0 names a tag of this directory).
START_FRESH = -1
RESUME_EXPLICIT_PATH = -2


def atomic_torch_save(value: Any, path: Path) -> None:
    """torch.save, published atomically (apex_dist.atomic)."""
    with atomic_path(path) as temporary:
        torch.save(value, temporary)


# --------------------------------------------------------------------------------------------
# the rank state as JSON


def _tensor_to_text(tensor: Tensor) -> str:
    return base64.b64encode(tensor.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _text_to_byte_tensor(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator this rank draws from, as JSON-ready values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": [int(key) for key in keys],
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": _tensor_to_text(torch.get_rng_state()),
    }
    if device.type == "cuda":
        state["cuda"] = _tensor_to_text(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    generator = state["numpy"]
    numpy.random.set_state(
        (
            generator["kind"],
            numpy.asarray(generator["keys"], dtype=numpy.uint32),
            generator["position"],
            generator["has_gauss"],
            generator["cached_gaussian"],
        )
    )
    torch.set_rng_state(_text_to_byte_tensor(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_text_to_byte_tensor(state["cuda"]), device)


def encode_rank_state(state: dict[str, Any]) -> str:
    """The rank state as JSON text; refuses values that would not come back unchanged."""
    text = json.dumps(state, allow_nan=False)
    if json.loads(text) != state:
        changed = [key for key in state if json.loads(json.dumps(state[key])) != state[key]]
        raise TypeError(
            f"the rank state entries {changed} do not survive JSON unchanged (tuples, non-string "
            "keys, numpy values?); a component's state_dict() must return JSON values"
        )
    return text


def decode_rank_state(path: Path) -> dict[str, Any]:
    """Read and check a rank state file; errors name the file and the key."""
    try:
        state = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointLoadError(
            f"{path} is not valid JSON ({error}): a damaged checkpoint"
        ) from error
    if not isinstance(state, dict) or state.get("format") != RANK_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointLoadError(
            f"{path}: format {found!r} is not {RANK_STATE_FORMAT!r}; not a rank state of this "
            "version of apex_dist"
        )
    expected = {"step": int, "world_size": int, "rank": int, "rng": dict}
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointLoadError(
                f"{path}: {key!r} is missing or not a {kind.__name__}: a damaged checkpoint"
            )
    for key in ("python", "numpy", "torch"):
        if key not in state["rng"]:
            raise CheckpointLoadError(f"{path}: rng.{key} is missing: a damaged checkpoint")
    return state


class Stateful(Protocol):
    """What a checkpoint component offers: its state as JSON values, and a way back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RandomState:
    """The random generators of this process as a checkpoint component."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.device)


# Keys of a rank state that are the manager's own, not a component's.
RESERVED_STATE_KEYS = ("format", "step", "world_size", "rank")


# --------------------------------------------------------------------------------------------
# finiteness


def nonfinite_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors holding a nan or inf (one host sync for all of them)."""
    names, flags = [], []
    for name, tensor in named:
        names.append(name)
        flags.append(torch.isfinite(tensor).all())
    if not flags:
        return []
    finite = torch.stack(flags).tolist()
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


def local_weights(
    parameters: dict[str, nn.Parameter], rank: int, world_size: int
) -> Iterable[tuple[str, Tensor]]:
    """This rank's share of the trainable weights: its ZeRO-3 partition of each parameter, or,
    for whole parameters (ZeRO-2), every world_size-th one."""
    for index, (name, parameter) in enumerate(parameters.items()):
        if hasattr(parameter, "ds_tensor"):
            yield name, parameter.ds_tensor
        elif index % world_size == rank:
            yield name, parameter.data


# --------------------------------------------------------------------------------------------
# configs


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


# --------------------------------------------------------------------------------------------
# errors


class ResumeRefusedError(RuntimeError):
    """The checkpoint belongs to a different model or world size, or cannot be trusted."""


class ExistingCheckpointsError(RuntimeError):
    """A fresh start in an output_dir that holds checkpoints of an earlier run."""


class NonFiniteWeightsError(FloatingPointError):
    """The weights to be saved hold nan or inf: the save was refused."""


class CheckpointWriteError(OSError):
    """A rank could not write its part of a save (full disk, I/O error)."""


class OtherRankError(RuntimeError):
    """Another rank failed at the same point; its own error is in its log."""


def agree(error: Optional[BaseException], device: torch.device, what: str) -> None:
    """Collective: raise on every rank when `error` is set on any. The failing rank raises its
    own error; the others an OtherRankError (or the same type when it takes one message)."""
    failed = ranks_where(error is not None, device)
    if not failed:
        return
    if error is not None:
        raise error
    listed = ", ".join(str(rank) for rank in failed)
    raise OtherRankError(f"rank(s) {listed} failed {what}; their error is in their log")


# --------------------------------------------------------------------------------------------
# the manager


class CheckpointManager:
    """Saves and finds checkpoints under `<output_dir>/checkpoints` (see the module doc)."""

    def __init__(self, config: Config, info: RankInfo):
        self.config = config
        self.info = info
        self.output_dir = Path(config.train.output_dir)
        self.directory = self.output_dir / CHECKPOINTS_SUBDIRECTORY
        self.lock: Optional[RunLock] = None
        # stateful components saved in every rank state (JSON) and restored on resume, by name;
        # the model, optimizer, scheduler and shadows are the engine's (DeepSpeed's files)
        self.components: dict[str, Stateful] = {"rng": RandomState(info.device)}

    def track(self, name: str, component: Stateful) -> None:
        """Save `component.state_dict()` under `name` with every checkpoint and restore it
        with `load_state_dict` on resume. Its state must be JSON values."""
        if name in self.components or name in RESERVED_STATE_KEYS:
            raise ValueError(f"checkpoint component name {name!r} is taken")
        self.components[name] = component

    def restore_components(self, state: dict[str, Any], path: Path) -> None:
        """Give every tracked component its part of a loaded rank state."""
        missing = [name for name in self.components if name not in state]
        if missing:
            raise CheckpointLoadError(
                f"the rank state of {path} has no {', '.join(missing)}: it was saved by a run "
                "that did not keep them"
            )
        for name, component in self.components.items():
            component.load_state_dict(state[name])

    # ---- finding ----------------------------------------------------------------------------

    def complete_tags(self) -> list[str]:
        """Published checkpoints, oldest first."""
        return published_tags(self.directory)

    def _tag_from_latest(self) -> Optional[str]:
        """The tag `latest` names (checked to be a checkpoint of this directory), the newest
        tag when there is no `latest`, or None when there is no checkpoint."""
        try:
            tag = read_latest(self.directory)
        except LatestFileError as error:
            raise ResumeRefusedError(
                f"{error} (or set checkpoint.resume to a checkpoint directory)"
            ) from None
        if tag is None:
            tags = self.complete_tags()
            if tags:
                logger.warning(
                    "%s is missing; resuming from the newest checkpoint %s",
                    self.directory / LATEST_FILE,
                    tags[-1],
                )
                return tags[-1]
        return tag

    def resolve_resume(self) -> Optional[Path]:
        """The checkpoint directory to resume from, or None to start fresh (rank-local)."""
        resume = self.config.checkpoint.resume
        if resume is None:
            return None
        if resume == "latest":
            tag = self._tag_from_latest()
            if tag is None:
                logger.info(
                    "checkpoint.resume=latest: no checkpoint in %s, starting fresh", self.directory
                )
                return None
            return self.directory / tag
        path = Path(resume)
        if not path.is_dir() or not TAG_PATTERN.match(path.name):
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r} is not a checkpoint directory "
                "(<output_dir>/checkpoints/step_XXXXXXXX); use 'latest' or null"
            )
        return path

    def _is_inside(self, path: Path) -> bool:
        return path.resolve().parent == self.directory.resolve()

    # ---- starting a run ---------------------------------------------------------------------

    def prepare_run(self) -> Optional[Path]:
        """Collective, first thing of a run: lock, leftovers, the fresh-start rule, the choice
        of checkpoint and its checks (module doc, steps 1-5). Returns the checkpoint to resume
        from, or None."""
        error: Optional[BaseException] = None
        choice = START_FRESH
        if self.info.is_main:
            try:
                self.lock = RunLock.acquire(self.output_dir)
                self._remove_leftovers()
                self._apply_fresh_start_rule()
                choice = self._choose()
            except Exception as caught:  # raised below on this rank, after the others know
                error = caught
                self.close()  # the run does not start: leave the directory to the next one
        agree(error, self.info.device, f"to start the run in {self.output_dir}")
        choice = broadcast_integer(choice, self.info.device)
        if choice == START_FRESH:
            return None
        path = (
            Path(self.config.checkpoint.resume)
            if choice == RESUME_EXPLICIT_PATH
            else self.directory / tag_for_step(choice)
        )
        error = None
        try:
            self.check_compatible(path)
        except Exception as caught:
            error = caught
        agree(error, self.info.device, f"to check the checkpoint {path}")
        return path

    def _remove_leftovers(self) -> None:
        """Rank 0 under the lock: incomplete saves, half-replaced tags, half-removed
        directories of this output_dir (module doc, step 2)."""
        for leftover in self.output_dir.glob(REMOVING_PREFIX + "*"):
            logger.warning("removing %s, left by an interrupted checkpoint.overwrite", leftover)
            shutil.rmtree(leftover)
        if not self.directory.is_dir():
            return
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(INCOMPLETE_PREFIX):
                logger.warning(
                    "removing %s: an incomplete save of an earlier run of this directory (it "
                    "was killed or failed while saving); it was never published",
                    entry,
                )
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            elif entry.name.startswith(REPLACED_PREFIX):
                original = self.directory / entry.name[len(REPLACED_PREFIX) :]
                if original.exists():
                    logger.warning("removing %s: it was replaced by %s", entry, original)
                    shutil.rmtree(entry)
                else:
                    logger.warning("restoring %s: its replacement was never published", original)
                    os.replace(entry, original)
            elif entry.name.startswith(f".{LATEST_FILE}.") and entry.name.endswith(".tmp"):
                entry.unlink()

    def _apply_fresh_start_rule(self) -> None:
        """Rank 0: refuse to mix new checkpoints with an earlier run's, or delete them when
        checkpoint.overwrite (module doc, step 3)."""
        options = self.config.checkpoint
        tags = self.complete_tags()
        has_latest = (self.directory / LATEST_FILE).exists()
        if not tags and not has_latest:
            return
        if options.resume == "latest":
            return
        if options.resume is not None and self._is_inside(Path(options.resume)):
            if options.overwrite:
                raise ExistingCheckpointsError(
                    f"checkpoint.resume={options.resume} is one of the checkpoints that "
                    "checkpoint.overwrite=true would delete; set overwrite=false to resume from it"
                )
            newer = [tag for tag in tags if tag > Path(options.resume).name]
            if newer:
                logger.warning(
                    "resuming from %s while %s has later checkpoints %s: they are kept, and "
                    "`latest` moves to this run's saves",
                    options.resume,
                    self.directory,
                    ", ".join(newer),
                )
            return
        listed = ", ".join(tags[-3:]) or "only a 'latest' file"
        if not options.overwrite:
            raise ExistingCheckpointsError(
                f"{self.directory} holds checkpoints of an earlier run ({listed}) and this run "
                f"starts {'fresh' if options.resume is None else 'from ' + str(options.resume)}:"
                " its saves would mix with them and prune them. Set checkpoint.resume=latest to "
                "continue that run, checkpoint.overwrite=true to delete them and start over, or "
                "choose another train.output_dir"
            )
        aside = self.output_dir / f"{REMOVING_PREFIX}{os.getpid()}"
        logger.warning(
            "checkpoint.overwrite=true: deleting the %d checkpoint(s) of the earlier run in %s "
            "(%s)",
            len(tags),
            self.directory,
            listed,
        )
        os.replace(self.directory, aside)  # one rename: a crash leaves no half-deleted tags
        shutil.rmtree(aside)

    def _choose(self) -> int:
        """Rank 0: the broadcast code of the checkpoint to resume from (module doc, step 4)."""
        resume = self.config.checkpoint.resume
        if resume is None:
            return START_FRESH
        if resume != "latest":
            self.resolve_resume()  # checks the path
            return RESUME_EXPLICIT_PATH
        tag = self._tag_from_latest()
        if tag is None:
            logger.info(
                "checkpoint.resume=latest: no checkpoint in %s, starting fresh", self.directory
            )
            return START_FRESH
        return step_of_tag(tag)

    def close(self) -> None:
        """Release the run lock (rank 0)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- saving -----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        deepspeed_engine,
        shadows: dict[str, Any],
        exclude_frozen_parameters: bool,
        parameters: Optional[dict[str, nn.Parameter]] = None,
    ) -> Path:
        """Collective: every rank must call it. Returns the published checkpoint directory."""
        tag = tag_for_step(step)
        mark_progress(f"saving checkpoint {tag}")
        self._check_finite(step, parameters or {}, shadows)
        temporary = self.directory / (INCOMPLETE_PREFIX + tag)
        error: Optional[BaseException] = None
        if self.info.is_main:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if temporary.exists():
                    shutil.rmtree(temporary)
            except OSError as caught:
                error = self._write_error(tag, f"{temporary}: {caught}")
        agree(error, self.info.device, f"to prepare the save {temporary}")

        guarded = install_guarded_engine(deepspeed_engine)
        guarded.failure = None
        error = None
        try:
            deepspeed_engine.save_checkpoint(
                str(self.directory),
                tag=temporary.name,
                save_latest=False,
                exclude_frozen_parameters=exclude_frozen_parameters,
            )
            if guarded.failure is None:
                self._write_rank_files(temporary, step, shadows)
        except OSError as caught:
            guarded.record(caught.filename or temporary, caught)
        except Exception as caught:  # raised below on this rank, after the others know
            error = caught
        if error is None and guarded.failure is not None:
            error = self._write_error(tag, guarded.failure.describe())
        failed = ranks_where(error is not None, self.info.device)
        if failed:
            if self.info.is_main:
                shutil.rmtree(temporary, ignore_errors=True)
            if error is None:
                error = self._write_error(
                    tag,
                    f"rank(s) {', '.join(map(str, failed))} could not write their part of "
                    f"{temporary} (their error is in their log)",
                )
            raise error

        final = self.directory / tag
        error = None
        if self.info.is_main:
            try:
                self._publish(temporary, final, tag)
            except Exception as caught:
                error = self._write_error(tag, f"publishing {final}: {caught}")
        agree(error, self.info.device, f"to publish {final}")
        mark_progress(f"saved checkpoint {tag}")
        return final

    def _write_error(self, tag: str, detail: str) -> CheckpointWriteError:
        latest = self.directory / LATEST_FILE
        previous = latest.read_text().strip() if latest.is_file() else None
        kept = (
            f"the previous checkpoint {previous} is intact and {latest} still names it"
            if previous
            else "no earlier checkpoint exists"
        )
        return CheckpointWriteError(
            f"rank {self.info.rank} could not save checkpoint {tag}: {detail}; the save was "
            f"discarded and {kept}. Free space or repair the filesystem of {self.directory}, "
            "then start again with checkpoint.resume=latest"
        )

    def _check_finite(
        self, step: int, parameters: dict[str, nn.Parameter], shadows: dict[str, Any]
    ) -> None:
        """Collective: refuse the save on every rank when any rank holds a non-finite weight."""
        named = list(local_weights(parameters, self.info.rank, self.info.world_size))
        for prefix, shadow in shadows.items():
            named += [(f"{prefix}:{name}", tensor) for name, tensor in shadow.tensors.items()]
        bad = nonfinite_tensors(named)
        failed = ranks_where(bool(bad), self.info.device)
        if not failed:
            return
        latest = self.directory / LATEST_FILE
        previous = latest.read_text().strip() if latest.is_file() else "none yet"
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            logger.error("rank %d: non-finite weights at step %d: %s", self.info.rank, step, shown)
        raise NonFiniteWeightsError(
            f"refusing to save checkpoint {tag_for_step(step)}: the weights of rank(s) "
            f"{', '.join(map(str, failed))} hold nan or inf at step {step}"
            + (f" (here: {', '.join(bad[:5])})" if bad else "")
            + f"; nothing was written and `latest` still names the last good checkpoint "
            f"({previous}). Resume from it with a lower optimizer.lr or check the data"
        )

    def _write_rank_files(self, temporary: Path, step: int, shadows: dict[str, Any]) -> None:
        temporary.mkdir(parents=True, exist_ok=True)
        state = {
            "format": RANK_STATE_FORMAT,
            "step": step,
            "world_size": self.info.world_size,
            "rank": self.info.rank,
            **{name: component.state_dict() for name, component in self.components.items()},
        }
        atomic_write_text(temporary / rank_state_file(self.info.rank), encode_rank_state(state))
        for prefix, shadow in shadows.items():
            if shadow.zero_stage == 3 or self.info.is_main:
                atomic_torch_save(
                    shadow.state_dict(), temporary / shadow_file(prefix, self.info.rank)
                )
        if self.info.is_main:
            save_config(self.config, temporary / CONFIG_FILE)

    def _publish(self, temporary: Path, final: Path, tag: str) -> None:
        """Rename the finished save into place, point `latest` at it, prune (module doc)."""
        replaced = None
        if final.exists():  # saved again at a step that has a checkpoint (a rolled-back run)
            replaced = self.directory / (REPLACED_PREFIX + tag)
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final, replaced)
        os.replace(temporary, final)
        atomic_write_text(self.directory / LATEST_FILE, tag + "\n")
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        published = step_of_tag(tag)
        earlier = [old for old in self.complete_tags() if step_of_tag(old) < published]
        for old in earlier[: max(0, len(earlier) - (self.config.checkpoint.keep_last - 1))]:
            shutil.rmtree(self.directory / old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)

    # ---- resuming ---------------------------------------------------------------------------

    def saved_config(self, path: Path) -> dict:
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} is missing: {path} is not a complete checkpoint"
            )
        with open(config_path) as handle:
            return yaml.safe_load(handle) or {}

    def check_compatible(self, path: Path) -> list[tuple[str, Any, Any]]:
        """Compare the checkpoint's config and world size with this run's; raise
        ResumeRefusedError for a different world size (always) or model-changing differences
        (unless allowed). Returns every difference (the caller logs them)."""
        saved = self.saved_config(path)
        differences = config_differences(saved, to_dict(self.config))
        state_path = path / rank_state_file(0)
        if not state_path.is_file() and (path / legacy_rank_state_file(0)).is_file():
            raise ResumeRefusedError(
                f"{path} holds its rank state as a pickle ({legacy_rank_state_file(0)}), which "
                "this version does not load because a pickle can run code; resume it with the "
                "version that wrote it, or start a new run from its exported weights"
            )
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path} is missing: {path} is not a complete checkpoint")
        saved_world_size = decode_rank_state(state_path)["world_size"]
        if saved_world_size != self.info.world_size:
            raise ResumeRefusedError(self._world_size_advice(path, saved, saved_world_size))
        blocking = [
            f"{key}: {old!r} -> {new!r}"
            for key, old, new in differences
            if key.startswith(MODEL_DEFINING_PREFIXES)
        ]
        if blocking and not self.config.checkpoint.allow_config_changes:
            listed = "\n".join(f"  - {line}" for line in blocking)
            raise ResumeRefusedError(
                f"refusing to resume from {path}: it was saved with a different model:\n{listed}"
                "\nrestore those settings, start a new output_dir, or set "
                "checkpoint.allow_config_changes=true"
            )
        return differences

    def _world_size_advice(self, path: Path, saved: dict, saved_world_size: int) -> str:
        """The refusal of a changed world size, with what works instead (docs/reliability.md)."""
        model = saved.get("model") or {}
        reference = ((saved.get("method") or {}).get("reference") or {}).get("mode")
        lora = bool((model.get("lora") or {}).get("enabled"))
        text = (
            f"refusing to resume from {path}: it was saved by {saved_world_size} rank(s) and "
            f"this run has {self.info.world_size}. Its ZeRO partitions, EMA partitions and data "
            "positions are per rank, so it resumes only on the world size that wrote it: start "
            f"this run on {saved_world_size} rank(s) (deepspeed --num_gpus / torchrun "
            "--nproc_per_node)."
        )
        if (
            model.get("preset") in QWEN_IMAGE_PRESET_NAMES
            and not lora
            and reference != ("frozen_base")
        ):
            text += (
                f" To continue on {self.info.world_size} rank(s) instead, start a new run from "
                f"its weights: python tools/convert_checkpoint.py {path} <export> --mode full "
                "--dtype fp32 --keep-apex-keys, then train with model.pretrained=<export> "
                "checkpoint.resume=null train.output_dir=<a new directory> (the optimizer "
                "state, learning-rate schedule, data order and EMA start afresh from there)."
            )
        return text

    def check_loadable(self, path: Path, shadows: dict[str, Any]) -> None:
        """Collective: every rank checks the files it will read for pickled code before any
        rank starts DeepSpeed's load (module doc)."""
        rank = self.info.rank
        files = [path / ZERO2_MODEL_STATES]
        files += sorted(path.glob(f"*zero_pp_rank_{rank}_mp_rank_*_states.pt"))
        for prefix, shadow in shadows.items():
            files.append(path / shadow_file(prefix, rank if shadow.zero_stage == 3 else 0))
        error: Optional[BaseException] = None
        try:
            for file in files:
                if file.is_file():
                    check_loadable(file)
        except Exception as caught:
            error = caught
        agree(error, self.info.device, f"to check the files of {path}")

    def load_local_state(self, path: Path, shadows: dict[str, Any]) -> dict[str, Any]:
        """Collective: the shadows and this rank's state from `path`; a failure on any rank
        is a failure on every rank."""
        error: Optional[BaseException] = None
        state: dict[str, Any] = {}
        try:
            for prefix, shadow in shadows.items():
                self.load_shadow(path, prefix, shadow)
            state = self.load_rank_state(path)
        except Exception as caught:
            error = caught
        agree(error, self.info.device, f"to load their state from {path}")
        return state

    def load_rank_state(self, path: Path) -> dict[str, Any]:
        file = path / rank_state_file(self.info.rank)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the checkpoint was saved by fewer ranks than this run has "
                f"({self.info.world_size})"
            )
        state = decode_rank_state(file)
        if state["rank"] != self.info.rank:
            raise CheckpointLoadError(
                f"{file} holds the state of rank {state['rank']}, not {self.info.rank}"
            )
        return state

    def load_shadow(self, path: Path, prefix: str, shadow) -> None:
        rank = self.info.rank if shadow.zero_stage == 3 else 0
        file = path / shadow_file(prefix, rank)
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the run keeps {prefix} weights but the checkpoint has none "
                "(was it saved with another method.reference.mode?)"
            )
        shadow.load_state_dict(safe_torch_load(file), str(file))
