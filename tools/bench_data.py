"""Throughput of the data streams: samples per second for prompts and for 512x512 images.

    .venv/bin/python tools/bench_data.py --workers 2

Writes temporary shards (prompts; JPEG photos-like images of --source-size pixels), then times
each stream through `build_stream` with the given DataLoader workers, after a warm-up, and
prints one line per stream. Training at real scale consumes about 1 sample per second per GPU.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from apex_dist.config import DataConfig
from apex_dist.data.shards import ShardWriter
from apex_dist.data.streams import build_stream

# JPEG quality of the benchmark images: typical of web-crawled training images.
JPEG_QUALITY = 90
# Batches consumed before timing starts (worker start-up, first shard reads).
WARMUP_BATCHES = 4
# Prompt lengths drawn from this range of words: typical captions of image datasets.
PROMPT_WORDS = (8, 60)


def photo_like(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG with smooth colour gradients, shapes and grain (compresses like a photo)."""
    from PIL import Image, ImageDraw, ImageFilter

    top, bottom = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]  # (size, 1, 1)
    pixels = top * (1 - ramp) + bottom * ramp  # (size, 1, 3)
    pixels = np.broadcast_to(pixels, (size, size, 3)) * (0.6 + 0.4 * ramp.transpose(1, 0, 2))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        box = sorted(rng.integers(0, size, 2).tolist()) + sorted(rng.integers(0, size, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        draw.ellipse((box[0], box[2], box[1], box[3]), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 6, size=(size, size, 3))
    image = Image.fromarray((np.asarray(image) + grain).clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_benchmark_shards(folder: Path, prompts: int, images: int, source_size: int) -> None:
    rng = np.random.default_rng(0)
    words = [f"word{index}" for index in range(5000)]
    with ShardWriter(folder / "prompts", samples_per_shard=max(1, prompts // 8)) as writer:
        for index in range(prompts):
            length = int(rng.integers(*PROMPT_WORDS))
            caption = " ".join(rng.choice(words, size=length).tolist())
            writer.write(f"prompt-{index:09d}", {"txt": caption.encode()})
    with ShardWriter(folder / "images", samples_per_shard=max(1, images // 8)) as writer:
        for index in range(images):
            writer.write(
                f"image-{index:09d}",
                {"jpg": photo_like(rng, source_size), "txt": f"image {index}".encode()},
            )


def measure(config: DataConfig, batches: int, micro_batch_size: int) -> float:
    """Samples per second of one rank's stream, after WARMUP_BATCHES batches."""
    stream = build_stream(config, rank=0, world_size=1, micro_batch_size=micro_batch_size, seed=0)
    start = None
    for index, _ in enumerate(stream):
        if index == WARMUP_BATCHES:
            start = time.perf_counter()
        if index == WARMUP_BATCHES + batches:
            break
    return batches * micro_batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--prompts", type=int, default=40000, help="prompts written")
    parser.add_argument("--images", type=int, default=400, help="images written")
    parser.add_argument("--source-size", type=int, default=512, help="side of the stored images")
    parser.add_argument("--resolution", type=int, default=512, help="side of the decoded images")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_benchmark_shards(folder, arguments.prompts, arguments.images, arguments.source_size)
        common = {"kind": "webdataset", "num_workers": arguments.workers, "shuffle_buffer": 1000}
        prompt_config = DataConfig(urls=[str(folder / "prompts-{000000..000007}.tar")], **common)
        image_config = DataConfig(
            urls=[str(folder / "images-{000000..000007}.tar")],
            sample_kind="image_text",
            resolution=arguments.resolution,
            **(common | {"shuffle_buffer": 64}),
        )
        # most of the data in one pass, the rest for the warm-up
        prompt_batches = arguments.prompts // arguments.micro_batch_size // 2
        image_batches = arguments.images // arguments.micro_batch_size // 2
        prompts = measure(prompt_config, prompt_batches, arguments.micro_batch_size)
        images = measure(image_config, image_batches, arguments.micro_batch_size)
    workers = f"{arguments.workers} workers"
    print(f"prompt stream ({workers}): {prompts:,.0f} samples/s")
    print(
        f"image stream, {arguments.source_size}px JPEG -> {arguments.resolution}x"
        f"{arguments.resolution} tensors ({workers}): {images:,.1f} samples/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
