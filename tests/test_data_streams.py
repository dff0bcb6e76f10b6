"""WebDataset streams: splitting, resume, buckets, bad data, pipes, mixing, precomputed rows."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from apex_dist.config import DataConfig
from apex_dist.data import DataQualityError, DataStateError, build_stream
from apex_dist.data.shards import ShardWriter
from apex_dist.data.sources import expand_urls


def write_prompt_shards(folder, name="prompts", shards=6, per_shard=40):
    with ShardWriter(folder / name, samples_per_shard=per_shard) as writer:
        for index in range(shards * per_shard):
            writer.write(f"{name}-{index:05d}", {"txt": f"prompt number {index}".encode()})
    return str(folder / f"{name}-{{000000..{shards - 1:06d}}}.tar")


def png(height, width, value=128):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def take(stream, count):
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def keys_of(batches):
    return [batch["key"] for batch in batches]


def test_brace_patterns_expand_ranges_and_lists():
    assert expand_urls("d/p-{000..002}.tar") == ["d/p-000.tar", "d/p-001.tar", "d/p-002.tar"]
    assert expand_urls("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert expand_urls("pipe:cat s-{08..10}.tar") == [
        "pipe:cat s-08.tar",
        "pipe:cat s-09.tar",
        "pipe:cat s-10.tar",
    ]


@pytest.mark.parametrize("shards", [6, 1], ids=["split-by-shard", "split-by-sample"])
def test_two_ranks_two_workers_resume_gives_the_uninterrupted_keys(tmp_path, shards):
    urls = write_prompt_shards(tmp_path, shards=shards, per_shard=240 // shards)
    config = DataConfig(kind="webdataset", urls=[urls], shuffle_buffer=24, num_workers=2)
    total, stop = 11, 5  # stop after an odd batch: the resumed loader starts with worker 1
    for rank in range(2):

        def build(rank=rank):
            return build_stream(config, rank=rank, world_size=2, micro_batch_size=4, seed=3)

        uninterrupted = keys_of(take(build(), total))
        first = build()
        head = keys_of(take(first, stop))
        state = first.state_dict()
        resumed = build()
        resumed.load_state_dict(state)
        tail = keys_of(take(resumed, total - stop))
        assert head + tail == uninterrupted
        assert resumed.state_dict()["batches"] == total
    # within a first pass over the data the two ranks and their workers read disjoint samples
    rank_keys = [
        {
            key
            for keys in keys_of(
                take(build_stream(config, rank=r, world_size=2, micro_batch_size=4, seed=3), 10)
            )
            for key in keys
        }
        for r in range(2)
    ]
    assert len(rank_keys[0]) == len(rank_keys[1]) == 40
    assert not rank_keys[0] & rank_keys[1]


def test_seed_changes_the_order_and_state_mismatch_is_rejected(tmp_path):
    urls = write_prompt_shards(tmp_path)
    config = DataConfig(kind="webdataset", urls=[urls], shuffle_buffer=24)
    first = keys_of(take(build_stream(config, 0, 2, 4, seed=0), 3))
    assert first != keys_of(take(build_stream(config, 0, 2, 4, seed=1), 3))
    stream = build_stream(config, 0, 2, 4, seed=0)
    take(stream, 2)
    with pytest.raises(DataStateError, match="world_size"):
        build_stream(config, 0, 4, 4, seed=0).load_state_dict(stream.state_dict())
    with pytest.raises(DataStateError, match="other data settings"):
        build_stream(config, 0, 2, 8, seed=0).load_state_dict(stream.state_dict())


def test_epoch_length_comes_from_the_shard_index(tmp_path):
    urls = write_prompt_shards(tmp_path, shards=6, per_shard=40)
    config = DataConfig(kind="webdataset", urls=[urls])
    stream = build_stream(config, 0, 2, 4, seed=0)
    assert stream.batches_per_epoch == 240 // (2 * 4)
    take(stream, 31)
    assert stream.epoch == 1
    fixed = DataConfig(kind="webdataset", urls=[urls], epoch_samples=80)
    assert build_stream(fixed, 0, 2, 4, seed=0).batches_per_epoch == 10


def test_aspect_buckets_batch_one_size_and_resume_with_waiting_rows(tmp_path):
    sizes = [(40, 40), (30, 40), (40, 30), (20, 60)]  # square, landscape, portrait, wide
    with ShardWriter(tmp_path / "images", samples_per_shard=20) as writer:
        for index in range(60):
            height, width = sizes[index % len(sizes)]
            writer.write(
                f"image-{index:04d}",
                {"png": png(height, width, value=index), "txt": f"image {index}".encode()},
            )
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "images-{000000..000002}.tar")],
        sample_kind="image_text",
        resolution=64,
        aspect_buckets=[1.0, 4 / 3, 3 / 4],
        shuffle_buffer=30,
    )
    batches = take(build_stream(config, 0, 1, 3, seed=0), 12)
    shapes = Counter(tuple(batch["image"].shape[2:]) for batch in batches)
    assert set(shapes) <= {(64, 64), (48, 80), (80, 48)} and len(shapes) == 3
    for batch in batches:
        assert batch["image"].shape[0] == 3 and len(batch["prompt"]) == 3
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    # the pixel value encodes the sample index: the image belongs to its key
    first = batches[0]
    index = int(first["key"][0].split("-")[1])
    assert first["image"][0, 0, 24, 24].item() == pytest.approx(index / 127.5 - 1, abs=1e-4)
    for stop in range(1, 6):
        stream = build_stream(config, 0, 1, 3, seed=0)
        head = take(stream, stop)
        state = stream.state_dict()
        resumed = build_stream(config, 0, 1, 3, seed=0)
        resumed.load_state_dict(state)
        assert keys_of(head + take(resumed, 12 - stop)) == keys_of(batches)
    assert any(position["pending"] for position in state["positions"])


def corrupt_shards(folder):
    """Three shards: a good one, one with bad samples, one truncated halfway."""
    with ShardWriter(folder / "good", samples_per_shard=100) as writer:
        for index in range(100):
            writer.write(f"good-{index:04d}", {"png": png(8, 8), "txt": b"fine"})
    with ShardWriter(folder / "bad", samples_per_shard=100) as writer:
        for index in range(100):
            members = {"png": png(8, 8), "txt": b"fine"}
            if index == 10:
                members["png"] = b"not an image"
            if index == 20:
                members["txt"] = b"   "
            if index == 30:
                del members["png"]
            writer.write(f"bad-{index:04d}", members)
    with ShardWriter(folder / "cut", samples_per_shard=100) as writer:
        for index in range(100):
            writer.write(f"cut-{index:04d}", {"png": png(8, 8), "txt": b"fine"})
    path = folder / "cut-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # cuts inside a member
    return [str(folder / name) for name in ("good-000000.tar", "bad-000000.tar", "cut-000000.tar")]


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    urls = corrupt_shards(tmp_path)
    config = DataConfig(
        kind="webdataset",
        urls=urls,
        sample_kind="image_text",
        resolution=16,
        shuffle_buffer=1,
        max_bad_fraction=0.2,
        shuffle_shards=1,
    )
    stream = build_stream(config, 0, 1, 4, seed=0)
    with caplog.at_level(logging.WARNING, logger="apex_dist.data"):
        batches = take(stream, 120)
    keys = {key for batch in batches for key in batch["key"]}
    assert {"bad-0010", "bad-0020", "bad-0030"}.isdisjoint(keys)
    # every good sample is used, except rows left over in a chunk (fewer than a batch each)
    assert sum(key.startswith("bad-") for key in keys) > 80
    assert "good-0099" in keys and "cut-0000" in keys
    log = caplog.text
    assert "shard bad-000000.tar, key bad-0010" in log and "cannot identify image" in log
    assert "key bad-0020: empty caption" in log
    assert "key bad-0030: no image member" in log
    assert "shard cut-000000.tar" in log and "truncated" in log
    stats = stream.stats()
    assert stats["bad"] >= 4  # three bad samples and the cut, once per shard visit
    assert all(batch["image"].shape == (4, 3, 16, 16) for batch in batches)


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path):
    with ShardWriter(tmp_path / "empty", samples_per_shard=100) as writer:
        for index in range(300):
            writer.write(f"row-{index:04d}", {"txt": b"ok" if index % 3 else b""})
    config = DataConfig(
        kind="webdataset", urls=[str(tmp_path / "empty-{000000..000002}.tar")], num_workers=1
    )
    with pytest.raises(DataQualityError, match=r"max_bad_fraction=0.01.*\n.*empty caption"):
        take(build_stream(config, 0, 1, 4, seed=0), 1000)
    # the same data passes with a limit above its fraction of bad rows (one in three)
    tolerant = DataConfig(kind="webdataset", urls=config.urls, max_bad_fraction=0.4)
    assert len(take(build_stream(tolerant, 0, 1, 4, seed=0), 100)) == 100


def test_missing_or_empty_shards_fail_clearly_instead_of_hanging(tmp_path):
    config = DataConfig(kind="webdataset", urls=[str(tmp_path / "none-{0..3}.tar")])
    with pytest.raises(DataQualityError, match=r"100 of 100 samples.*were bad.*\n.*none-\d.tar"):
        take(build_stream(config, 0, 1, 4, seed=0), 1)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass  # a valid tar without members
    empty = DataConfig(kind="webdataset", urls=[str(tmp_path / "empty.tar")])
    with pytest.raises(DataQualityError, match="gave no samples"):
        take(build_stream(empty, 0, 1, 4, seed=0), 1)


def test_pipe_sources_mix_by_weight(tmp_path):
    first = write_prompt_shards(tmp_path, name="first", shards=2, per_shard=200)
    second = write_prompt_shards(tmp_path, name="second", shards=2, per_shard=200)
    config = DataConfig(
        kind="webdataset",
        urls=[f"pipe:cat {first}", second],
        weights=[3.0, 1.0],
        shuffle_buffer=16,
    )
    keys = [
        key for batch in take(build_stream(config, 0, 1, 8, seed=0), 50) for key in batch["key"]
    ]
    share = sum(key.startswith("first") for key in keys) / len(keys)
    assert 0.65 < share < 0.85
    failing = DataConfig(kind="webdataset", urls=["pipe:echo broken >&2; exit 3"])
    with pytest.raises(DataQualityError, match="exited with 3: broken"):
        take(build_stream(failing, 0, 1, 4, seed=0), 1)


def test_precomputed_rows_are_padded_to_the_longest_text(tmp_path):
    with ShardWriter(tmp_path / "encoded", samples_per_shard=50) as writer:
        for index in range(24):
            length = 2 + index % 5
            tensors = {
                "text": torch.full((length, 6), float(index)),
                "text_mask": torch.ones(length, dtype=torch.uint8),
                "latents": torch.full((4, 3), float(index)),
                "image_shape": torch.tensor([1, 2, 2]),
            }
            writer.write(
                f"row-{index:03d}",
                {"safetensors": save_safetensors(tensors), "txt": f"p{index}".encode()},
            )
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "encoded-000000.tar")],
        sample_kind="precomputed",
        shuffle_buffer=24,
    )
    for batch in take(build_stream(config, 0, 1, 4, seed=0), 5):
        lengths = [2 + int(key.split("-")[1]) % 5 for key in batch["key"]]
        assert batch["text"].shape == (4, max(lengths), 6)
        assert batch["text_mask"].sum(dim=1).tolist() == lengths
        assert batch["latents"].shape == (4, 4, 3) and batch["image_shape"] == (1, 2, 2)
        assert batch["text"][~batch["text_mask"]].abs().sum() == 0
        values = [int(key.split("-")[1]) for key in batch["key"]]
        assert batch["latents"][:, 0, 0].tolist() == values
