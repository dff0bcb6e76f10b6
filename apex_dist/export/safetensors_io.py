"""Streaming safetensors: write files tensor piece by tensor piece, read ranges without mmap.

The safetensors layout is an 8-byte little-endian header length, a JSON header mapping each
name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the
header) plus an optional "__metadata__" of strings, then the raw little-endian data. Because
every shape is known before any data is read, a file's header is written first and each tensor
is then appended chunk by chunk: the writer holds one chunk, never a shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apex_dist.export.torch_archive import CheckpointFormatError, LazyTensor, StorageRecord

# safetensors' dtype codes (safetensors/src/tensor.rs).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
# Every dtype code a file may hold that torch can represent (the written ones, 8-bit floats and
# unsigned integers), and its bytes per element.
READ_DTYPES = {
    **DTYPES_BY_CODE,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
READ_ITEM_SIZES = {
    code: torch.empty((), dtype=dtype).element_size() for code, dtype in READ_DTYPES.items()
}
# The header entry that holds string metadata instead of a tensor.
METADATA_KEY = "__metadata__"
# Largest header accepted, as in safetensors' own reader (MAX_HEADER_SIZE, 100 MB, in
# safetensors/src/tensor.rs); a 20B model's header is about 100 kB.
MAX_HEADER_BYTES = 100_000_000
# The header is padded with spaces to a multiple of 8 bytes, as the reference writer does,
# so that the data of every tensor stays aligned.
HEADER_ALIGNMENT = 8
# Bytes of the little-endian header-length prefix.
HEADER_LENGTH_BYTES = 8


@dataclass
class OutputTensor:
    """A tensor to write: its name, shape, output dtype, and a producer of its flat data.

    `produce()` yields 1-D tensors (any dtype; they are cast to `dtype`) whose concatenation
    is the tensor in row-major order.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], Iterable[torch.Tensor]]

    def byte_size(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.byte_size() > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.byte_size()
    return [shard for shard in shards if shard]


def _header(tensors: list[OutputTensor], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {}
    if metadata:
        entries[METADATA_KEY] = {str(key): str(value) for key, value in metadata.items()}
    offset = 0
    for tensor in tensors:
        size = tensor.byte_size()
        entries[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(entries, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % HEADER_ALIGNMENT)


def write_safetensors(
    path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` streaming each one's chunks; checks every tensor's size.

    The caller writes into a temporary directory and renames it when everything is complete.
    """
    names = [tensor.name for tensor in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in {path.name}")
    header = _header(tensors, metadata)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for tensor in tensors:
            written = 0
            for chunk in tensor.produce():
                data = chunk.reshape(-1).to(tensor.dtype).contiguous()
                handle.write(memoryview(data.view(torch.uint8).numpy()))
                written += data.numel()
            if written != math.prod(tensor.shape):
                raise CheckpointFormatError(
                    f"tensor {tensor.name}: produced {written} elements, expected "
                    f"{math.prod(tensor.shape)} for shape {tensor.shape}"
                )
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a checked safetensors header.

    Attributes:
        name: the tensor's name.
        dtype_code: safetensors' dtype name ("F32", "BF16", ...).
        dtype: the matching torch dtype.
        shape: the tensor's shape.
        begin, end: its byte range, relative to the start of the data area.
    """

    name: str
    dtype_code: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class CheckedHeader:
    """A safetensors header whose tensors tile the data area exactly (see `check_header`)."""

    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int  # file offset of the data area: 8 + the header length


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen = set()
        repeated = next(name for name, _ in pairs if name in seen or seen.add(name))
        raise CheckpointFormatError(f"the header names {repeated!r} twice")
    return mapping


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(name: str, entry: Any, where: str) -> HeaderEntry:
    """A tensor entry whose dtype is known and whose byte range fits its shape."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointFormatError(
            f"{where}: tensor {name!r} must have dtype, shape and data_offsets (got {entry!r:.200})"
        )
    code = entry["dtype"]
    dtype = READ_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointFormatError(
            f"{where}: tensor {name!r} has unknown dtype {code!r:.40} (known: "
            f"{', '.join(READ_DTYPES)})"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise CheckpointFormatError(
            f"{where}: tensor {name!r} has shape {shape!r:.200}; a shape is a list of "
            "non-negative integers"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointFormatError(
            f"{where}: tensor {name!r} has data_offsets {offsets!r:.200}; expected [begin, end] "
            "with 0 <= begin <= end"
        )
    needed = math.prod(shape) * READ_ITEM_SIZES[code]
    if offsets[1] - offsets[0] != needed:
        raise CheckpointFormatError(
            f"{where}: tensor {name!r} of shape {shape} and dtype {code} needs {needed} bytes "
            f"but its data_offsets {offsets} hold {offsets[1] - offsets[0]}"
        )
    return HeaderEntry(name, code, dtype, tuple(shape), offsets[0], offsets[1])


def check_header(header: bytes, data_length: int, where: str) -> tuple[dict, dict[str, str]]:
    """Parse and check a safetensors JSON header against the size of the data after it.

    Every tensor needs a known dtype, a shape of non-negative integers and a byte range of
    exactly shape x item size; the ranges, in order, must tile the data area: the first starts
    at 0, each starts where the one before ends (no overlap, no gap) and the last ends at
    `data_length`. These are the rules of safetensors' own reader, checked here in Python so
    that every problem names the file (`where`) and the tensor.

    Returns ({name: HeaderEntry}, metadata). Raises CheckpointFormatError.
    """
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except CheckpointFormatError as error:
        raise CheckpointFormatError(f"{where}: {error}") from None
    except (ValueError, RecursionError) as error:  # bad UTF-8, bad JSON, a 5000-digit number
        raise CheckpointFormatError(
            f"{where}: the safetensors header is not valid JSON ({error}); the file is corrupt "
            "or not a safetensors file"
        ) from None
    if not isinstance(parsed, dict):
        raise CheckpointFormatError(
            f"{where}: the safetensors header must be a JSON object (got {type(parsed).__name__})"
        )
    metadata = parsed.pop(METADATA_KEY, None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise CheckpointFormatError(
            f"{where}: {METADATA_KEY} must map names to strings (got {metadata!r:.200})"
        )
    entries = {name: _check_entry(name, entry, where) for name, entry in parsed.items()}
    for entry in entries.values():
        if entry.end > data_length:
            raise CheckpointFormatError(
                f"{where}: tensor {entry.name!r} ends at byte {entry.end} of the data but the "
                f"file holds {data_length} data bytes: the file is truncated or corrupt"
            )
    position, previous = 0, None
    for entry in sorted(entries.values(), key=lambda item: (item.begin, item.end)):
        if entry.begin < position:
            raise CheckpointFormatError(
                f"{where}: tensor {entry.name!r} (bytes {entry.begin}-{entry.end}) overlaps "
                f"tensor {previous!r} (which ends at {position}): the header is corrupt"
            )
        if entry.begin > position:
            raise CheckpointFormatError(
                f"{where}: no tensor holds data bytes {position}-{entry.begin} (before tensor "
                f"{entry.name!r}): the header is corrupt"
            )
        position, previous = entry.end, entry.name
    if position != data_length:
        raise CheckpointFormatError(
            f"{where}: the tensors cover {position} data bytes but the file holds {data_length}: "
            "the header does not describe this file"
        )
    return entries, metadata


def check_safetensors_bytes(data: bytes, where: str) -> CheckedHeader:
    """Check the header of a safetensors file held in memory (see `check_header`)."""
    return _check_layout(
        data[:HEADER_LENGTH_BYTES],
        len(data),
        lambda size: data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + size],
        where,
    )


def read_checked_header(path: Path) -> CheckedHeader:
    """Read and check the header of a safetensors file (see `check_header`); no data is read.

    Raises CheckpointFormatError naming the file (and the tensor) for a missing or short file,
    a header length beyond the file or `MAX_HEADER_BYTES`, invalid JSON, or tensors that do
    not tile the data area.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return _check_layout(handle.read(HEADER_LENGTH_BYTES), size, handle.read, str(path))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise CheckpointFormatError(
            f"{path}: cannot be read as a safetensors file ({error})"
        ) from None


def _check_layout(
    prefix: bytes, size: int, read: Callable[[int], bytes], where: str
) -> CheckedHeader:
    if len(prefix) != HEADER_LENGTH_BYTES:
        raise CheckpointFormatError(
            f"{where}: {size} bytes is too short for a safetensors file (it starts with an "
            f"{HEADER_LENGTH_BYTES}-byte header length)"
        )
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_length > size:
        raise CheckpointFormatError(
            f"{where}: header length {header_length} is larger than the file ({size} bytes) or "
            f"than {MAX_HEADER_BYTES} bytes: the file is truncated or not a safetensors file"
        )
    header = read(header_length)
    if len(header) != header_length:
        raise CheckpointFormatError(f"{where}: the file ended inside its header: truncated")
    data_start = HEADER_LENGTH_BYTES + header_length
    tensors, metadata = check_header(header, size - data_start, where)
    return CheckedHeader(tensors, metadata, data_start)


def read_safetensors_header(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """The tensors of a checked safetensors file as `LazyTensor` records (no data read) +
    metadata. Raises CheckpointFormatError (see `read_checked_header`)."""
    checked = read_checked_header(path)
    tensors = {}
    for name, entry in checked.tensors.items():
        strides, running = [], 1
        for dimension in reversed(entry.shape):
            strides.insert(0, running)
            running *= dimension
        record = StorageRecord(
            Path(path), name, checked.data_start + entry.begin, entry.end - entry.begin, entry.dtype
        )
        tensors[name] = LazyTensor(record, 0, torch.Size(entry.shape), tuple(strides))
    return tensors, checked.metadata


def tensor_chunks(tensor: LazyTensor, max_elements: int) -> Iterator[torch.Tensor]:
    """The flat data of a lazy tensor in pieces of at most `max_elements`."""
    total = tensor.numel()
    for start in range(0, total, max_elements):
        yield tensor.read_range(start, min(max_elements, total - start))
