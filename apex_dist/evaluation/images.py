"""Folders of generated images and their prompts: the format read by `apex-eval score` and
written by its generate mode (docs/evaluation.md).

A folder is read in the first of these layouts that it has:

1. `metadata.jsonl` at its top: one JSON object per image,
       {"file": "images/00012_1.png", "prompt": "a photo of two cups", "seed": 49,
        "tag": "counting", "include": [...], "exclude": [...]}
   with `file` relative to the folder; `seed` and the GenEval metadata (tag, include, exclude)
   are optional.
2. GenEval's own layout: numbered subfolders `00012/` each with `metadata.jsonl` (one object:
   the prompt's metadata) and `samples/*.png`.
3. PNG files (the folder's and its subfolders', in name order) whose text chunks hold the
   prompt: chunk `prompt` (the text), optionally `seed` (an integer) and `evaluation` (the
   GenEval metadata as JSON).

An image without GenEval metadata gets it from the prompt set, looked up by its prompt text;
a prompt that is not in the set is scored by CLIP score only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from apex_dist.evaluation.prompts import PromptSpec

METADATA_FILE = "metadata.jsonl"
# PNG text chunk names (layout 3, and what the generate mode writes).
PROMPT_CHUNK, SEED_CHUNK, SPEC_CHUNK = "prompt", "seed", "evaluation"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ImageRecord:
    """One image to evaluate: its file, prompt, seed and GenEval metadata (when known)."""

    path: Path
    prompt: str
    spec: Optional[PromptSpec] = None
    seed: Optional[int] = None


def _seed(value, where: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: seed {value!r} is not an integer") from None


def _spec_of(value: dict, where: str) -> Optional[PromptSpec]:
    if "tag" not in value and "include" not in value:
        return None
    return PromptSpec.from_json(
        {key: value[key] for key in ("tag", "prompt", "include", "exclude") if key in value},
        where,
    )


def _from_metadata_file(folder: Path) -> list[ImageRecord]:
    path = folder / METADATA_FILE
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error})") from None
        if not isinstance(value, dict) or not isinstance(value.get("file"), str):
            raise ValueError(
                f'{where}: each line needs "file" (relative to {folder}) and "prompt" '
                "(docs/evaluation.md)"
            )
        if not isinstance(value.get("prompt"), str):
            raise ValueError(f'{where}: "prompt" is missing or not a string')
        image_path = folder / value["file"]
        if not image_path.is_file():
            raise FileNotFoundError(f"{where}: image {image_path} does not exist")
        records.append(
            ImageRecord(
                image_path,
                value["prompt"],
                _spec_of(value, where),
                _seed(value.get("seed"), where),
            )
        )
    return records


def _from_geneval_layout(folders: list[Path]) -> list[ImageRecord]:
    records = []
    for prompt_folder in folders:
        metadata_path = prompt_folder / METADATA_FILE
        try:
            value = json.loads(metadata_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata_path}: not JSON ({error})") from None
        spec = PromptSpec.from_json(value, str(metadata_path))
        for image_path in sorted((prompt_folder / "samples").glob("*.png")):
            records.append(ImageRecord(image_path, spec.prompt, spec))
    return records


def _from_png_chunks(folder: Path) -> list[ImageRecord]:
    from PIL import Image

    records = []
    for image_path in sorted(folder.rglob("*.png")):
        with Image.open(image_path) as image:
            chunks = dict(getattr(image, "text", {}) or {})
        where = str(image_path)
        if PROMPT_CHUNK not in chunks:
            raise ValueError(
                f"{where} has no {PROMPT_CHUNK!r} text chunk: write the prompt into the PNG, or "
                f"list the images with their prompts in {folder / METADATA_FILE} "
                "(docs/evaluation.md)"
            )
        spec = None
        if SPEC_CHUNK in chunks:
            try:
                spec = PromptSpec.from_json(json.loads(chunks[SPEC_CHUNK]), where)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: the {SPEC_CHUNK!r} chunk is not JSON ({error})"
                ) from None
        records.append(
            ImageRecord(
                image_path, chunks[PROMPT_CHUNK], spec, _seed(chunks.get(SEED_CHUNK), where)
            )
        )
    return records


def read_image_folder(
    folder: str | Path, prompt_table: Optional[dict[str, PromptSpec]] = None
) -> list[ImageRecord]:
    """The images of `folder` with their prompts (module doc); metadata missing from a record is
    taken from `prompt_table` (prompt text -> spec) when the prompt is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    geneval_folders = sorted(
        path
        for path in folder.iterdir()
        if path.is_dir() and path.name.isdigit() and (path / METADATA_FILE).is_file()
    )
    if (folder / METADATA_FILE).is_file():
        records = _from_metadata_file(folder)
    elif geneval_folders:
        records = _from_geneval_layout(geneval_folders)
    else:
        records = _from_png_chunks(folder)
    if not records:
        raise ValueError(
            f"no images found in {folder}: expected {METADATA_FILE}, GenEval's numbered "
            "folders, or PNG files with a prompt chunk (docs/evaluation.md)"
        )
    for record in records:
        if record.spec is None and prompt_table is not None:
            record.spec = prompt_table.get(record.prompt)
    return records


# ---- generating a folder ---------------------------------------------------------------------


class ImageGenerator(Protocol):
    """What the generate mode needs of a generator: one image per (prompt, seed), as PIL
    images, in order. `apex_dist.generate` provides one (docs/evaluation.md)."""

    def __call__(self, prompts: list[str], seeds: list[int]) -> list: ...


def image_name(prompt_index: int, sample_index: int) -> str:
    return f"images/{prompt_index:05d}_{sample_index}.png"


def image_seed(base_seed: int, prompt_index: int, sample_index: int, per_prompt: int) -> int:
    """The seed of image `sample_index` of prompt `prompt_index`: distinct for every image of
    a run, and independent of the batch size."""
    return base_seed + prompt_index * per_prompt + sample_index


def save_png(
    image, path: Path, record: ImageRecord, settings: Optional[Mapping[str, str]] = None
) -> None:
    """`image` as PNG with its prompt, seed and metadata in text chunks, atomically; each
    entry of `settings` (how the image was made) becomes a chunk of its own."""
    from PIL.PngImagePlugin import PngInfo

    from apex_dist.atomic import atomic_path

    info = PngInfo()
    info.add_text(PROMPT_CHUNK, record.prompt)
    if record.seed is not None:
        info.add_text(SEED_CHUNK, str(record.seed))
    if record.spec is not None:
        info.add_text(SPEC_CHUNK, json.dumps(record.spec.to_json()))
    for key, value in (settings or {}).items():
        if key in (PROMPT_CHUNK, SEED_CHUNK, SPEC_CHUNK):
            raise ValueError(f"setting {key!r} would overwrite the image's own {key} chunk")
        info.add_text(key, str(value))
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)


def generate_folder(
    generator: ImageGenerator,
    specs: Sequence[PromptSpec],
    folder: str | Path,
    per_prompt: int = 1,
    base_seed: int = 0,
    batch_size: int = 4,
    progress: Optional[Callable[[int], None]] = None,
) -> list[ImageRecord]:
    """`per_prompt` images of each spec written to `folder` (PNG with text chunks, and
    `metadata.jsonl` listing them); images already there are kept, so an interrupted run
    continues where it stopped. `progress(n)` is called after each batch of n new images."""
    from apex_dist.atomic import atomic_write_text

    folder = Path(folder)
    records = [
        ImageRecord(
            folder / image_name(prompt_index, sample_index),
            spec.prompt,
            spec,
            image_seed(base_seed, prompt_index, sample_index, per_prompt),
        )
        for prompt_index, spec in enumerate(specs)
        for sample_index in range(per_prompt)
    ]
    missing = [record for record in records if not record.path.is_file()]
    if progress is not None and len(missing) < len(records):
        progress(len(records) - len(missing))  # images of an earlier, interrupted run
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        images = generator([record.prompt for record in batch], [record.seed for record in batch])
        if len(images) != len(batch):
            raise ValueError(
                f"the generator returned {len(images)} images for {len(batch)} prompts: it must "
                "return one image per (prompt, seed)"
            )
        for image, record in zip(images, batch, strict=True):
            save_png(image, record.path, record)
        if progress is not None:
            progress(len(batch))
    lines = []
    for record in records:
        line = {"file": str(record.path.relative_to(folder)), "prompt": record.prompt}
        line["seed"] = record.seed
        if record.spec is not None:
            line.update(record.spec.to_json())
        lines.append(json.dumps(line) + "\n")
    atomic_write_text(folder / METADATA_FILE, "".join(lines))
    return records
