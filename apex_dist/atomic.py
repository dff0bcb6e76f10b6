"""Files that appear complete or not at all.

Every file apex_dist publishes (configs, checkpoints' small files, run ids, validation grids,
shards, exports' info files) is written under a unique temporary name in the target's own
directory, flushed to disk, and renamed over the target in one step. A crash or a full disk
leaves either the old file or the new one, never half of one; the temporary file is removed
when writing fails. The published file gets the mode a plain `open` would give it (0666 less
the umask), or keeps the mode of the file it replaces, rather than the private 0600 of the
temporary file: a teammate or a serving job that can read the folder can read the export.

    with atomic_path(path) as temporary:       # any writer that takes a path
        image.save(temporary, format="PNG")
    atomic_write_text(path, text)
    atomic_write_json(path, value)             # strict JSON (no NaN)
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask, read from /proc where the kernel reports it (changing the umask to
    read it would race with threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> int:
    """The replaced file's permission bits, or those a new file gets from `open`."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _sync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`.

    Args:
        path: the file to publish.
        durable: flush the file to disk before the rename (off for files rewritten every few
            seconds, such as heartbeats, whose loss in a power cut does not matter).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, _publish_mode(path))
        if durable:
            _sync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_path(path, durable) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    with atomic_path(path, durable) as temporary:
        temporary.write_text(text)


def atomic_write_json(path: str | os.PathLike, value: Any, durable: bool = True) -> None:
    """`value` as indented, strict JSON (nan or inf raise ValueError before anything is written)."""
    atomic_write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n", durable)
