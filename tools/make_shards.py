"""Write WebDataset shards from prompt files, a folder of captioned images, or synthetic scenes.

    apex-make-shards --prompts prompts.txt --output data/prompts          # one prompt per line
    apex-make-shards --prompts rows.jsonl --caption-field text --output data/prompts
    apex-make-shards --prompts rows.csv --output data/prompts             # also .parquet
    apex-make-shards --images photos/ --output data/photos --shard-size-mb 512
    apex-make-shards --synthetic 10000 --resolution 64 --output data/shapes

Shards are ``<output>-000000.tar``, ``<output>-000001.tar``, ... of about --shard-size-mb (or
--samples-per-shard samples), each written under a temporary name and renamed when complete;
``index.json`` beside them lists every shard's sample count. Prompt rows become ``txt`` members
(and ``json`` with the whole row when it has other fields); images keep their bytes and
extension, with the caption of ``<stem>.txt`` (or the caption field of ``<stem>.json``) beside
them. Rows without a usable caption and unreadable images are rejected, counted and listed.
The summary (samples, shards, rejected rows by reason with examples) is printed as JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from apex_dist.data.samples import IMAGE_EXTENSIONS
from apex_dist.data.shards import DEFAULT_SHARD_BYTES, ShardWriter
from apex_dist.data.synthetic import write_synthetic_shards

# Rejected rows listed in the summary (the count covers all of them).
REJECTED_EXAMPLES_KEPT = 20
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


class Rejected(ValueError):
    """A row that cannot become a sample; the message is the reason."""


def _caption(row: dict, field: str) -> str:
    if field not in row:
        raise Rejected(f"no field {field!r}")
    caption = row[field]
    if caption is None or not str(caption).strip():
        raise Rejected("empty caption")
    return str(caption).strip()


def _parquet_rows(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        parquet = None
    if parquet is not None:
        for batch in parquet.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
        return
    try:
        import pandas
    except ImportError:
        raise SystemExit(
            f"reading {path} needs pyarrow or pandas, and neither is installed: "
            "`pip install pyarrow`, or convert the file to JSONL or CSV"
        ) from None
    yield from pandas.read_parquet(path).to_dict(orient="records")


def prompt_rows(path: Path, caption_field: str) -> Iterator[tuple[int, dict | Rejected]]:
    """(line or row number, row dict or the reason it was rejected) for every row of a file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                yield number, {caption_field: line.rstrip("\n")}
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as error:
                    yield number, Rejected(f"invalid JSON: {error}")
                    continue
                yield number, row if isinstance(row, dict) else Rejected("not a JSON object")
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            # line 1 is the header
            yield from enumerate(csv.DictReader(handle), 2)
    elif suffix == ".parquet":
        yield from enumerate(_parquet_rows(path), 1)
    else:
        raise SystemExit(f"{path}: unknown prompt file type {suffix!r}: one of {PROMPT_SUFFIXES}")


def _json_ready(row: dict) -> dict:
    return {
        str(name): value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        for name, value in row.items()
    }


def prompt_samples(path: Path, caption_field: str, rejected: list) -> Iterator[tuple[str, dict]]:
    for number, row in prompt_rows(path, caption_field):
        try:
            if isinstance(row, Rejected):
                raise row
            caption = _caption(row, caption_field)
        except Rejected as reason:
            rejected.append({"row": number, "reason": str(reason)})
            continue
        members = {"txt": caption.encode()}
        if set(row) - {caption_field}:
            members["json"] = json.dumps(_json_ready(row)).encode()
        yield f"{path.stem}-{number:09d}", members


def image_samples(folder: Path, caption_field: str, rejected: list) -> Iterator[tuple[str, dict]]:
    from PIL import Image

    images = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    for number, path in enumerate(images):
        name = str(path.relative_to(folder))
        try:
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except Exception as error:
                raise Rejected(f"unreadable image: {type(error).__name__}: {error}") from None
            text_path, json_path = path.with_suffix(".txt"), path.with_suffix(".json")
            members = {}
            if text_path.exists():
                caption = text_path.read_text(encoding="utf-8").strip()
                if not caption:
                    raise Rejected("empty caption")
            elif json_path.exists():
                row = json.loads(json_path.read_text(encoding="utf-8"))
                caption = _caption(row, caption_field)
                members["json"] = json_path.read_bytes()
            else:
                raise Rejected(f"no caption file {text_path.name} or {json_path.name}")
        except Rejected as reason:
            rejected.append({"file": name, "reason": str(reason)})
            continue
        extension = path.suffix.lower().lstrip(".")
        members = {extension: data, "txt": caption.encode(), **members}
        yield f"image-{number:09d}", members


def make_shards(arguments: argparse.Namespace) -> dict:
    """Write the shards the arguments describe; return the summary."""
    max_bytes = int(arguments.shard_size_mb * 1024 * 1024)
    if arguments.synthetic:
        return write_synthetic_shards(
            arguments.output,
            arguments.synthetic,
            arguments.resolution,
            seed=arguments.seed,
            samples_per_shard=arguments.samples_per_shard or 1000,
        ) | {"rejected": 0, "rejected_by_reason": {}, "rejected_examples": []}
    rejected: list[dict] = []
    if arguments.prompts:
        samples = prompt_samples(Path(arguments.prompts), arguments.caption_field, rejected)
    else:
        samples = image_samples(Path(arguments.images), arguments.caption_field, rejected)
    with ShardWriter(arguments.output, max_bytes, arguments.samples_per_shard) as writer:
        for key, members in samples:
            writer.write(key, members)
    reasons = Counter(item["reason"].split(":")[0] for item in rejected)
    return writer.summary() | {
        "rejected": len(rejected),
        "rejected_by_reason": dict(reasons),
        "rejected_examples": rejected[:REJECTED_EXAMPLES_KEPT],
    }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help=f"prompt file ({', '.join(PROMPT_SUFFIXES)})")
    source.add_argument("--images", help="folder of images with <stem>.txt or <stem>.json captions")
    source.add_argument("--synthetic", type=int, help="number of synthetic scenes to write")
    parser.add_argument("--output", required=True, help="shard prefix: <output>-000000.tar, ...")
    parser.add_argument(
        "--caption-field", default="caption", help="caption column / JSON field (default caption)"
    )
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=DEFAULT_SHARD_BYTES / 1024 / 1024,
        help="target shard size in MiB (default 256)",
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=0, help="samples per shard (0: by size only)"
    )
    parser.add_argument("--resolution", type=int, default=64, help="synthetic image side")
    parser.add_argument("--seed", type=int, default=0, help="synthetic scene seed")
    arguments = parser.parse_args(argv)
    for name in ("prompts", "images"):
        path = getattr(arguments, name)
        if path is not None and not Path(path).exists():
            parser.error(f"--{name} {path}: no such file or directory")
    if arguments.shard_size_mb <= 0 or arguments.samples_per_shard < 0:
        parser.error("--shard-size-mb must be > 0 and --samples-per-shard >= 0")
    return arguments


def main(argv: list[str] | None = None) -> int:
    summary = make_shards(parse_arguments(argv))
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
