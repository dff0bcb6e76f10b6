"""Precompute text features (and image latents) of prompt or image-text shards into new shards.

    apex-encode-prompts --input "data/prompts-{000000..000099}.tar" --output-dir data/encoded \
        --snapshot /models/Qwen-Image --dtype bf16 --device cuda
    torchrun --nproc_per_node 8 tools/encode_prompts.py ... --images --resolution 1024

Each input shard becomes an output shard of the same name whose samples hold ``safetensors``
(``text`` (S, D) and ``text_mask`` (S,) trimmed to the prompt's tokens; with --images also
``latents`` (N, C) and ``image_shape`` (frames, h, w)) and the caption as ``txt`` (plus the input's
``json``), which the streams read with ``data.sample_kind: precomputed``. Shards are split across
ranks (shard i goes to rank i mod world size; RANK and WORLD_SIZE are read from the environment
torchrun sets). Each output is written under a temporary name and renamed when complete, and
existing outputs are skipped, so an interrupted run resumes by running the same command again.
Samples that cannot be read (see docs/data.md) are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from apex_dist.data.samples import IMAGE_EXTENSIONS, BadSample, caption_of, load_image
from apex_dist.data.shards import write_shard
from apex_dist.data.sources import expand_urls, read_shard, shard_name

logger = logging.getLogger("apex_dist.encode_prompts")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shards_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    return [url for index, url in enumerate(urls) if index % world_size == rank]


def _trimmed(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's features and mask without the padding after its last valid token."""
    valid = torch.nonzero(mask).flatten()
    length = int(valid[-1]) + 1 if len(valid) else 0
    return features[:length], mask[:length]


def encode_shard(
    url: str,
    output_path: str | Path,
    text_encoder,
    vae=None,
    batch_size: int = 16,
    resolution: int = 1024,
    caption_key: str = "caption",
) -> dict:
    """Encode one shard into `output_path`; return {"samples": n, "skipped": n}.

    `text_encoder.encode(prompts) -> (features (B, S, D), mask (B, S) bool)`; `vae.encode(images
    (B, 3, H, W) in [-1, 1]) -> (latents (B, N, C), image_shape)` when images are encoded too.
    """
    from safetensors.torch import save as save_safetensors

    counts = {"samples": 0, "skipped": 0}

    def rows():
        for sample in read_shard(url):
            try:
                if sample.error is not None:
                    raise BadSample(sample.error)
                caption = caption_of(sample.members, caption_key, required=True)
                image = None
                if vae is not None:
                    extension = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
                    if extension is None:
                        raise BadSample("no image member")
                    pixels = load_image(sample.members[extension], resolution, resolution)
                    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
            except (BadSample, ValueError, OSError) as error:
                counts["skipped"] += 1
                logger.warning("skipped %s: %s", sample.describe(), error)
                continue
            yield sample, caption, image

    def batches():
        pending = []
        for row in rows():
            pending.append(row)
            if len(pending) == batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    def samples():
        for batch in batches():
            features, mask = text_encoder.encode([caption for _, caption, _ in batch])
            features, mask = features.float().cpu(), mask.bool().cpu()
            latents = image_shape = None
            if vae is not None:
                latents, image_shape = vae.encode(torch.stack([image for _, _, image in batch]))
                latents = latents.float().cpu()
            for row, (sample, caption, _) in enumerate(batch):
                text, text_mask = _trimmed(features[row], mask[row])
                tensors = {"text": text.contiguous(), "text_mask": text_mask.to(torch.uint8)}
                if latents is not None:
                    tensors["latents"] = latents[row].contiguous()
                    tensors["image_shape"] = torch.tensor(image_shape, dtype=torch.int64)
                members = {"safetensors": save_safetensors(tensors), "txt": caption.encode()}
                if "json" in sample.members:
                    members["json"] = sample.members["json"]
                counts["samples"] += 1
                yield sample.key, members

    write_shard(output_path, samples())
    return counts


def encode_shards(
    urls: list[str], output_dir: str | Path, text_encoder, vae=None, rank=0, world_size=1, **options
) -> dict:
    """Encode this rank's shards into output_dir, skipping outputs that already exist."""
    output_dir = Path(output_dir)
    summary = {"encoded_shards": 0, "existing_shards": 0, "samples": 0, "skipped": 0}
    for url in shards_for_rank(urls, rank, world_size):
        output_path = output_dir / shard_name(url)
        if output_path.exists():
            summary["existing_shards"] += 1
            continue
        counts = encode_shard(url, output_path, text_encoder, vae, **options)
        summary["encoded_shards"] += 1
        summary["samples"] += counts["samples"]
        summary["skipped"] += counts["skipped"]
        logger.info("rank %d wrote %s (%s)", rank, output_path, counts)
    return summary


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, nargs="+", help="shard paths or brace patterns")
    parser.add_argument("--output-dir", required=True, help="folder of the encoded shards")
    parser.add_argument("--snapshot", required=True, help="Qwen-Image snapshot directory")
    parser.add_argument("--images", action="store_true", help="also encode images with the VAE")
    parser.add_argument("--resolution", type=int, default=1024, help="image side (--images)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call")
    parser.add_argument("--max-length", type=int, default=512, help="prompt tokens kept")
    parser.add_argument("--caption-field", default="caption", help="caption field of json members")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    arguments = parser.parse_args(argv)
    if not 0 <= arguments.rank < arguments.world_size:
        parser.error(f"--rank {arguments.rank} must be in [0, --world-size {arguments.world_size})")
    return arguments


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    arguments = parse_arguments(argv)
    from apex_dist.models.text_encoder import QwenTextEncoder

    dtype = DTYPES[arguments.dtype]
    device = arguments.device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    text_encoder = QwenTextEncoder.from_snapshot(
        arguments.snapshot, dtype=dtype, device=device, max_length=arguments.max_length
    )
    vae = None
    if arguments.images:
        from apex_dist.models.vae import QwenImageVae

        vae = QwenImageVae.from_snapshot(arguments.snapshot, dtype=dtype, device=device)
    urls = [url for pattern in arguments.input for url in expand_urls(pattern)]
    summary = encode_shards(
        urls,
        arguments.output_dir,
        text_encoder,
        vae,
        rank=arguments.rank,
        world_size=arguments.world_size,
        batch_size=arguments.batch_size,
        resolution=arguments.resolution,
        caption_key=arguments.caption_field,
    )
    json.dump({"rank": arguments.rank, **summary}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
