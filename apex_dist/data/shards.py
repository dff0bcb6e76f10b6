"""Writing WebDataset shards: tar files of a target size, each complete before it is visible.

A shard is written as ``.<name>.tmp`` in its directory and renamed to ``<name>`` once closed, so a
reader (or a resumed tool) never sees a half-written shard. When the writer closes it merges
its shards' sample counts into the directory's ``index.json`` (written the same way), which the
streams use to count an epoch.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from apex_dist.atomic import atomic_path, atomic_write_bytes
from apex_dist.data.sources import INDEX_FILE_NAME

# Default shard size: large enough for efficient sequential reads from object storage, small
# enough that thousands of shards spread over many readers.
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
# A fixed modification time in every member keeps shards byte-identical across runs.
MEMBER_MTIME = 0


def write_atomically(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def update_index(directory: Path, counts: dict[str, int]) -> None:
    """Merge {shard name: sample count} into the directory's index.json."""
    path = directory / INDEX_FILE_NAME
    index = {"shards": {}}
    if path.exists():
        index = json.loads(path.read_text())
    index.setdefault("shards", {}).update(counts)
    index["total"] = sum(index["shards"].values())
    write_atomically(path, json.dumps(index, indent=1, sort_keys=True).encode())


class ShardWriter:
    """Writes samples into ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ...

    A new shard starts when the current one reaches `max_bytes` or `samples_per_shard` (0: no
    limit). Use as a context manager; `summary()` lists the shards written and their counts.
    """

    def __init__(
        self,
        output_prefix: str | Path,
        max_bytes: int = DEFAULT_SHARD_BYTES,
        samples_per_shard: int = 0,
        first_shard: int = 0,
    ):
        self.prefix = Path(output_prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.samples_per_shard = max_bytes, samples_per_shard
        self.next_shard = first_shard
        self.counts: dict[str, int] = {}
        self.archive: tarfile.TarFile | None = None
        self.current_name = ""
        self.current_count = 0
        self.current_bytes = 0

    def _start(self) -> None:
        self.current_name = f"{self.prefix.name}-{self.next_shard:06d}.tar"
        self.next_shard += 1
        temporary = self.prefix.parent / f".{self.current_name}.tmp"
        self.archive = tarfile.open(  # noqa: SIM115 - closed in _finish or abort
            temporary, "w", format=tarfile.USTAR_FORMAT
        )
        self.current_count = 0
        self.current_bytes = 0

    def _finish(self) -> None:
        if self.archive is None:
            return
        self.archive.close()
        temporary = self.prefix.parent / f".{self.current_name}.tmp"
        os.replace(temporary, self.prefix.parent / self.current_name)
        self.counts[self.current_name] = self.current_count
        self.archive = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps extensions (``txt``, ``jpg``, ...) to bytes."""
        if "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} must not contain a dot (it starts the extension)")
        # bytes in the tar: a header block per member and the data padded to whole blocks
        size = sum(
            tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            for data in members.values()
        )
        full = self.archive is not None and (
            (self.samples_per_shard and self.current_count >= self.samples_per_shard)
            or (self.max_bytes and self.current_bytes + size > self.max_bytes)
        )
        if full:
            self._finish()
        if self.archive is None:
            self._start()
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = MEMBER_MTIME
            info.mode = 0o644
            self.archive.addfile(info, io.BytesIO(data))
        self.current_count += 1
        self.current_bytes += size

    def close(self) -> None:
        self._finish()
        if self.counts:
            update_index(self.prefix.parent, self.counts)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file) after an error."""
        if self.archive is not None:
            self.archive.close()
            (self.prefix.parent / f".{self.current_name}.tmp").unlink(missing_ok=True)
            self.archive = None

    def summary(self) -> dict:
        return {"shards": dict(self.counts), "samples": sum(self.counts.values())}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        else:
            self.abort()
            if self.counts:
                update_index(self.prefix.parent, self.counts)


def write_shard(path: str | Path, samples) -> int:
    """Write (key, members) pairs into one tar at `path` (temporary name, then renamed).

    Returns the number of samples written. An error leaves no file at `path`.
    """
    count = 0
    with (
        atomic_path(path) as temporary,
        tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive,
    ):
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mtime = MEMBER_MTIME
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(data))
            count += 1
    return count
