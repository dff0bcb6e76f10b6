"""Data faults: stalled reads, hostile or broken samples, duplicate rows, odd shard URLs.

Every fault ends as a skipped, counted bad sample or as an error that names the shard (and the
key), never as a hang or a bare crash in collate.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from apex_dist.config import DataConfig
from apex_dist.data import DataQualityError, build_stream
from apex_dist.data.shards import ShardWriter
from apex_dist.data.sources import read_shard

# Read timeout of the tests: short, so that a stalled read is reported at once.
TEST_READ_TIMEOUT = 0.3
# Longest a test waits for a stream that should fail fast before calling it a hang.
HANG_LIMIT_SECONDS = 60


def write_prompt_shards(folder: Path, name="prompts", shards=2, per_shard=20) -> list[Path]:
    with ShardWriter(folder / name, samples_per_shard=per_shard) as writer:
        for index in range(shards * per_shard):
            writer.write(f"{name}-{index:05d}", {"txt": f"prompt number {index}".encode()})
    return [folder / f"{name}-{index:06d}.tar" for index in range(shards)]


def take(stream, count):
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def run_bounded(function, limit=HANG_LIMIT_SECONDS):
    """Run `function()` in a thread; return (result or exception, seconds); fail on a hang."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the test
            outcome["value"] = error

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still running after {limit} s: the read hangs"
    return outcome["value"], time.monotonic() - started


def processes_with(marker: str) -> list[int]:
    """Ids of processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in command:
            found.append(int(entry.name))
    return found


def wait_until_gone(marker: str, limit: float = 10.0) -> list[int]:
    deadline = time.monotonic() + limit
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return processes_with(marker)


# --------------------------------------------------------------------------------------------
# stalled reads (pipe: commands and files): a clear error naming the URL, never a hang


def test_a_stalled_pipe_stops_the_stream_with_an_error_naming_the_url(tmp_path):
    marker = "987651"  # sleep's argument identifies the command among the processes
    config = DataConfig(
        kind="webdataset",
        urls=[f"pipe:sleep {marker}"],
        read_timeout_seconds=TEST_READ_TIMEOUT,
    )
    error, seconds = run_bounded(lambda: take(build_stream(config, 0, 1, 4, seed=0), 1))
    assert isinstance(error, DataQualityError), error
    message = str(error)
    assert f"pipe:sleep {marker}" in message and "data.read_timeout_seconds" in message
    assert "3 shards in a row gave no data for 0.3 s" in message
    assert seconds < 20
    assert wait_until_gone(marker) == []  # the stalled commands were killed


def test_a_stalled_shard_among_good_ones_is_skipped_and_counted(tmp_path, caplog):
    marker = "987652"
    good = write_prompt_shards(tmp_path, shards=4, per_shard=30)
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "prompts-{000000..000003}.tar"), f"pipe:sleep {marker}"],
        weights=[0.9, 0.1],
        read_timeout_seconds=TEST_READ_TIMEOUT,
        max_bad_fraction=0.5,
        shuffle_buffer=16,
    )
    assert good
    stream = build_stream(config, 0, 1, 4, seed=0)
    with caplog.at_level(logging.WARNING, logger="apex_dist.data"):
        batches, _ = run_bounded(lambda: take(stream, 8))
    assert not isinstance(batches, BaseException), batches
    assert len(batches) == 8
    assert all(key.startswith("prompts-") for batch in batches for key in batch["key"])
    assert stream.stats()["bad"] >= 1
    assert f"no data from pipe:sleep {marker} for 0.3 s" in caplog.text
    assert wait_until_gone(marker) == []


def test_a_pipe_that_stalls_midway_gives_its_samples_then_an_error(tmp_path):
    (shard,) = write_prompt_shards(tmp_path, shards=1, per_shard=50)
    marker = "987653"
    url = f"pipe:head -c 6000 {shard}; sleep {marker}"
    samples, _ = run_bounded(lambda: list(read_shard(url, read_timeout=TEST_READ_TIMEOUT)))
    assert [sample.error for sample in samples[:-1]] == [None] * (len(samples) - 1)
    assert len(samples) > 3
    assert samples[-1].stalled and url in samples[-1].error
    assert wait_until_gone(marker) == []


def test_a_command_that_writes_much_to_standard_error_does_not_block(tmp_path):
    (shard,) = write_prompt_shards(tmp_path, shards=1, per_shard=10)
    # 1 MB on standard error before the tar: more than a pipe holds (64 kB on Linux)
    url = f"pipe:head -c 1000000 /dev/zero >&2; cat {shard}"
    samples, _ = run_bounded(lambda: list(read_shard(url, read_timeout=10)))
    assert [sample.error for sample in samples] == [None] * 10


def test_a_failing_command_after_its_output_is_reported_with_its_error(tmp_path):
    (shard,) = write_prompt_shards(tmp_path, shards=1, per_shard=5)
    samples = list(read_shard(f"pipe:cat {shard}; echo lost connection >&2; exit 4"))
    assert samples[-1].error is not None
    assert "exited with 4: lost connection" in samples[-1].error


def test_a_shard_url_that_names_a_directory_is_a_clear_bad_shard(tmp_path):
    (tmp_path / "shards").mkdir()
    (sample,) = list(read_shard(str(tmp_path / "shards")))
    assert "is a directory, not a tar shard" in sample.error
    assert "brace pattern" in sample.error
