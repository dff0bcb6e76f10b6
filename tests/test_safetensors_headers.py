"""Checked safetensors headers: the reader of the converter (--base) and of the model loaders.

Every corrupted header must give a CheckpointFormatError that names the file (and the tensor
where one is at fault); a header the checks accept must be one the safetensors library reads
the same way, with the same data.
"""

from __future__ import annotations

import random

import pytest
import torch
from corrupt_safetensors import (
    join,
    overlap_last_two,
    random_corruption,
    set_field,
    set_header_length,
    split,
    tensors_in_order,
)
from safetensors import safe_open
from safetensors.torch import save

from apex_dist.export.safetensors_io import (
    MAX_HEADER_BYTES,
    check_safetensors_bytes,
    read_safetensors_header,
)
from apex_dist.export.torch_archive import CheckpointFormatError

# Corrupted files tried by the fuzz test (a few seconds in all).
FUZZ_CASES = 400
FUZZ_SEED = 12


def valid_file() -> bytes:
    generator = torch.Generator().manual_seed(0)
    return save(
        {
            "blocks.0.weight": torch.randn(3, 4, generator=generator),
            "blocks.0.bias": torch.randn(4, generator=generator).to(torch.bfloat16),
            "steps": torch.tensor([1, 2, 3], dtype=torch.int64),
            "mask": torch.tensor([True, False, True, True, False]),
            "scale": torch.tensor(0.5, dtype=torch.float16),
        },
        metadata={"format": "pt"},
    )


def write(tmp_path, data: bytes, name="model.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_valid_file_reads_as_the_safetensors_library_reads_it(tmp_path):
    path = write(tmp_path, valid_file())
    tensors, metadata = read_safetensors_header(path)
    assert metadata == {"format": "pt"}
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(tensors)
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            assert torch.equal(tensors[name].read(), handle.get_tensor(name))


@pytest.mark.parametrize(
    "corrupt,expected",
    [
        (lambda data: overlap_last_two(data)[0], r"tensor '\w+' .*overlaps tensor"),
        (lambda data: data[:-3], r"ends at byte \d+ of the data but the file holds"),
        (lambda data: data + b"\0" * 8, r"the tensors cover \d+ data bytes but the file holds"),
        (lambda data: data[:5], "too short for a safetensors file"),
        (lambda data: set_header_length(data, 2**64 - 1), "header length .* is larger than"),
        (lambda data: set_header_length(data, MAX_HEADER_BYTES + 1), "header length"),
        (lambda data: set_header_length(data, 7), "not valid JSON"),
        (lambda data: set_field(data, "steps", "dtype", "Q4"), "tensor 'steps' has unknown dtype"),
        (lambda data: set_field(data, "steps", "shape", [4]), "tensor 'steps' of shape .* needs"),
        (lambda data: set_field(data, "steps", "shape", [-3]), "tensor 'steps' has shape"),
        (
            lambda data: set_field(data, "steps", "data_offsets", [8, 0]),
            "tensor 'steps' has data_offsets",
        ),
        (lambda data: join(b'{"a": 1, "a": 2}', b""), "names 'a' twice"),
        (lambda data: join(b"[1, 2]", b""), "must be a JSON object"),
        (lambda data: join(b'{"__metadata__": {"x": 1}}', b""), "__metadata__ must map"),
    ],
    ids=[
        "overlap",
        "truncated-data",
        "trailing-bytes",
        "shorter-than-length",
        "huge-header-length",
        "header-over-limit",
        "cut-header",
        "unknown-dtype",
        "shape-size-mismatch",
        "negative-shape",
        "reversed-offsets",
        "duplicate-name",
        "not-an-object",
        "metadata-not-strings",
    ],
)
def test_each_corruption_names_the_file_and_the_tensor(tmp_path, corrupt, expected):
    path = write(tmp_path, corrupt(valid_file()))
    with pytest.raises(CheckpointFormatError, match=expected) as caught:
        read_safetensors_header(path)
    assert str(path) in str(caught.value)


def test_a_gap_between_tensors_is_refused(tmp_path):
    header, area = split(valid_file())
    last = tensors_in_order(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 2, end + 2]
    path = write(tmp_path, join(header, area + b"\0\0"))
    with pytest.raises(CheckpointFormatError, match=f"no tensor holds data bytes.*'{last}'"):
        read_safetensors_header(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointFormatError, match="absent.safetensors"):
        read_safetensors_header(tmp_path / "absent.safetensors")


def test_in_memory_files_get_the_same_checks():
    data, name = overlap_last_two(valid_file())
    with pytest.raises(CheckpointFormatError, match=f"shard-3 key 17: tensor '{name}'"):
        check_safetensors_bytes(data, "shard-3 key 17")
    assert set(check_safetensors_bytes(valid_file(), "ok").tensors) == set(
        split(valid_file())[0]
    ) - {"__metadata__"}


def test_fuzzed_headers_are_refused_clearly_or_read_exactly_as_safetensors_does(tmp_path):
    """Random byte flips, truncations, header lengths, offsets, shapes and dtypes over a small
    valid file: each is refused with a CheckpointFormatError naming the file, or accepted only
    when the safetensors library reads the same tensors with the same data."""
    rng = random.Random(FUZZ_SEED)
    original = valid_file()
    path = tmp_path / "fuzzed.safetensors"
    refused = accepted = 0
    for case in range(FUZZ_CASES):
        kind, data = random_corruption(original, rng)
        path.write_bytes(data)
        try:
            tensors, _ = read_safetensors_header(path)
        except CheckpointFormatError as error:
            assert str(path) in str(error), (case, kind, str(error))
            refused += 1
            continue
        accepted += 1
        with safe_open(str(path), framework="pt") as handle:
            assert sorted(handle.keys()) == sorted(tensors), (case, kind)
            for name in tensors:
                expected = handle.get_tensor(name)
                assert tensors[name].dtype == expected.dtype, (case, kind, name)
                assert torch.equal(tensors[name].read(), expected), (case, kind, name)
    # most corruptions break the header; flips inside the data area or a name stay readable
    assert refused > FUZZ_CASES * 0.6 and accepted > 0
