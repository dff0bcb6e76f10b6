"""DeepSpeed's on-disk checkpoint layout, read one tensor piece at a time.

A tag directory written by `engine.save_checkpoint(dir, tag)` holds, per data-parallel rank:

- ZeRO-1/2: `mp_rank_00_model_states.pt` (rank 0 only: `param_shapes`, `buffer_names`, the
  module's buffers, frozen parameters whole in `frozen_param_fragments`) and
  `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` whose `single_partition_of_fp32_groups[g]` is
  rank r's slice of parameter group g: the group's parameters flattened in `param_shapes[g]`
  order (plus `param_alignment_paddings` where recorded), padded to a multiple of the world
  size and cut into equal consecutive slices, rank 0 first.
- ZeRO-3: `zero_pp_rank_<r>_mp_rank_00_model_states.pt` for every rank (frozen parameters as
  rank r's padded partition) and optimizer files whose `fp32_flat_groups` hold, for every
  parameter in `param_shapes` order, rank r's partition of ceil(numel / world size) elements
  (DeepSpeed pads the last rank's with trailing elements).

apex_dist adds `config.yaml` (the resolved run config) and, with an EMA, `ema_rank_<r:05d>.pt`
= {"format": "apex_dist.ema/1", "zero_stage", "world_size", "tensors": {name: tensor}} with
rank r's flat partition per parameter under ZeRO-3 and whole tensors on rank 0 otherwise.

Every tensor becomes a `TensorSource`: its shape and the list of file ranges whose
concatenation is its flattened data. Nothing is read until `chunks()` or `read()` is called,
and then only one bounded piece at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from apex_dist.checkpoint_layout import (
    CHECKPOINTS_SUBDIRECTORY,
    EMA_FILE,
    LATEST_FILE,
    OPTIMIZER_STATES,
    ZERO2_MODEL_STATES,
    ZERO3_MODEL_STATES,
    LatestFileError,
    read_latest,
)
from apex_dist.checkpoint_layout import CONFIG_FILE as RUN_CONFIG_FILE
from apex_dist.checkpoint_layout import SHADOW_FORMAT as EMA_FORMAT
from apex_dist.export.torch_archive import (
    CheckpointFormatError,
    LazyTensor,
    as_int,
    open_torch_archive,
)

# Largest piece read at once while streaming: 64 MiB of fp32 (bounds memory and keeps reads
# large enough to run at disk speed).
DEFAULT_CHUNK_ELEMENTS = 16 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + count) of a flat lazy tensor."""

    tensor: LazyTensor
    start: int
    count: int


@dataclass
class TensorSource:
    """One tensor of the checkpoint as the ordered file ranges that make up its flat data.

    The pieces may hold more elements than the tensor (ZeRO-3 padding); the surplus at the end
    is never returned.
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    pieces: list[Piece] = field(default_factory=list)

    def numel(self) -> int:
        return math.prod(self.shape)

    def chunks(self, max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
        """Yield 1-D tensors of at most `max_elements` whose concatenation is the flat tensor."""
        remaining = self.numel()
        for piece in self.pieces:
            position, end = piece.start, piece.start + piece.count
            while position < end and remaining > 0:
                count = min(max_elements, end - position, remaining)
                yield piece.tensor.read_range(position, count)
                position += count
                remaining -= count
        if remaining:
            raise CheckpointFormatError(
                f"tensor {self.name}: the checkpoint holds {self.numel() - remaining} of its "
                f"{self.numel()} elements; the partitions do not match its shape"
            )

    def read_range(self, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flat tensor, as a new 1-D tensor."""
        if start < 0 or count < 0 or start + count > self.numel():
            raise IndexError(f"range [{start}, {start + count}) outside {self.numel()} elements")
        parts, offset = [], 0
        for piece in self.pieces:
            low, high = max(start, offset), min(start + count, offset + piece.count)
            if low < high:
                parts.append(piece.tensor.read_range(piece.start + low - offset, high - low))
            offset += piece.count
            if offset >= start + count:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read(self) -> torch.Tensor:
        """The whole tensor in its stored dtype."""
        if len(self.pieces) == 1 and self.pieces[0].count >= self.numel():
            piece = self.pieces[0]
            return piece.tensor.read_range(piece.start, self.numel()).view(self.shape)
        flat = torch.empty(self.numel(), dtype=self.dtype)
        position = 0
        for chunk in self.chunks():
            flat[position : position + chunk.numel()] = chunk
            position += chunk.numel()
        return flat.view(self.shape)


def _rank_files(directory: Path, pattern: re.Pattern) -> dict[int, Path]:
    files = {}
    for path in directory.iterdir():
        match = pattern.match(path.name)
        if match is None:
            continue
        if len(match.groups()) > 1 and int(match.group(2)) != 0:
            raise CheckpointFormatError(
                f"{path}: model-parallel rank {match.group(2)}; only checkpoints without tensor "
                "or pipeline parallelism (mp_rank_00) are supported"
            )
        files[int(match.group(1))] = path
    return files


def _has_model_states(directory: Path) -> bool:
    return (directory / ZERO2_MODEL_STATES).is_file() or bool(
        _rank_files(directory, ZERO3_MODEL_STATES)
    )


def list_tags(checkpoints_directory: Path) -> list[str]:
    """Names of the subdirectories that hold DeepSpeed model states, sorted."""
    return sorted(
        path.name
        for path in checkpoints_directory.iterdir()
        if path.is_dir() and _has_model_states(path)
    )


def resolve_tag_directory(path: str | Path, tag: str | None = None) -> Path:
    """The tag directory meant by `path` (+ `tag`).

    `path` may be a run's output directory (with `checkpoints/`), a checkpoints directory
    (with `latest` and tag subdirectories) or a tag directory itself. Without `tag`, the one
    named in `latest` is used.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"checkpoint directory {path} does not exist")
    if (path / CHECKPOINTS_SUBDIRECTORY).is_dir() and not _has_model_states(path):
        path = path / CHECKPOINTS_SUBDIRECTORY
    if _has_model_states(path):
        if tag is not None and tag != path.name:
            raise CheckpointFormatError(
                f"{path} is the tag directory {path.name!r}, but --tag {tag!r} was given; pass "
                "its parent directory to choose another tag"
            )
        return path
    tags = list_tags(path)
    if tag is None:
        latest = path / LATEST_FILE
        if not latest.is_file():
            if not tags:
                raise CheckpointFormatError(
                    f"{path} is not a DeepSpeed checkpoint directory: it has no 'latest' file, "
                    "no tag subdirectories with *_model_states.pt and no model states itself; "
                    "pass a run's output directory, its checkpoints/ directory or a tag directory"
                )
            raise CheckpointFormatError(
                f"{path} has no 'latest' file; choose a tag with --tag (available: "
                f"{', '.join(tags)})"
            )
        try:
            tag = read_latest(path)
        except LatestFileError as error:
            raise CheckpointFormatError(f"{error} (--tag chooses one)") from None
    tag_directory = path / tag
    if not tag_directory.is_dir() or not _has_model_states(tag_directory):
        available = ", ".join(tags) if tags else "none"
        raise CheckpointFormatError(
            f"checkpoint tag {tag!r} not found in {path} (no directory {tag_directory} with "
            f"model states); available tags: {available}"
        )
    return tag_directory


def _partition_numel(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


def _ranges_of(flat_pieces: list[LazyTensor], start: int, count: int) -> list[Piece]:
    """Pieces covering elements [start, start + count) of the concatenation of `flat_pieces`."""
    pieces, offset = [], 0
    for tensor in flat_pieces:
        size = tensor.numel()
        low, high = max(start, offset), min(start + count, offset + size)
        if low < high:
            pieces.append(Piece(tensor, low - offset, high - low))
        offset += size
        if offset >= start + count:
            break
    covered = sum(piece.count for piece in pieces)
    if covered != count:
        raise CheckpointFormatError(
            f"partition data ends after {offset} elements but a tensor needs elements up to "
            f"{start + count}: the optimizer files do not match param_shapes"
        )
    return pieces


@dataclass
class DeepSpeedCheckpoint:
    """The tensors of one DeepSpeed checkpoint tag, as lazily readable sources.

    Attributes:
        tag_directory: the directory of the tag.
        zero_stage: ZeRO stage it was saved with.
        world_size: data-parallel ranks that saved it.
        parameters: trainable parameters (fp32 master weights of the optimizer).
        frozen: frozen parameters saved with the model states (none after
            `exclude_frozen_parameters=True`).
        buffers: the module's buffers.
        run_config: the parsed `config.yaml` of apex_dist, or None.
        global_steps: the engine's step counter.
    """

    tag_directory: Path
    zero_stage: int
    world_size: int
    parameters: dict[str, TensorSource]
    frozen: dict[str, TensorSource]
    buffers: dict[str, TensorSource]
    run_config: dict[str, Any] | None
    global_steps: int | None
    parameter_shapes: dict[str, torch.Size]

    @property
    def tag(self) -> str:
        return self.tag_directory.name

    @classmethod
    def open(cls, path: str | Path, tag: str | None = None) -> DeepSpeedCheckpoint:
        """Parse the checkpoint at `path` (see `resolve_tag_directory`); reads no tensor data.

        Every file is checked here (present, complete archive, ranks 0..world_size-1), so a
        conversion fails before it writes anything.
        """
        directory = resolve_tag_directory(path, tag)
        zero3_model_files = _rank_files(directory, ZERO3_MODEL_STATES)
        model_files = (
            {0: directory / ZERO2_MODEL_STATES}
            if (directory / ZERO2_MODEL_STATES).is_file()
            else zero3_model_files
        )
        model_states = {rank: open_torch_archive(file) for rank, file in model_files.items()}
        first = model_states[min(model_states)]
        for key in ("param_shapes", "buffer_names", "module"):
            if key not in first:
                raise CheckpointFormatError(
                    f"{model_files[min(model_files)]} has no {key!r}: not a DeepSpeed model "
                    "states file"
                )
        world_size = as_int(first.get("dp_world_size", 1))
        optimizer_files = _rank_files(directory, OPTIMIZER_STATES)
        _check_ranks(directory, "optimizer states", optimizer_files, world_size)
        if model_files is zero3_model_files:
            _check_ranks(directory, "ZeRO-3 model states", model_files, world_size)

        parameter_shapes: dict[str, torch.Size] = {}
        for group in first["param_shapes"]:
            parameter_shapes.update({name: torch.Size(shape) for name, shape in group.items()})
        frozen_shapes = {
            name: torch.Size(shape)
            for name, shape in (first.get("frozen_param_shapes") or {}).items()
        }

        module = first["module"]
        buffers = {}
        for name in first["buffer_names"]:
            if name in module:
                tensor = module[name]
                buffers[name] = TensorSource(
                    name, tensor.shape, tensor.dtype, [Piece(tensor, 0, tensor.numel())]
                )

        if optimizer_files:
            optimizer_states = [
                open_torch_archive(optimizer_files[rank])["optimizer_state_dict"]
                for rank in range(world_size)
            ]
            zero_stage = as_int(optimizer_states[0].get("zero_stage", 0))
            if zero_stage == 3:
                parameters = _zero3_parameters(parameter_shapes, optimizer_states, world_size)
            elif zero_stage in (1, 2):
                parameters = _zero2_parameters(first["param_shapes"], optimizer_states)
            else:
                raise CheckpointFormatError(
                    f"{optimizer_files[0]}: unsupported zero_stage {zero_stage}"
                )
        else:  # ZeRO-0: whole weights in the module state dict
            zero_stage = 0
            parameters = {}
            for name, shape in parameter_shapes.items():
                if name not in module or module[name].numel() != math.prod(shape):
                    raise CheckpointFormatError(
                        f"{directory}: no optimizer partition files and no whole tensor "
                        f"{name!r} in the module states: the checkpoint is incomplete"
                    )
                tensor = module[name]
                parameters[name] = TensorSource(
                    name, shape, tensor.dtype, [Piece(tensor, 0, tensor.numel())]
                )

        frozen = {}
        for name, shape in frozen_shapes.items():
            if zero_stage == 3:
                fragments = [
                    model_states[rank]["frozen_param_fragments"][name] for rank in range(world_size)
                ]
                pieces = [Piece(fragment, 0, fragment.numel()) for fragment in fragments]
            else:
                fragment = first["frozen_param_fragments"][name]
                pieces = [Piece(fragment, 0, fragment.numel())]
            frozen[name] = TensorSource(name, shape, pieces[0].tensor.dtype, pieces)

        for alias, original in (first.get("shared_params") or {}).items():
            for table in (parameters, frozen):
                if original in table:
                    table[alias] = table[original]

        run_config = None
        config_path = directory / RUN_CONFIG_FILE
        if config_path.is_file():
            run_config = yaml.safe_load(config_path.read_text())
        global_steps = first.get("global_steps")
        return cls(
            tag_directory=directory,
            zero_stage=zero_stage,
            world_size=world_size,
            parameters=parameters,
            frozen=frozen,
            buffers=buffers,
            run_config=run_config,
            global_steps=as_int(global_steps) if global_steps is not None else None,
            parameter_shapes={**frozen_shapes, **parameter_shapes},
        )

    def has_ema(self) -> bool:
        return any(EMA_FILE.match(path.name) for path in self.tag_directory.iterdir())

    def ema_parameters(self) -> dict[str, TensorSource]:
        """The EMA weights of the trainable parameters, from the `ema_rank_*.pt` files."""
        files = _rank_files(self.tag_directory, EMA_FILE)
        if not files:
            raise CheckpointFormatError(
                f"{self.tag_directory} has no ema_rank_*.pt files: the run kept no EMA "
                "(method.reference.mode ema); export the trained weights instead"
            )
        first = open_torch_archive(files[min(files)])
        if not isinstance(first, dict) or first.get("format") != EMA_FORMAT:
            raise CheckpointFormatError(
                f"{files[min(files)]}: not an apex_dist EMA file (format "
                f"{first.get('format') if isinstance(first, dict) else type(first)!r}, expected "
                f"{EMA_FORMAT!r})"
            )
        ema_stage = as_int(first["zero_stage"])
        ema_world = as_int(first["world_size"])
        sources = {}
        if ema_stage == 3:
            _check_ranks(self.tag_directory, "EMA", files, ema_world)
            per_rank = [open_torch_archive(files[rank])["tensors"] for rank in range(ema_world)]
            for name in per_rank[0]:
                shape = self._shape_of(name, "EMA")
                expected = _partition_numel(math.prod(shape), ema_world)
                pieces = []
                for rank, tensors in enumerate(per_rank):
                    if name not in tensors or tensors[name].numel() != expected:
                        raise CheckpointFormatError(
                            f"{files[rank]}: EMA partition of {name} is missing or has "
                            f"{tensors[name].numel() if name in tensors else 0} elements; "
                            f"expected {expected} (ceil({math.prod(shape)} / {ema_world}))"
                        )
                    pieces.append(Piece(tensors[name], 0, expected))
                sources[name] = TensorSource(name, shape, pieces[0].tensor.dtype, pieces)
        else:
            for name, tensor in first["tensors"].items():
                shape = self._shape_of(name, "EMA")
                if tuple(tensor.shape) != tuple(shape):
                    raise CheckpointFormatError(
                        f"{files[min(files)]}: EMA tensor {name} has shape {tuple(tensor.shape)} "
                        f"but the model states say {tuple(shape)}"
                    )
                sources[name] = TensorSource(
                    name, shape, tensor.dtype, [Piece(tensor, 0, tensor.numel())]
                )
        return sources

    def _shape_of(self, name: str, what: str) -> torch.Size:
        if name not in self.parameter_shapes:
            raise CheckpointFormatError(
                f"{what} tensor {name!r} is not a parameter of the checkpointed model "
                f"({self.tag_directory})"
            )
        return self.parameter_shapes[name]


def _check_ranks(directory: Path, what: str, files: dict[int, Path], world_size: int) -> None:
    if not files:
        if what == "optimizer states":
            return
        raise CheckpointFormatError(f"{directory}: no {what} files")
    missing = sorted(set(range(world_size)) - set(files))
    extra = sorted(set(files) - set(range(world_size)))
    if missing or extra:
        raise CheckpointFormatError(
            f"{directory}: {what} files for world size {world_size} are incomplete (missing "
            f"ranks {missing}, unexpected ranks {extra}); a rank did not finish saving or "
            "files from another run are mixed in: use a complete tag"
        )


def _zero3_parameters(
    shapes: dict[str, torch.Size], optimizer_states: list[dict], world_size: int
) -> dict[str, TensorSource]:
    flat_groups = [state["fp32_flat_groups"] for state in optimizer_states]
    available = sum(tensor.numel() for tensor in flat_groups[0])
    sources, offset = {}, 0
    for name, shape in shapes.items():
        partition = _partition_numel(math.prod(shape), world_size)
        pieces = []
        for rank in range(world_size):
            pieces += _ranges_of(flat_groups[rank], offset, partition)
        sources[name] = TensorSource(name, shape, pieces[0].tensor.dtype, pieces)
        offset += partition
    if offset != available:
        raise CheckpointFormatError(
            f"the ZeRO-3 partitions hold {available} elements per rank but param_shapes need "
            f"{offset}: the optimizer files do not belong to these model states"
        )
    return sources


def _zero2_parameters(
    param_shapes: list[dict], optimizer_states: list[dict]
) -> dict[str, TensorSource]:
    world_size = len(optimizer_states)
    groups = [state["single_partition_of_fp32_groups"] for state in optimizer_states]
    paddings = optimizer_states[0].get("param_alignment_paddings")
    sources = {}
    for group_index, group_shapes in enumerate(param_shapes):
        rank_slices = [groups[rank][group_index] for rank in range(world_size)]
        available = sum(tensor.numel() for tensor in rank_slices)
        offset = 0
        for parameter_index, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            pieces = _ranges_of(rank_slices, offset, numel)
            sources[name] = TensorSource(name, torch.Size(shape), pieces[0].tensor.dtype, pieces)
            offset += numel
            if paddings is not None:
                offset += paddings[group_index][parameter_index]
        # DeepSpeed pads each group to a multiple of 2 * world size (zero_to_fp32's check)
        alignment = 2 * world_size
        if math.ceil(offset / alignment) != math.ceil(available / alignment):
            raise CheckpointFormatError(
                f"ZeRO-2 group {group_index}: param_shapes use {offset} elements but the "
                f"partitions hold {available}: the optimizer files do not match the model states"
            )
    return sources
