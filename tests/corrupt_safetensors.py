"""Ways to corrupt a valid safetensors file, for the header checks of the converter and loaders.

Each function takes the bytes of a valid file and returns corrupted bytes. The file layout: an
8-byte little-endian header length, the JSON header, then the data area.
"""

from __future__ import annotations

import json
import random
import struct

HEADER_LENGTH_BYTES = 8


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data area) of a valid safetensors file."""
    (length,) = struct.unpack("<Q", data[:HEADER_LENGTH_BYTES])
    header = json.loads(data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length])
    return header, data[HEADER_LENGTH_BYTES + length :]


def join(header: dict | bytes, area: bytes) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + area


def tensors_in_order(header: dict) -> list[str]:
    names = [name for name in header if name != "__metadata__"]
    return sorted(names, key=lambda name: header[name]["data_offsets"][0])


def overlap_last_two(data: bytes) -> tuple[bytes, str]:
    """The last tensor moved back into the one before it by min(their sizes) bytes, and the data
    area shortened by as much: the ranges still end at the end of the file, but overlap.

    Returns the bytes and the name of the tensor that now overlaps its neighbour.
    """
    header, area = split(data)
    before, last = tensors_in_order(header)[-2:]
    begin, end = header[last]["data_offsets"]
    shift = min(end - begin, begin - header[before]["data_offsets"][0])
    header[last]["data_offsets"] = [begin - shift, end - shift]
    return join(header, area[: len(area) - shift]), last


def set_field(data: bytes, name: str, field: str, value) -> bytes:
    header, area = split(data)
    header[name][field] = value
    return join(header, area)


def set_header_length(data: bytes, length: int) -> bytes:
    return struct.pack("<Q", length) + data[HEADER_LENGTH_BYTES:]


def flip_bytes(data: bytes, rng: random.Random, count: int, header_only: bool) -> bytes:
    """`count` random bytes replaced by random values, in the header (or anywhere)."""
    (length,) = struct.unpack("<Q", data[:HEADER_LENGTH_BYTES])
    limit = HEADER_LENGTH_BYTES + length if header_only else len(data)
    corrupted = bytearray(data)
    for _ in range(count):
        corrupted[rng.randrange(limit)] = rng.randrange(256)
    return bytes(corrupted)


def random_corruption(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random corruption of `data` and its kind (for a failing case's message)."""
    header, area = split(data)
    names = tensors_in_order(header)
    kind = rng.choice(
        ["flip_header", "flip_any", "truncate", "header_length", "offsets", "shape", "dtype"]
    )
    if kind == "flip_header":
        return kind, flip_bytes(data, rng, rng.randint(1, 3), header_only=True)
    if kind == "flip_any":
        return kind, flip_bytes(data, rng, rng.randint(1, 3), header_only=False)
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "header_length":
        length = rng.choice(
            [2**64 - 1, 2**63, 10**9, len(data), len(data) - 7, rng.randrange(1, len(data))]
        )
        return kind, set_header_length(data, length)
    name = rng.choice(names)
    if kind == "offsets":
        begin, end = header[name]["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        header[name]["data_offsets"] = rng.choice(
            [
                [other[0], other[0] + end - begin],  # on top of another tensor
                [begin + 1, end + 1],
                [begin, end + rng.randint(1, 64)],
                [end, begin],
                [-1, end],
                [begin, len(area) + 2**40],
            ]
        )
    elif kind == "shape":
        header[name]["shape"] = rng.choice(
            [[], [0], [-1], [2**62, 2**62], [1.5], ["2"], header[name]["shape"] + [2], None]
        )
    else:
        header[name]["dtype"] = rng.choice(["F32", "F16", "I64", "U8", "Q4", "", 7, None])
    return kind, join(header, area)
