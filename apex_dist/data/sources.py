"""Shard sources: URL patterns, opening local files and `pipe:` commands, reading tar samples.

A WebDataset shard is a plain tar file whose members are grouped into samples by key: the
member ``images/000123.jpg`` has key ``images/000123`` and extension ``jpg`` (everything after
the first dot of the file name). Members of one sample are consecutive in the tar.

Shard URLs are local paths (optionally ``file:``-prefixed), or ``pipe:COMMAND`` where the command
writes the tar to its standard output (how object storage is read: ``pipe:aws s3 cp s3://b/x.tar
-``). Brace patterns expand to shard lists: ``data/prompts-{000000..000999}.tar`` (numeric ranges
keep the zero padding) and ``data/{train,extra}.tar`` (alternatives).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The file make_shards.py writes beside its shards: {"shards": {name: sample count}, ...}.
INDEX_FILE_NAME = "index.json"

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


class ShardReadError(RuntimeError):
    """A shard could not be opened or read to its end (missing file, corrupt tar, failed pipe)."""


def expand_urls(pattern: str) -> list[str]:
    """Expand every brace group of a shard pattern, left to right, into a list of URLs."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        start, stop = int(first), int(last)
        if stop < start:
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} goes backwards")
        choices = [str(number).zfill(width) for number in range(start, stop + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(
            f"shard pattern {pattern!r}: brace group {{{body}}} is neither a range "
            "{000..099} nor a list {a,b}"
        )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [url for choice in choices for url in expand_urls(head + choice + tail)]


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def local_path(url: str) -> str:
    return url[len("file:") :] if url.startswith("file:") else url


def shard_name(url: str) -> str:
    """A short name for logs: the file name of a local shard, the command of a pipe."""
    if url.startswith("pipe:"):
        return url
    return os.path.basename(local_path(url))


def indexed_sample_count(urls: list[str]) -> int | None:
    """Total sample count of local shards from make_shards' index files; None if any is unknown."""
    total = 0
    indexes: dict[str, dict] = {}
    for url in urls:
        if not is_local(url):
            return None
        path = Path(local_path(url))
        directory = str(path.parent)
        if directory not in indexes:
            try:
                indexes[directory] = json.loads((path.parent / INDEX_FILE_NAME).read_text())
            except (OSError, ValueError):
                return None
        count = indexes[directory].get("shards", {}).get(path.name)
        if not isinstance(count, int):
            return None
        total += count
    return total


@dataclass
class RawSample:
    """One sample as read from a tar: its members' bytes by extension, or the read error."""

    url: str
    key: str
    index: int  # position of the sample in its shard, counting from 0
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None

    def describe(self) -> str:
        return f"shard {shard_name(self.url)}, key {self.key}"


# A tar ends with two zero blocks of 512 bytes; without them the shard was cut short.
END_OF_ARCHIVE_BYTES = 1024


class _CountingReader:
    """Counts the bytes read from a stream (to find a tar's missing end-of-archive marker)."""

    def __init__(self, stream):
        self.stream = stream
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


# How long a command whose output broke off is given to exit, to report its status.
PIPE_EXIT_WAIT_SECONDS = 5.0


class _PipeReader:
    """Standard output of a shell command; the command's failure surfaces as ShardReadError."""

    def __init__(self, command: str):
        self.command = command
        self.process = subprocess.Popen(
            command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def read(self, size: int = -1) -> bytes:
        return self.process.stdout.read(size)

    def close(self, finished: bool, failed: bool = False) -> None:
        """Stop the command; if it ran to its end (or its output broke off), check its status.

        A stream closed early (the consumer stopped) kills the command without a check.
        """
        if failed:
            # the output ended in the middle of the tar: did the command fail?
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=PIPE_EXIT_WAIT_SECONDS)
        if self.process.poll() is None and not finished:
            self.process.kill()
        self.process.stdout.close()
        error = self.process.stderr.read().decode(errors="replace").strip()
        self.process.stderr.close()
        status = self.process.wait()
        if (finished or failed) and status != 0:
            raise ShardReadError(f"command {self.command!r} exited with {status}: {error[-500:]}")


def _split_name(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, extension = base.split(".", 1)
    return (os.path.join(directory, stem) if directory else stem), extension.lower()


def read_shard(url: str, skip: int = 0) -> Iterator[RawSample]:
    """Yield the samples of one shard in order, from sample number `skip` on.

    Skipped samples are read past without being kept. A read problem (missing file, corrupt or
    truncated tar, failed command) ends the shard with one RawSample whose `error` says what
    happened, keyed by the sample being read at the time; the samples before it are yielded.
    """
    pipe = None
    finished = False
    index = 0
    key = "<shard>"
    try:
        if url.startswith("pipe:"):
            pipe = _PipeReader(url[len("pipe:") :])
            stream = pipe
        elif "://" in url:
            raise ShardReadError(
                f"URL scheme of {url!r} is not read directly: use pipe:COMMAND with a command "
                "that writes the tar to standard output (for example pipe:curl -s URL)"
            )
        else:
            stream = open(local_path(url), "rb")  # noqa: SIM115 - closed in finally
        members: dict[str, bytes] = {}
        current = None
        counted = _CountingReader(stream)
        failed = False
        try:
            with tarfile.open(fileobj=counted, mode="r|*") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    key, extension = _split_name(info.name)
                    if current is not None and key != current:
                        if index >= skip:
                            yield RawSample(url, current, index, members)
                        index += 1
                        members = {}
                    current = key
                    handle = archive.extractfile(info)
                    data = handle.read() if index >= skip else b""
                    if index >= skip and len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} is truncated")
                    members[extension] = data
                # tarfile ends quietly at a cut header: check the end-of-archive marker
                counted.drain()
                if counted.total - archive.offset < END_OF_ARCHIVE_BYTES:
                    raise tarfile.ReadError(
                        "the tar has no end-of-archive marker: the shard is truncated"
                    )
            if current is not None and index >= skip:
                yield RawSample(url, current, index, members)
            finished = True
        except (OSError, tarfile.TarError, EOFError, zlib.error):
            failed = True
            raise
        finally:
            if pipe is None:
                stream.close()
            else:
                pipe.close(finished, failed)
    except (OSError, tarfile.TarError, EOFError, ShardReadError, zlib.error) as error:
        if index >= skip:
            yield RawSample(url, key, index, error=f"{type(error).__name__}: {error}")
