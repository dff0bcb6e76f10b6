"""Lazy reading of `torch.save` files: the object tree without the tensor data.

`open_torch_archive(path)` unpickles the archive's `data.pkl` with tensors replaced by
`LazyTensor` records (file, byte offset, dtype, shape, stride); `LazyTensor.read_range` then
reads only the elements asked for, with ordinary file reads into a fresh buffer. Nothing is
memory-mapped, so the resident memory of a reader is what it holds, not what it has touched,
and a multi-GB optimizer file costs only its pickle (a few kB) until a range is read.

Only a small allow-list of classes is resolved (containers, `torch.Size`, dtypes, storages and
the tensor rebuild functions); every other class in the pickle (DeepSpeed's enums, loss
scalers, ...) becomes an `UnresolvedObject` that records its constructor arguments and state.
Reading a checkpoint therefore never imports or runs code named by the file, and DeepSpeed
does not need to be installed.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# torch.save's storage classes by pickled name and the dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
# dtypes pickled as module attributes (`torch.float32`, ...).
DTYPE_NAMES = {
    str(dtype).removeprefix("torch."): dtype for dtype in set(STORAGE_DTYPES.values())
} | {"float": torch.float32, "half": torch.float16, "long": torch.int64, "int": torch.int32}
# Classes from the standard library that may appear in DeepSpeed's pickles and are safe to build.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "range"),
    ("_codecs", "encode"),
}
# Size of a zip local file header before its variable-length name and extra field (APPNOTE 4.3.7).
ZIP_LOCAL_HEADER_SIZE = 30
ZIP_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"


class CheckpointFormatError(ValueError):
    """A checkpoint file or directory is missing, truncated, or not in the expected format."""


class UnresolvedObject:
    """Stand-in for a class the reader does not import: keeps its arguments and state."""

    module = "?"
    qualified_name = "?"

    def __init__(self, *arguments: Any, **keyword_arguments: Any):
        self.arguments = arguments
        self.keyword_arguments = keyword_arguments
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<unresolved {self.module}.{self.qualified_name}{self.arguments!r}>"


def as_int(value: Any) -> int:
    """An int from a plain int or an unresolved IntEnum (DeepSpeed pickles ZeroStageEnum)."""
    if isinstance(value, UnresolvedObject) and len(value.arguments) == 1:
        value = value.arguments[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointFormatError(f"expected an integer, found {value!r}")
    return value


@dataclass(frozen=True)
class StorageRecord:
    """One storage of an archive: where its bytes start in the file and what they hold."""

    path: Path
    entry: str
    data_offset: int
    byte_size: int
    dtype: torch.dtype


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a `torch.save` file that has not been read.

    Attributes:
        storage: the storage it views.
        storage_offset: offset of its first element in the storage, in elements.
        shape: its shape.
        stride: its strides, in elements.
    """

    storage: StorageRecord
    storage_offset: int
    shape: torch.Size
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def read_range(self, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, as a new 1-D tensor.

        Raises CheckpointFormatError if the tensor is not contiguous or the file ends early.
        """
        if not self.is_contiguous():
            raise CheckpointFormatError(
                f"{self.storage.path}: tensor in {self.storage.entry} is not contiguous "
                f"(shape {tuple(self.shape)}, stride {self.stride}); only contiguous tensors "
                "can be streamed"
            )
        if start < 0 or count < 0 or start + count > self.numel():
            raise IndexError(f"range [{start}, {start + count}) outside {self.numel()} elements")
        return read_storage_bytes(self.storage, self.storage_offset + start, count)

    def read(self) -> torch.Tensor:
        """The whole tensor (a copy with its own memory)."""
        return self.read_range(0, self.numel()).view(self.shape)


def read_storage_bytes(storage: StorageRecord, element_offset: int, count: int) -> torch.Tensor:
    """Read `count` elements of `storage` starting at `element_offset` into a new tensor."""
    item_size = torch.empty((), dtype=storage.dtype).element_size()
    begin = element_offset * item_size
    length = count * item_size
    if begin + length > storage.byte_size:
        raise CheckpointFormatError(
            f"{storage.path}: {storage.entry} holds {storage.byte_size} bytes but a tensor needs "
            f"bytes up to {begin + length}: the file is inconsistent or truncated"
        )
    result = torch.empty(count, dtype=storage.dtype)
    if length == 0:
        return result
    buffer = memoryview(result.view(torch.uint8).numpy()).cast("B")
    with open(storage.path, "rb", buffering=0) as handle:
        handle.seek(storage.data_offset + begin)
        filled = 0
        while filled < length:
            received = handle.readinto(buffer[filled:])
            if not received:
                raise CheckpointFormatError(
                    f"{storage.path} ends after {storage.data_offset + begin + filled} bytes "
                    f"while reading {storage.entry}: the file is truncated; copy it again or "
                    "use an earlier checkpoint tag"
                )
            filled += received
    return result


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> LazyTensor:
    return LazyTensor(storage, int(storage_offset), torch.Size(size), tuple(stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_):
    return LazyTensor(storage, int(storage_offset), torch.Size(size), tuple(stride))


def _rebuild_parameter(data, *_unused) -> Any:
    return data


def _rebuild_from_type(function, _new_type, arguments, _state) -> Any:
    return function(*arguments)


# torch's rebuild functions, replaced by ones that return LazyTensor records.
REBUILD_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
}


class _StorageClass:
    """Marker for a pickled storage class; carries the element dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _LazyUnpickler(pickle.Unpickler):
    def __init__(self, handle, path: Path, storages: dict[str, tuple[int, int]], prefix: str):
        super().__init__(handle)
        self.path = path
        self.storages = storages
        self.prefix = prefix
        self.unresolved: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in REBUILD_FUNCTIONS:
            return REBUILD_FUNCTIONS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageClass(STORAGE_DTYPES[name])
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        key = (module, name)
        if key not in self.unresolved:
            self.unresolved[key] = type(
                name.split(".")[-1],
                (UnresolvedObject,),
                {"module": module, "qualified_name": name},
            )
        return self.unresolved[key]

    def persistent_load(self, saved_id: Any) -> StorageRecord:
        if not isinstance(saved_id, tuple) or saved_id[0] != "storage":
            raise CheckpointFormatError(f"{self.path}: unknown persistent id {saved_id!r}")
        _, storage_class, key, _location, _numel = saved_id
        dtype = storage_class.dtype if isinstance(storage_class, _StorageClass) else torch.uint8
        entry = f"{self.prefix}data/{key}"
        if entry not in self.storages:
            raise CheckpointFormatError(
                f"{self.path}: storage {entry} is referenced but missing from the archive; "
                "the file is truncated or corrupt"
            )
        data_offset, byte_size = self.storages[entry]
        return StorageRecord(self.path, entry, data_offset, byte_size, dtype)


def _data_offset(handle, info: zipfile.ZipInfo, path: Path) -> int:
    handle.seek(info.header_offset)
    header = handle.read(ZIP_LOCAL_HEADER_SIZE)
    if len(header) != ZIP_LOCAL_HEADER_SIZE or header[:4] != ZIP_LOCAL_HEADER_SIGNATURE:
        raise CheckpointFormatError(f"{path}: bad zip entry header for {info.filename}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + ZIP_LOCAL_HEADER_SIZE + name_length + extra_length


def open_torch_archive(path: str | os.PathLike) -> Any:
    """The object saved in a `torch.save` zip file, with every tensor as a `LazyTensor`.

    Raises CheckpointFormatError naming the file if it is missing, truncated (its zip
    directory is gone or an entry extends past the end), compressed, big-endian, or has no
    `data.pkl`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint file {path} does not exist")
    file_size = path.stat().st_size
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointFormatError(
            f"{path} is not a readable torch.save archive ({error}): the file is truncated or "
            "corrupt (an interrupted save or copy); copy it again or use an earlier tag"
        ) from error
    with archive, open(path, "rb") as handle:
        pickles = [info for info in archive.infolist() if info.filename.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path}: expected one data.pkl in the archive")
        prefix = pickles[0].filename[: -len("data.pkl")]
        byte_order = f"{prefix}byteorder"
        if byte_order in archive.namelist() and archive.read(byte_order).strip() != b"little":
            raise CheckpointFormatError(f"{path}: big-endian archives are not supported")
        storages = {}
        for info in archive.infolist():
            if not info.filename.startswith(f"{prefix}data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointFormatError(f"{path}: {info.filename} is compressed")
            offset = _data_offset(handle, info, path)
            if offset + info.file_size > file_size:
                raise CheckpointFormatError(
                    f"{path}: {info.filename} extends past the end of the file: truncated"
                )
            storages[info.filename] = (offset, info.file_size)
        with archive.open(pickles[0]) as pickle_handle:
            try:
                return _LazyUnpickler(pickle_handle, path, storages, prefix).load()
            except (pickle.UnpicklingError, EOFError) as error:
                raise CheckpointFormatError(f"{path}: cannot read data.pkl ({error})") from error
