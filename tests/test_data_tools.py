"""tools/make_shards.py, tools/encode_prompts.py and tools/bench_data.py."""

from __future__ import annotations

import csv
import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from apex_dist.config import DataConfig
from apex_dist.data import build_stream
from apex_dist.data.sources import read_shard
from apex_tools import bench_data, encode_prompts, make_shards


def run_make_shards(capsys, *arguments) -> dict:
    assert make_shards.main(list(arguments)) == 0
    return json.loads(capsys.readouterr().out)


def all_samples(folder, prefix):
    return [
        sample
        for path in sorted(folder.glob(f"{prefix}-*.tar"))
        for sample in read_shard(str(path))
    ]


def test_prompt_files_become_shards_with_rejected_rows_reported(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n\nsecond prompt\n   \nthird\n")
    summary = run_make_shards(
        capsys, "--prompts", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "t/p")
    )
    assert summary["samples"] == 3 and summary["rejected"] == 2
    assert summary["rejected_by_reason"] == {"empty caption": 2}
    assert [example["row"] for example in summary["rejected_examples"]] == [2, 4]
    captions = [s.members["txt"].decode() for s in all_samples(tmp_path / "t", "p")]
    assert captions == ["a cat", "second prompt", "third"]

    rows = [{"text": f"prompt {index}", "score": index} for index in range(50)]
    lines = [json.dumps(row) for row in rows] + ["{broken", json.dumps({"other": 1})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_make_shards(
        capsys,
        *("--prompts", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "j/rows")),
        *("--caption-field", "text", "--shard-size-mb", "0.02"),
    )
    assert summary["samples"] == 50 and summary["rejected"] == 2
    assert set(summary["rejected_by_reason"]) == {"invalid JSON", "no field 'text'"}
    assert len(summary["shards"]) > 1  # a few kB per shard: several shards
    assert not list((tmp_path / "j").glob(".*"))  # no temporary files left
    index = json.loads((tmp_path / "j" / "index.json").read_text())
    assert index["total"] == 50 and index["shards"] == summary["shards"]
    samples = all_samples(tmp_path / "j", "rows")
    assert json.loads(samples[7].members["json"]) == rows[7]
    config = DataConfig(
        kind="webdataset", urls=[str(tmp_path / "j" / name) for name in summary["shards"]]
    )
    stream = build_stream(config, 0, 1, 5, seed=0)
    assert stream.batches_per_epoch == 10

    with open(tmp_path / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["caption", "id"])
        writer.writeheader()
        writer.writerows([{"caption": "one", "id": 1}, {"caption": "", "id": 2}])
    summary = run_make_shards(
        capsys, "--prompts", str(tmp_path / "rows.csv"), "--output", str(tmp_path / "c/rows")
    )
    assert summary["samples"] == 1 and summary["rejected_examples"][0]["row"] == 3


def test_parquet_without_a_reader_fails_with_instructions(tmp_path, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(SystemExit, match="needs pyarrow or pandas"):
        make_shards.main(["--prompts", str(tmp_path / "rows.parquet"), "--output", str(tmp_path)])


def test_image_folder_becomes_image_text_shards(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for index in range(4):
        Image.fromarray(np.full((20, 30, 3), index * 40, dtype=np.uint8)).save(
            folder / "sub" / f"photo{index}.png"
        )
        (folder / "sub" / f"photo{index}.txt").write_text(f"photo number {index}")
    (folder / "sub" / "photo3.txt").unlink()  # no caption
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "broken.txt").write_text("a caption")
    (folder / "described.webp").write_bytes(
        (lambda buffer: (Image.new("RGB", (8, 8)).save(buffer, "WEBP"), buffer.getvalue())[1])(
            io.BytesIO()
        )
    )
    (folder / "described.json").write_text(json.dumps({"caption": "from json"}))
    summary = run_make_shards(capsys, "--images", str(folder), "--output", str(tmp_path / "s/img"))
    assert summary["samples"] == 4 and summary["rejected"] == 2
    reasons = {example["file"]: example["reason"] for example in summary["rejected_examples"]}
    assert reasons["broken.jpg"].startswith("unreadable image")
    assert reasons["sub/photo3.png"].startswith("no caption file")
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "s" / "img-000000.tar")],
        sample_kind="image_text",
        resolution=16,
        shuffle_buffer=1,
    )
    batch = next(iter(build_stream(config, 0, 1, 4, seed=0)))
    assert sorted(batch["prompt"]) == [
        "from json",
        "photo number 0",
        "photo number 1",
        "photo number 2",
    ]
    assert batch["image"].shape == (4, 3, 16, 16)


def test_synthetic_shards_from_the_command_line(tmp_path, capsys):
    summary = run_make_shards(
        capsys,
        *("--synthetic", "10", "--resolution", "32", "--samples-per-shard", "4"),
        *("--output", str(tmp_path / "shapes")),
    )
    assert summary["samples"] == 10 and len(summary["shards"]) == 3


class FakeTextEncoder:
    """Features of a prompt: its length in tokens (one per word), each token's word index."""

    def __init__(self):
        self.calls = 0

    def encode(self, prompts):
        self.calls += 1
        lengths = [len(prompt.split()) for prompt in prompts]
        features = torch.zeros(len(prompts), max(lengths), 3)
        mask = torch.zeros(len(prompts), max(lengths), dtype=torch.bool)
        for row, length in enumerate(lengths):
            features[row, :length] = torch.arange(1, length + 1, dtype=torch.float)[:, None]
            mask[row, :length] = True
        return features, mask


class FakeVae:
    def encode(self, images):
        batch, _, height, width = images.shape
        patches = images.reshape(batch, 3, height // 16, 16, width // 16, 16).mean(dim=(3, 5))
        return patches.flatten(2).transpose(1, 2), (1, height // 16, width // 16)


def test_encode_prompts_writes_precomputed_shards_split_by_rank_and_resumable(tmp_path):
    from apex_dist.data.shards import ShardWriter

    with ShardWriter(tmp_path / "in/p", samples_per_shard=5) as writer:
        for index in range(20):
            caption = " ".join(["word"] * (1 + index % 4)) if index != 6 else ""
            image = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 10 * index, dtype=np.uint8)).save(image, "PNG")
            writer.write(f"s{index:03d}", {"txt": caption.encode(), "png": image.getvalue()})
    urls = [str(tmp_path / f"in/p-{index:06d}.tar") for index in range(4)]
    encoder = FakeTextEncoder()
    summaries = [
        encode_prompts.encode_shards(
            urls,
            tmp_path / "out",
            encoder,
            FakeVae(),
            rank=rank,
            world_size=2,
            batch_size=3,
            resolution=32,
        )
        for rank in range(2)
    ]
    assert [summary["encoded_shards"] for summary in summaries] == [2, 2]
    assert sum(summary["samples"] for summary in summaries) == 19
    assert sum(summary["skipped"] for summary in summaries) == 1  # the empty caption
    calls = encoder.calls
    again = encode_prompts.encode_shards(urls, tmp_path / "out", encoder, rank=0, world_size=2)
    assert again["existing_shards"] == 2 and encoder.calls == calls
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "out/p-{000000..000003}.tar")],
        sample_kind="precomputed",
        shuffle_buffer=19,
    )
    batch = next(iter(build_stream(config, 0, 1, 4, seed=0)))
    words = [len(prompt.split()) for prompt in batch["prompt"]]
    assert batch["text_mask"].sum(dim=1).tolist() == words
    assert batch["text"].shape == (4, max(words), 3)
    assert batch["latents"].shape == (4, 4, 3) and batch["image_shape"] == (1, 2, 2)
    index = int(batch["key"][0][1:])
    assert batch["latents"][0, 0, 0].item() == pytest.approx(10 * index / 127.5 - 1, abs=1e-4)
    with tarfile.open(tmp_path / "out/p-000000.tar") as archive:
        assert archive.getnames()[:2] == ["s000.safetensors", "s000.txt"]


def test_bench_data_prints_both_throughputs(capsys):
    arguments = ["--workers", "0", "--prompts", "400", "--images", "48", "--source-size", "64"]
    assert bench_data.main([*arguments, "--resolution", "64"]) == 0
    output = capsys.readouterr().out
    assert "prompt stream (0 workers):" in output and "samples/s" in output
    assert "64px JPEG -> 64x64 tensors" in output
