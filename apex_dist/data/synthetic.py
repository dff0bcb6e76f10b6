"""The synthetic compositional dataset: coloured shapes, their captions and structured specs.

A scene is one or two groups of identical objects ("two red circles left of a blue square",
"three green triangles"): each group has a colour, a shape and a count (1 to 3); two groups have
different colours and a relative position. Objects sit in the cells of a 4x4 grid (a group left
of another fills the two left columns, and so on), so that the same spec renders at any
resolution from 32 pixels up. Everything is deterministic in (seed, index).

The spec is a JSON-ready dict:

    {"caption": "two red circles left of a blue square",
     "objects": [{"colour": "red", "shape": "circle", "count": 2},
                 {"colour": "blue", "shape": "square", "count": 1}],
     "relation": "left of",            # or null for one group
     "placements": [[{"cell": [row, column], "size": 0.8, "offset": [dy, dx]}, ...], ...]}

`apex_dist.data.evaluate` checks generated images against specs (or parsed captions).
"""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import numpy as np

from apex_dist.data.shards import ShardWriter

# Palette (RGB, 0-255), chosen so that every two colours (and the background) are more than 150
# apart in Euclidean RGB distance: the evaluator's colour tolerance (60) keeps them separate.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
}
BACKGROUND = (224, 224, 224)
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
MAX_COUNT = 3
# The scene grid: GRID x GRID cells, one object per cell.
GRID = 4
# Object side as a fraction of the cell side, drawn uniformly in this range.
OBJECT_SIZE_RANGE = (0.65, 0.85)
# Objects are at least this many pixels wide: below it, circles and squares look alike.
MIN_OBJECT_PIXELS = 6
MIN_RESOLUTION = GRID * 8
# Fraction of scenes with two groups and a relation (the rest have one group).
TWO_GROUP_FRACTION = 0.5


def _seeded(*parts) -> random.Random:
    return random.Random(":".join(str(part) for part in parts))


def _region(relation: str | None, group: int) -> list[tuple[int, int]]:
    """The grid cells group 0 or 1 may use under a relation ("A left of B": A on the left)."""
    cells = [(row, column) for row in range(GRID) for column in range(GRID)]
    if relation is None:
        return cells
    half = GRID // 2
    first_half = (relation in ("left of", "above")) == (group == 0)
    axis = 1 if relation in ("left of", "right of") else 0
    return [cell for cell in cells if (cell[axis] < half) == first_half]


def caption_for(objects: list[dict], relation: str | None) -> str:
    parts = []
    for item in objects:
        noun = item["shape"] if item["count"] == 1 else PLURALS[item["shape"]]
        parts.append(f"{COUNT_WORDS[item['count']]} {item['colour']} {noun}")
    return parts[0] if relation is None else f"{parts[0]} {relation} {parts[1]}"


def make_scene(index: int, seed: int = 0) -> dict:
    """The spec of scene `index` (deterministic in seed and index)."""
    rng = _seeded(seed, "scene", index)
    two_groups = rng.random() < TWO_GROUP_FRACTION
    colours = rng.sample(sorted(COLOURS), 2 if two_groups else 1)
    relation = rng.choice(RELATIONS) if two_groups else None
    objects, placements = [], []
    for group, colour in enumerate(colours):
        item = {"colour": colour, "shape": rng.choice(SHAPES), "count": rng.randint(1, MAX_COUNT)}
        objects.append(item)
        cells = rng.sample(_region(relation, group), item["count"])
        placements.append(random_placements(rng, cells))
    return {
        "caption": caption_for(objects, relation),
        "objects": objects,
        "relation": relation,
        "placements": placements,
    }


def random_placements(rng: random.Random, cells: list[tuple[int, int]]) -> list[dict]:
    """One placement per grid cell: the cell, a size in OBJECT_SIZE_RANGE and an offset in
    [-1, 1]^2 (drawn in that order, cell after cell)."""
    return [
        {
            "cell": list(cell),
            "size": round(rng.uniform(*OBJECT_SIZE_RANGE), 4),
            "offset": [round(rng.uniform(-1, 1), 4), round(rng.uniform(-1, 1), 4)],
        }
        for cell in cells
    ]


def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of a shape, sampled at pixel centres."""
    centres = (np.arange(size) + 0.5) / size
    vertical, horizontal = np.meshgrid(centres, centres, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (horizontal - 0.5) ** 2 + (vertical - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex up, base along the bottom
        return np.abs(horizontal - 0.5) <= vertical / 2
    raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")


def object_pixels(size_fraction: float, resolution: int) -> int:
    return max(MIN_OBJECT_PIXELS, round(size_fraction * resolution / GRID))


def render_scene(spec: dict, resolution: int) -> np.ndarray:
    """The scene as uint8 (resolution, resolution, 3) RGB, without anti-aliasing."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(
            f"synthetic scenes need a resolution of at least {MIN_RESOLUTION} (got {resolution})"
        )
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    cell = resolution / GRID
    for item, group in zip(spec["objects"], spec["placements"], strict=True):
        for placement in group:
            size = object_pixels(placement["size"], resolution)
            # objects stay a pixel inside their cell, so neighbours never touch
            slack = max(0.0, (cell - size) / 2 - 1)
            row, column = placement["cell"]
            top = round((row + 0.5) * cell + placement["offset"][0] * slack - size / 2)
            left = round((column + 0.5) * cell + placement["offset"][1] * slack - size / 2)
            region = image[top : top + size, left : left + size]
            region[shape_mask(item["shape"], size)] = COLOURS[item["colour"]]
    return image


_GROUP = r"(a|one|two|three) (\w+) (circles?|squares?|triangles?)"
_CAPTION = re.compile(rf"^{_GROUP}(?: (left of|right of|above|below) {_GROUP})?$")
_NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3}


def parse_caption(caption: str) -> dict:
    """The spec (without placements) of a caption of this dataset; ValueError if not one."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(
            f"caption {caption!r} is not of the synthetic dataset's form "
            "('two red circles left of a blue square', 'a green triangle')"
        )
    groups = match.groups()
    objects = []
    for count, colour, noun in (groups[0:3], groups[4:7]):
        if count is None:
            continue
        if colour not in COLOURS:
            raise ValueError(f"caption {caption!r}: unknown colour {colour!r}")
        objects.append({"colour": colour, "shape": noun.rstrip("s"), "count": _NUMBERS[count]})
    return {"caption": caption, "objects": objects, "relation": groups[3]}


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic_shards(
    output_prefix: str | Path,
    count: int,
    resolution: int,
    seed: int = 0,
    samples_per_shard: int = 1000,
    first_index: int = 0,
) -> dict:
    """Write scenes first_index .. first_index+count-1 as image-text shards with json specs.

    Each sample has ``png`` (the image), ``txt`` (the caption) and ``json`` ({"caption", "spec"}).
    Returns the writer's summary (shard names and counts); shards and index.json are written
    under temporary names and renamed when complete.
    """
    with ShardWriter(output_prefix, samples_per_shard=samples_per_shard) as writer:
        for index in range(first_index, first_index + count):
            spec = make_scene(index, seed)
            writer.write(
                f"scene-{index:09d}",
                {
                    "png": encode_png(render_scene(spec, resolution)),
                    "txt": spec["caption"].encode(),
                    "json": json.dumps({"caption": spec["caption"], "spec": spec}).encode(),
                },
            )
    return writer.summary()
