"""Data faults: stalled reads, hostile or broken samples, duplicate rows, odd shard URLs.

Every fault ends as a skipped, counted bad sample or as an error that names the shard (and the
key), never as a hang or a bare crash in collate.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from corrupt_safetensors import overlap_last_two
from PIL import Image
from safetensors.torch import save as save_safetensors

from apex_dist.config import DataConfig
from apex_dist.data import DataQualityError, build_stream
from apex_dist.data.shards import ShardWriter
from apex_dist.data.sources import ShardIndexError, read_shard

# Read timeout of the tests: short, so that a stalled read is reported at once, but long
# enough for a local file's first bytes on a busy machine.
TEST_READ_TIMEOUT = 0.5
# Read timeout where a command's first bytes must arrive in time (the shell has to start).
COMMAND_START_TIMEOUT = 3.0
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
    assert "3 shards in a row gave no data for 0.5 s" in message
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
    assert f"no data from pipe:sleep {marker} for 0.5 s" in caplog.text
    assert wait_until_gone(marker) == []


def test_a_pipe_that_stalls_midway_gives_its_samples_then_an_error(tmp_path):
    (shard,) = write_prompt_shards(tmp_path, shards=1, per_shard=50)
    marker = "987653"
    url = f"pipe:head -c 6000 {shard}; sleep {marker}"
    samples, _ = run_bounded(lambda: list(read_shard(url, read_timeout=COMMAND_START_TIMEOUT)))
    assert [sample.error for sample in samples[:-1]] == [None] * (len(samples) - 1)
    assert len(samples) > 3
    assert samples[-1].stalled and url in samples[-1].error
    assert wait_until_gone(marker) == []


def test_a_command_that_writes_much_to_standard_error_does_not_block(tmp_path):
    (shard,) = write_prompt_shards(tmp_path, shards=1, per_shard=10)
    # 1 MB on standard error before the tar: more than a pipe holds (64 kB on Linux)
    url = f"pipe:head -c 1000000 /dev/zero >&2; cat {shard}"
    samples, _ = run_bounded(lambda: list(read_shard(url, read_timeout=COMMAND_START_TIMEOUT)))
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


# --------------------------------------------------------------------------------------------
# bad precomputed samples: skipped and counted with shard and key, never a collate crash


def precomputed(text, mask=None, latents=None, image_shape=(1, 2, 2)) -> bytes:
    tensors = {"text": text, "text_mask": torch.ones(text.shape[0], dtype=torch.uint8)}
    if mask is not None:
        tensors["text_mask"] = mask
    if latents is not None:
        tensors["latents"] = latents
        tensors["image_shape"] = torch.tensor(image_shape)
    return save_safetensors(tensors)


def good_row(index: int) -> bytes:
    return precomputed(torch.full((3, 6), float(index)), latents=torch.full((4, 3), float(index)))


def nan_text() -> bytes:
    text = torch.zeros(3, 6)
    text[1, 2] = float("nan")
    return precomputed(text, latents=torch.zeros(4, 3))


def inf_latents() -> bytes:
    latents = torch.zeros(4, 3)
    latents[0, 0] = float("inf")
    return precomputed(torch.zeros(3, 6), latents=latents)


def overlapping_member() -> bytes:
    return overlap_last_two(good_row(0))[0]


# key -> (safetensors member, the reason logged for it)
BAD_PRECOMPUTED = {
    "row-0005": (lambda: precomputed(torch.zeros(1, 3, 6)), "text must be (S, D)"),
    "row-0009": (lambda: precomputed(torch.zeros(3, 6, dtype=torch.int64)), "floating point"),
    "row-0013": (nan_text, "text holds 1 nan or inf value"),
    "row-0017": (inf_latents, "latents holds 1 nan or inf value"),
    "row-0021": (lambda: b"\x07not a safetensors file", "safetensors member"),
    "row-0025": (overlapping_member, "overlaps tensor"),
    "row-0029": (lambda: good_row(0)[:-5], "safetensors member"),
    "row-0033": (
        lambda: precomputed(torch.zeros(3, 5), latents=torch.zeros(4, 3)),
        "text width 5 differs from the 6 of this stream's first sample",
    ),
    "row-0037": (
        lambda: precomputed(torch.zeros(3, 6), latents=torch.zeros(4, 4)),
        "latent channels 4 differs from the 3",
    ),
    "row-0041": (
        lambda: precomputed(torch.zeros(3, 6), latents=torch.zeros(5, 3)),
        "N = frames * h * w = 4 for image_shape [1, 2, 2]",
    ),
    "row-0045": (
        lambda: precomputed(torch.zeros(3, 6), latents=torch.zeros(4, 3), image_shape=(1.0, 2, 2)),
        "image_shape must be 3 positive integers",
    ),
    "row-0049": (
        lambda: precomputed(torch.zeros(3, 6), mask=torch.ones(3), latents=torch.zeros(4, 3)),
        "text_mask must be bool or uint8",
    ),
    "row-0053": (lambda: precomputed(torch.zeros(0, 6)), "S >= 1"),
}


def write_precomputed_shard(folder: Path, rows=60) -> str:
    with ShardWriter(folder / "encoded", samples_per_shard=rows) as writer:
        for index in range(rows):
            key = f"row-{index:04d}"
            member = BAD_PRECOMPUTED[key][0]() if key in BAD_PRECOMPUTED else good_row(index)
            writer.write(key, {"safetensors": member, "txt": f"p{index}".encode()})
    return str(folder / "encoded-000000.tar")


def test_bad_precomputed_samples_are_skipped_and_logged_with_shard_and_key(tmp_path, caplog):
    url = write_precomputed_shard(tmp_path)
    config = DataConfig(
        kind="webdataset",
        urls=[url],
        sample_kind="precomputed",
        shuffle_buffer=1,  # read order: the first row read is a good one
        max_bad_fraction=0.5,
    )
    stream = build_stream(config, 0, 1, 4, seed=0)
    with caplog.at_level(logging.WARNING, logger="apex_dist.data"):
        batches = take(stream, 12)  # every row of the shard once (47 good rows, 11 batches)
    keys = {key for batch in batches for key in batch["key"]}
    assert keys.isdisjoint(BAD_PRECOMPUTED)
    for batch in batches:
        assert torch.isfinite(batch["text"]).all() and torch.isfinite(batch["latents"]).all()
        assert batch["text"].shape[2] == 6 and batch["latents"].shape[1:] == (4, 3)
        values = [float(key.split("-")[1]) for key in batch["key"]]
        assert batch["latents"][:, 0, 0].tolist() == values  # rows keep their own tensors
    for key, (_, reason) in BAD_PRECOMPUTED.items():
        assert f"shard encoded-000000.tar, key {key}: " in caplog.text, key
        line = next(line for line in caplog.text.splitlines() if f"key {key}:" in line)
        assert reason in line, (key, line)
    assert stream.stats()["bad"] >= len(BAD_PRECOMPUTED)


def test_too_many_bad_precomputed_samples_stop_with_an_error_naming_shard_and_key(tmp_path):
    url = write_precomputed_shard(tmp_path, rows=120)
    config = DataConfig(kind="webdataset", urls=[url], sample_kind="precomputed", shuffle_buffer=1)
    error, _ = run_bounded(lambda: take(build_stream(config, 0, 1, 4, seed=0), 100))
    assert isinstance(error, DataQualityError), error
    assert "max_bad_fraction=0.01" in str(error)
    assert "shard encoded-000000.tar, key row-00" in str(error)


def test_images_with_non_finite_pixels_give_finite_rows(tmp_path):
    """An image member is decoded to 8-bit RGB whatever it holds (here a float TIFF full of nan
    and inf under a .png name), so image rows are always finite and in [-1, 1]."""
    pixels = np.full((24, 24), np.nan, dtype=np.float32)
    pixels[:4] = np.inf
    pixels[4:8] = -np.inf
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, "TIFF")
    with ShardWriter(tmp_path / "images", samples_per_shard=10) as writer:
        for index in range(8):
            writer.write(f"image-{index}", {"png": buffer.getvalue(), "txt": b"a caption"})
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "images-000000.tar")],
        sample_kind="image_text",
        resolution=16,
        shuffle_buffer=8,
    )
    (batch,) = take(build_stream(config, 0, 1, 4, seed=0), 1)
    assert torch.isfinite(batch["image"]).all()
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


# --------------------------------------------------------------------------------------------
# no sample twice in a micro-batch; readers split by sample never share a sample


def reader_keys(config, ranks, workers, batches_per_rank, micro_batch_size):
    """{(rank, worker): [batch key lists]} from real DataLoader workers, fresh streams (batch b
    of a rank comes from worker b % workers), with a resume after an odd batch on rank 0."""
    found = {(rank, worker): [] for rank in range(ranks) for worker in range(workers)}
    for rank in range(ranks):
        stream = build_stream(config, rank, ranks, micro_batch_size, seed=5)
        head = take(stream, 3)
        resumed = build_stream(config, rank, ranks, micro_batch_size, seed=5)
        resumed.load_state_dict(stream.state_dict())
        batches = head + take(resumed, batches_per_rank - 3)
        for index, batch in enumerate(batches):
            found[(rank, index % workers)].append(batch["key"])
    return found


@pytest.mark.parametrize("shuffle_buffer", [1, 16, 1000])
def test_two_ranks_two_workers_never_repeat_a_sample_in_a_batch_or_across_readers(
    tmp_path, shuffle_buffer
):
    # 3 shards for 4 readers: split by sample, each reader keeps every 4th sample (9 per pass)
    write_prompt_shards(tmp_path, shards=3, per_shard=12)
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "prompts-{000000..000002}.tar")],
        num_workers=2,
        shuffle_buffer=shuffle_buffer,
    )
    found = reader_keys(config, ranks=2, workers=2, batches_per_rank=10, micro_batch_size=4)
    for (rank, worker), batches in found.items():
        for keys in batches:
            assert len(set(keys)) == len(keys), (rank, worker, keys)  # distinct in a micro-batch
        # reader rank * 2 + worker keeps every 4th sample of each shard (12 per shard), so the
        # four readers never share a sample, in a pass or across passes
        reader = rank * 2 + worker
        numbers = {int(key.split("-")[1]) for keys in batches for key in keys}
        assert {number % 4 for number in numbers} == {reader}, (rank, worker, sorted(numbers))
        assert len(numbers) >= 6  # 20 rows drawn from its 9 samples, pass after pass


def test_a_reader_with_fewer_samples_than_a_batch_stops_with_advice_instead_of_repeating(tmp_path):
    # 8 samples for 4 ranks: each rank keeps 2, never enough for 4 distinct rows
    write_prompt_shards(tmp_path, shards=1, per_shard=8)
    config = DataConfig(
        kind="webdataset", urls=[str(tmp_path / "prompts-000000.tar")], shuffle_buffer=16
    )
    error, _ = run_bounded(lambda: take(build_stream(config, 0, 4, 4, seed=0), 1))
    assert isinstance(error, DataQualityError), error
    assert "made no batch of 4 distinct samples" in str(error)
    assert "add data, use fewer ranks" in str(error)


def png(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_saved_position_with_pending_rows_of_the_earlier_format_resumes(tmp_path):
    with ShardWriter(tmp_path / "images", samples_per_shard=40) as writer:
        for index in range(40):
            size = (16, 16) if index % 2 else (16, 32)  # two buckets, rows wait in both
            writer.write(f"image-{index:03d}", {"png": png(*size), "txt": b"a caption"})
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "images-000000.tar")],
        sample_kind="image_text",
        resolution=32,
        aspect_buckets=[1.0, 3.0],
        shuffle_buffer=20,
    )
    uninterrupted = [batch["key"] for batch in take(build_stream(config, 0, 1, 3, seed=0), 4)]
    stream = build_stream(config, 0, 1, 3, seed=0)
    take(stream, 1)
    state = stream.state_dict()
    (position,) = state["positions"]
    assert position["pending"]  # rows of the other bucket wait
    # a position saved before waiting rows were grouped holds one flat list per bucket
    position["pending"] = {
        name: [index for group in groups for index in group]
        for name, groups in position["pending"].items()
    }
    resumed = build_stream(config, 0, 1, 3, seed=0)
    resumed.load_state_dict(state)
    assert [batch["key"] for batch in take(resumed, 3)] == uninterrupted[1:]


# --------------------------------------------------------------------------------------------
# captions and index files


def test_a_caption_that_is_not_utf8_is_a_bad_sample_with_a_clear_reason(tmp_path, caplog):
    with ShardWriter(tmp_path / "latin", samples_per_shard=50) as writer:
        for index in range(40):
            caption = "café".encode("latin-1") if index == 7 else f"prompt {index}".encode()
            writer.write(f"row-{index:03d}", {"txt": caption})
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "latin-000000.tar")],
        shuffle_buffer=40,
        max_bad_fraction=0.5,
    )
    with caplog.at_level(logging.WARNING, logger="apex_dist.data"):
        batches = take(build_stream(config, 0, 1, 4, seed=0), 9)
    assert "row-007" not in {key for batch in batches for key in batch["key"]}
    assert "key row-007: txt caption is not UTF-8 (byte 0xe9 at position 3)" in caplog.text


def test_an_index_with_counts_that_are_not_counts_is_refused(tmp_path):
    write_prompt_shards(tmp_path, shards=2, per_shard=10)
    index = tmp_path / "index.json"
    urls = [str(tmp_path / "prompts-{000000..000001}.tar")]
    index.write_text(json.dumps({"shards": {"prompts-000000.tar": -10, "prompts-000001.tar": 10}}))
    with pytest.raises(ShardIndexError, match=r"index.json: sample counts must be non-negative"):
        build_stream(DataConfig(kind="webdataset", urls=urls), 0, 1, 4, seed=0)
    index.write_text("{not json")
    with pytest.raises(ShardIndexError, match="is not valid JSON.*set data.epoch_samples"):
        build_stream(DataConfig(kind="webdataset", urls=urls), 0, 1, 4, seed=0)
    # the advice works: with epoch_samples the index is not needed
    fixed = DataConfig(kind="webdataset", urls=urls, epoch_samples=20)
    assert build_stream(fixed, 0, 1, 4, seed=0).batches_per_epoch == 5


def test_an_index_whose_count_differs_from_the_shard_is_reported(tmp_path, caplog):
    write_prompt_shards(tmp_path, shards=1, per_shard=12)
    (tmp_path / "index.json").write_text(json.dumps({"shards": {"prompts-000000.tar": 1000}}))
    config = DataConfig(kind="webdataset", urls=[str(tmp_path / "prompts-000000.tar")])
    stream = build_stream(config, 0, 1, 4, seed=0)
    assert stream.batches_per_epoch == 250  # what the index claims
    with caplog.at_level(logging.WARNING, logger="apex_dist.data"):
        take(stream, 5)
    assert "prompts-000000.tar holds 12 samples but" in caplog.text
    assert "index.json says 1000" in caplog.text
