"""A compositional benchmark in the GenEval mould, on the synthetic shapes renderer.

Six task types, as GenEval's, each with one fixed caption template:

| task | template | checked |
|---|---|---|
| single_object | "a circle" | an object of that shape (any colour) |
| two_object | "a circle and a square" | both shapes present |
| counting | "three circles" (2 to 4) | exactly that many objects of that shape |
| colors | "a red circle" | an object of that shape in that colour |
| position | "a circle left of a square" | both present, the first on that side of the second |
| color_attr | "a red circle and a blue square" | each colour bound to its own shape |

A *composition* is what a prompt asks for, as a tuple (the task, then its colours, shapes,
count and relation): ("color_attr", "red", "circle", "blue", "square"). Within each task the
compositions are ordered by a hash of the tuple and the first `HELD_OUT_FRACTION` of them (at
least one) form the held-out split: prompts that never appear in the training shards, so a
model scored on them must compose colours, shapes, counts and relations it saw separately.
Everything a prompt leaves open (the colour of an uncoloured object, cells, sizes, offsets) is
drawn from a generator seeded by (seed, split, index), so the data is deterministic.

Scenes render with `apex_dist.data.synthetic.render_scene` (any resolution from 32 pixels) and
are checked with its evaluator's object detector (`apex_dist.data.evaluate.detect_objects`):
an image is *correct* when every check of its prompt passes (GenEval's per-image score); a
task's score is the fraction of correct images, and the overall score the mean over tasks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apex_dist.data.evaluate import _relation_holds, detect_objects, to_uint8
from apex_dist.data.shards import ShardWriter
from apex_dist.data.synthetic import (
    COLOURS,
    PLURALS,
    RELATIONS,
    SHAPES,
    _region,
    _seeded,
    encode_png,
    random_placements,
    render_scene,
)

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval counts two to four objects; four fit a 4x4 grid with room to spare.
COUNTS = (2, 3, 4)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
# Fraction of each task's compositions held out of training (at least one per task).
HELD_OUT_FRACTION = 0.25
SPLITS = ("train", "held_out")
# Every word of the templates, for a tokenizer that should give each one a token of its own.
VOCABULARY = " ".join(
    ["a", "and", *NUMBER_WORDS.values(), *COLOURS, *SHAPES, *PLURALS.values(), *RELATIONS]
)


def _compositions_of(task: str) -> list[tuple]:
    colours, shapes = sorted(COLOURS), list(SHAPES)
    pairs = [(first, second) for first in shapes for second in shapes if first != second]
    if task == "single_object":
        return [(task, shape) for shape in shapes]
    if task == "two_object":
        return [(task, first, second) for first, second in pairs]
    if task == "counting":
        return [(task, shape, count) for shape in shapes for count in COUNTS]
    if task == "colors":
        return [(task, colour, shape) for colour in colours for shape in shapes]
    if task == "position":
        return [
            (task, first, relation, second) for first, second in pairs for relation in RELATIONS
        ]
    if task == "color_attr":
        return [
            (task, first_colour, first_shape, second_colour, second_shape)
            for first_colour in colours
            for second_colour in colours
            if first_colour != second_colour
            for first_shape in shapes
            for second_shape in shapes
        ]
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


def composition_hash(composition: tuple) -> str:
    return hashlib.sha256(json.dumps(list(composition)).encode()).hexdigest()


@functools.cache
def compositions(task: str, split: str) -> tuple[tuple, ...]:
    """The task's compositions of a split, in hash order (deterministic, seed-independent)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    ordered = sorted(_compositions_of(task), key=composition_hash)
    held = max(1, math.ceil(HELD_OUT_FRACTION * len(ordered)))
    return tuple(ordered[:held] if split == "held_out" else ordered[held:])


def is_held_out(composition) -> bool:
    return tuple(composition) in compositions(composition[0], "held_out")


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS[shape]


def requested_objects(composition: tuple) -> tuple[list[dict], str | None]:
    """What a composition asks for: objects ({colour or None, shape, count or None (= at least
    one)}) and the relation of the first to the second (or None)."""
    task = composition[0]
    if task == "single_object":
        return [{"colour": None, "shape": composition[1], "count": None}], None
    if task == "two_object":
        return [{"colour": None, "shape": shape, "count": None} for shape in composition[1:]], None
    if task == "counting":
        return [{"colour": None, "shape": composition[1], "count": composition[2]}], None
    if task == "colors":
        return [{"colour": composition[1], "shape": composition[2], "count": None}], None
    if task == "position":
        first, relation, second = composition[1:]
        objects = [{"colour": None, "shape": shape, "count": None} for shape in (first, second)]
        return objects, relation
    if task == "color_attr":
        _, first_colour, first_shape, second_colour, second_shape = composition
        return [
            {"colour": first_colour, "shape": first_shape, "count": None},
            {"colour": second_colour, "shape": second_shape, "count": None},
        ], None
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


def caption_of(composition: tuple) -> str:
    """The task's fixed template filled in ("a red circle and a blue square")."""
    objects, relation = requested_objects(composition)
    phrases = []
    for item in objects:
        count = item["count"] or 1
        words = [NUMBER_WORDS.get(count, "a")]
        if item["colour"] is not None:
            words.append(item["colour"])
        words.append(_noun(item["shape"], count))
        phrases.append(" ".join(words))
    if relation is not None:
        return f"{phrases[0]} {relation} {phrases[1]}"
    return " and ".join(phrases)


def make_spec(composition: tuple, rng) -> dict:
    """A renderable spec of a composition: the request plus the drawn scene.

    Uncoloured objects get a colour drawn from the palette (two objects of a prompt get two
    different colours, so that they never merge); a requested object without a count is one
    object; a relation places the two objects in the halves of the grid it names, as the
    synthetic dataset does.
    """
    objects, relation = requested_objects(composition)
    taken = {item["colour"] for item in objects if item["colour"] is not None}
    rendered, placements, used_cells = [], [], set()
    for group, item in enumerate(objects):
        colour = item["colour"]
        if colour is None:
            colour = rng.choice(sorted(set(COLOURS) - taken))
            taken.add(colour)
        count = item["count"] or 1
        rendered.append({"colour": colour, "shape": item["shape"], "count": count})
        free = [cell for cell in _region(relation, group) if cell not in used_cells]
        cells = rng.sample(free, count)
        used_cells.update(cells)
        placements.append(random_placements(rng, cells))
    return {
        "task": composition[0],
        "composition": list(composition),
        "caption": caption_of(composition),
        "objects": objects,
        "relation": relation,
        "scene": {"objects": rendered, "placements": placements},
    }


def benchmark_spec(index: int, split: str = "train", seed: int = 0) -> dict:
    """Sample `index` of a split: a task drawn uniformly, one of its compositions of that split,
    and the scene (deterministic in seed, split and index)."""
    rng = _seeded(seed, "benchmark", split, index)
    task = rng.choice(TASKS)
    composition = rng.choice(compositions(task, split))
    return make_spec(composition, rng)


def evaluation_specs(split: str = "held_out", per_task: int = 16, seed: int = 0) -> list[dict]:
    """`per_task` prompts of every task (cycling through the split's compositions), task by
    task, with their drawn scenes (the scenes are only needed to check the evaluator)."""
    specs = []
    for task in TASKS:
        pool = compositions(task, split)
        for index in range(per_task):
            rng = _seeded(seed, "evaluation", split, task, index)
            specs.append(make_spec(pool[index % len(pool)], rng))
    return specs


def render_benchmark(spec: dict, resolution: int) -> np.ndarray:
    """The spec's scene as uint8 (resolution, resolution, 3) RGB."""
    return render_scene(spec["scene"], resolution)


# ---- the evaluator ------------------------------------------------------------------------


def check_benchmark_image(image: np.ndarray, spec: dict) -> dict[str, bool]:
    """The checks of one uint8 (H, W, 3) image against a benchmark spec: {name: passed}.

    For each requested object, the detected objects of its shape (and colour, when the prompt
    names one) must number exactly its count, or at least one when it has none; a relation
    must hold between the mean centres of the two objects' matches.
    """
    found = detect_objects(image)
    checks: dict[str, bool] = {}
    matches = []
    for number, item in enumerate(spec["objects"]):
        matching = [
            candidate
            for candidate in found
            if candidate.shape == item["shape"]
            and (item["colour"] is None or candidate.colour == item["colour"])
        ]
        matches.append(matching)
        if item["count"] is None:
            checks[f"object{number}_present"] = bool(matching)
        else:
            checks[f"object{number}_count"] = len(matching) == item["count"]
    if spec.get("relation"):
        checks["relation"] = _relation_holds(spec["relation"], matches[0], matches[1])
    return checks


@dataclass
class BenchmarkScore:
    """Per task: fraction of correct images and mean fraction of checks passed; overall: the
    mean over the tasks present (GenEval's overall score)."""

    per_task: dict[str, float]
    per_task_checks: dict[str, float]
    overall: float
    correct: list[bool]


def score_benchmark(images, specs: list[dict]) -> BenchmarkScore:
    """Score images ((B, 3, H, W) in [-1, 1], or uint8 (B, H, W, 3)) against their specs."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs: give one per image")
    by_task: dict[str, list[tuple[bool, float]]] = {}
    correct = []
    for image, spec in zip(images, specs, strict=True):
        checks = check_benchmark_image(image, spec)
        passed = all(checks.values())
        correct.append(passed)
        by_task.setdefault(spec["task"], []).append((passed, sum(checks.values()) / len(checks)))
    per_task = {
        task: sum(passed for passed, _ in rows) / len(rows) for task, rows in by_task.items()
    }
    per_task_checks = {
        task: sum(fraction for _, fraction in rows) / len(rows) for task, rows in by_task.items()
    }
    overall = sum(per_task.values()) / max(1, len(per_task))
    return BenchmarkScore(per_task, per_task_checks, overall, correct)


# ---- shards -------------------------------------------------------------------------------


def write_benchmark_shards(
    output_prefix: str | Path,
    count: int,
    resolution: int,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> dict:
    """Write `count` training samples (train split only) as image-text shards.

    Each sample has ``png``, ``txt`` (the caption) and ``json`` ({"caption", "spec"}). A
    held-out composition reaching the writer is a bug, and stops it before anything is renamed
    into place.
    """
    with ShardWriter(output_prefix, samples_per_shard=samples_per_shard) as writer:
        for index in range(count):
            spec = benchmark_spec(index, "train", seed)
            if is_held_out(spec["composition"]):
                raise AssertionError(
                    f"held-out composition {spec['composition']} drawn for a training shard"
                )
            writer.write(
                f"bench-{index:09d}",
                {
                    "png": encode_png(render_benchmark(spec, resolution)),
                    "txt": spec["caption"].encode(),
                    "json": json.dumps({"caption": spec["caption"], "spec": spec}).encode(),
                },
            )
    return writer.summary()
