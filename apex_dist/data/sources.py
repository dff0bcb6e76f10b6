"""Shard sources: URL patterns, opening local files and `pipe:` commands, reading tar samples.

A WebDataset shard is a plain tar file whose members are grouped into samples by key: the
member ``images/000123.jpg`` has key ``images/000123`` and extension ``jpg`` (everything after
the first dot of the file name). Members of one sample are consecutive in the tar.

Shard URLs are local paths (optionally ``file:``-prefixed), or ``pipe:COMMAND`` where the command
writes the tar to its standard output (how object storage is read: ``pipe:aws s3 cp s3://b/x.tar
-``). Brace patterns expand to shard lists: ``data/prompts-{000000..000999}.tar`` (numeric ranges
keep the zero padding) and ``data/{train,extra}.tar`` (alternatives).

A ``pipe:`` URL runs its command through the shell with the rights of the training process:
pipe sources belong in trusted configs only (see docs/data.md).

Every read of a shard, from a file or a command, waits at most `read_timeout` seconds for data
(`data.read_timeout_seconds`): the bytes are read in a helper thread, so a stalled command or
network filesystem ends the shard with `ReadStalled` (a `ShardReadError` naming the URL)
instead of blocking the reader for ever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from apex_dist.config import DEFAULT_READ_TIMEOUT_SECONDS

logger = logging.getLogger("apex_dist.data")

# The file make_shards.py writes beside its shards: {"shards": {name: sample count}, ...}.
INDEX_FILE_NAME = "index.json"

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


class ShardReadError(RuntimeError):
    """A shard could not be opened or read to its end (missing file, corrupt tar, failed pipe)."""


class ReadStalled(ShardReadError):
    """No data arrived from a shard within the read timeout (a stalled command or filesystem)."""


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


class ShardIndexError(ValueError):
    """An index.json beside the shards that is not a usable make_shards index."""


def read_index(directory: str | os.PathLike) -> dict[str, int] | None:
    """{shard name: sample count} from the index.json in `directory`; None when there is none.

    Raises ShardIndexError for an index that is not valid JSON or whose counts are not
    non-negative integers (the epoch length would come out wrong).
    """
    path = Path(directory) / INDEX_FILE_NAME
    try:
        text = path.read_text()
    except OSError:
        return None
    advice = "fix or delete it (make_shards writes it), or set data.epoch_samples"
    try:
        index = json.loads(text)
    except ValueError as error:
        raise ShardIndexError(f"{path} is not valid JSON ({error}): {advice}") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, dict):
        raise ShardIndexError(f"{path} has no 'shards' mapping of shard name to count: {advice}")
    wrong = {
        name: count
        for name, count in shards.items()
        if isinstance(count, bool) or not isinstance(count, int) or count < 0
    }
    if wrong:
        raise ShardIndexError(
            f"{path}: sample counts must be non-negative integers (got {wrong}): {advice}"
        )
    return shards


def indexed_sample_count(urls: list[str]) -> int | None:
    """Total sample count of local shards from make_shards' index files; None if any is unknown.

    Raises ShardIndexError for an index that exists but cannot be used.
    """
    total = 0
    indexes: dict[str, dict[str, int] | None] = {}
    for url in urls:
        if not is_local(url):
            return None
        path = Path(local_path(url))
        directory = str(path.parent)
        if directory not in indexes:
            indexes[directory] = read_index(directory)
        count = (indexes[directory] or {}).get(path.name)
        if count is None:
            return None
        total += count
    return total


# Local shards whose sample count was found to differ from their index.json (warned once each).
_MISCOUNTED_SHARDS: set[str] = set()


def _check_indexed_count(url: str, count: int) -> None:
    """Warn once when a local shard read to its end holds another count than its index says."""
    if not is_local(url) or url in _MISCOUNTED_SHARDS:
        return
    path = Path(local_path(url))
    try:
        expected = (read_index(path.parent) or {}).get(path.name)
    except ShardIndexError:
        return  # reported when the stream was built
    if expected is not None and expected != count:
        _MISCOUNTED_SHARDS.add(url)
        logger.warning(
            "shard %s holds %d samples but %s says %d: the epoch length taken from the index "
            "is off; rebuild the index (make_shards) or set data.epoch_samples",
            url,
            count,
            path.parent / INDEX_FILE_NAME,
            expected,
        )


@dataclass
class RawSample:
    """One sample as read from a tar: its members' bytes by extension, or the read error."""

    url: str
    key: str
    index: int  # position of the sample in its shard, counting from 0
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    stalled: bool = False  # the error is a read that timed out

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


# How long a command whose output ended (or broke off) is given to exit, to report its status.
PIPE_EXIT_WAIT_SECONDS = 5.0
# Bytes read at once by the helper thread of a shard: large sequential reads for object storage
# and network filesystems, while the read-ahead below bounds memory per open shard to 4 MiB.
READ_CHUNK_BYTES = 1 << 20
READ_AHEAD_CHUNKS = 4
# How often a helper thread blocked on a full read-ahead queue checks whether it was stopped.
HANDOFF_POLL_SECONDS = 0.1
# Bytes of a command's standard error kept for its error message.
STDERR_TAIL_BYTES = 2000


class _TimedReader:
    """A byte stream read ahead by a helper thread, so that every `read` can time out.

    A blocking read of a stalled pipe or network filesystem cannot be interrupted; the helper
    thread absorbs the wait (and the open, which can stall as well), and `read` raises
    `ReadStalled` after `timeout` seconds without data. The thread is a daemon: one stuck in
    the kernel is abandoned, not waited for.
    """

    def __init__(self, open_stream, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.chunks: queue.Queue = queue.Queue(maxsize=READ_AHEAD_CHUNKS)
        self.stopped = threading.Event()
        self.current, self.offset, self.ended = b"", 0, False
        self.stream = None
        self.thread = threading.Thread(
            target=self._pump, args=(open_stream,), name=f"read {shard_name(url)}", daemon=True
        )
        self.thread.start()

    def _pump(self, open_stream) -> None:
        try:
            self.stream = open_stream()
            if self.stopped.is_set():  # closed while the open was under way
                self.stream.close()
                return
            while not self.stopped.is_set():
                data = self.stream.read(READ_CHUNK_BYTES)
                self._hand_over(data)  # b"" tells the reader the stream ended
                if not data:
                    return
        except Exception as error:  # handed to the reader, which raises it
            self._hand_over(error)

    def _hand_over(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.chunks.put(item, timeout=HANDOFF_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes: fewer at the end of a read-ahead chunk (the rest of the chunk for
        a negative size), b"" at the end of the stream; tarfile reads on until it has enough."""
        if self.ended:
            return b""
        if self.offset == len(self.current):
            try:
                item = self.chunks.get(timeout=self.timeout)
            except queue.Empty:
                raise ReadStalled(
                    f"no data from {self.url} for {self.timeout:g} s "
                    "(data.read_timeout_seconds): the storage or the command stalled; check "
                    "that it still answers, or raise the timeout for slow storage"
                ) from None
            if isinstance(item, Exception):
                raise item
            if not item:
                self.ended = True
                return b""
            self.current, self.offset = item, 0
        stop = len(self.current) if size < 0 else min(len(self.current), self.offset + size)
        data = self.current[self.offset : stop]
        self.offset = stop
        return data

    def close(self) -> None:
        """Stop the helper thread (it exits at its next hand-over) and close a file it opened."""
        self.stopped.set()
        if self.stream is not None:
            self.stream.close()


class _PipeReader:
    """Standard output of a shell command; the command's failure surfaces as ShardReadError.

    The command runs in its own process group, so that stopping it also stops the commands it
    started (a pipeline, or a `sleep` in a shell); its standard error is collected by a thread
    (a command that writes much there must not block on a full pipe).
    """

    def __init__(self, command: str, url: str, timeout: float):
        self.command = command
        self.process = subprocess.Popen(
            command,
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
        )
        self.output = _TimedReader(lambda: self.process.stdout, url, timeout)
        self.error_tail = bytearray()
        self.error_thread = threading.Thread(
            target=self._collect_errors, name=f"stderr {command[:40]}", daemon=True
        )
        self.error_thread.start()

    def _collect_errors(self) -> None:
        while data := self.process.stderr.read(READ_CHUNK_BYTES):
            self.error_tail += data
            del self.error_tail[:-STDERR_TAIL_BYTES]

    def read(self, size: int = -1) -> bytes:
        return self.output.read(size)

    def _stop(self) -> None:
        # the group may have exited already
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def close(self, finished: bool, failed: bool = False) -> None:
        """Stop the command; if it ran to its end (or its output broke off), check its status.

        A stream closed early (the consumer stopped, or a read stalled) kills the command
        without a check; a command that does not exit within PIPE_EXIT_WAIT_SECONDS after its
        output ended is killed and reported.
        """
        lingered = False
        if finished or failed:
            try:
                self.process.wait(timeout=PIPE_EXIT_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                lingered = True
        self._stop()
        self.output.close()
        status = self.process.wait()
        self.error_thread.join(timeout=PIPE_EXIT_WAIT_SECONDS)
        self.process.stderr.close()
        error = self.error_tail.decode(errors="replace").strip()[-500:]
        if lingered and finished:
            raise ShardReadError(
                f"command {self.command!r} did not exit within {PIPE_EXIT_WAIT_SECONDS:g} s "
                f"after its output ended and was killed: {error}"
            )
        if (finished or failed) and status != 0 and not lingered:
            raise ShardReadError(f"command {self.command!r} exited with {status}: {error}")


def _split_name(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, extension = base.split(".", 1)
    return (os.path.join(directory, stem) if directory else stem), extension.lower()


def read_shard(
    url: str, skip: int = 0, read_timeout: float = DEFAULT_READ_TIMEOUT_SECONDS
) -> Iterator[RawSample]:
    """Yield the samples of one shard in order, from sample number `skip` on.

    Skipped samples are read past without being kept. A read problem (missing file, corrupt or
    truncated tar, failed command, no data for `read_timeout` seconds) ends the shard with one
    RawSample whose `error` says what happened, keyed by the sample being read at the time; the
    samples before it are yielded.
    """
    pipe = None
    finished = False
    index = 0
    key = "<shard>"
    try:
        if url.startswith("pipe:"):
            pipe = _PipeReader(url[len("pipe:") :], url, read_timeout)
            stream = pipe
        elif "://" in url:
            raise ShardReadError(
                f"URL scheme of {url!r} is not read directly: use pipe:COMMAND with a command "
                "that writes the tar to standard output (for example pipe:curl -s URL)"
            )
        elif os.path.isdir(local_path(url)):
            raise ShardReadError(
                f"{url} is a directory, not a tar shard: name the shard files (a brace pattern "
                "such as dir/prefix-{000000..000099}.tar)"
            )
        else:
            path = local_path(url)
            # unbuffered: the helper thread reads large chunks itself
            stream = _TimedReader(
                lambda: open(path, "rb", buffering=0),  # noqa: SIM115 - closed by the reader
                url,
                read_timeout,
            )
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
            _check_indexed_count(url, index + 1 if current is not None else 0)
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
            yield RawSample(
                url,
                key,
                index,
                error=f"{type(error).__name__}: {error}",
                stalled=isinstance(error, ReadStalled),
            )
