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
        entries["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
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


def read_safetensors_header(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """The tensors of a safetensors file as `LazyTensor` records (no data read) + metadata."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        if len(prefix) != HEADER_LENGTH_BYTES:
            raise CheckpointFormatError(f"{path} is not a safetensors file (too short)")
        (header_length,) = struct.unpack("<Q", prefix)
        if HEADER_LENGTH_BYTES + header_length > size:
            raise CheckpointFormatError(f"{path}: header longer than the file: truncated")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointFormatError(f"{path}: unreadable safetensors header") from error
    data_start = HEADER_LENGTH_BYTES + header_length
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if data_start + end > size:
            raise CheckpointFormatError(f"{path}: tensor {name} extends past the end: truncated")
        dtype = DTYPES_BY_CODE.get(entry["dtype"])
        if dtype is None:
            raise CheckpointFormatError(f"{path}: tensor {name} has dtype {entry['dtype']}")
        shape = torch.Size(entry["shape"])
        strides, running = [], 1
        for dimension in reversed(shape):
            strides.insert(0, running)
            running *= dimension
        record = StorageRecord(path, name, data_start + begin, end - begin, dtype)
        tensors[name] = LazyTensor(record, 0, shape, tuple(strides))
    return tensors, metadata


def tensor_chunks(tensor: LazyTensor, max_elements: int) -> Iterator[torch.Tensor]:
    """The flat data of a lazy tensor in pieces of at most `max_elements`."""
    total = tensor.numel()
    for start in range(0, total, max_elements):
        yield tensor.read_range(start, min(max_elements, total - start))
