"""The exact evaluator of the synthetic dataset: does an image show what its prompt asks for?

Like GenEval for real images, but exact: pixels are classified by the nearest palette colour
(within a tolerance), each colour's 4-connected components of at least a minimum area are the
detected objects, and an object's shape follows from how much of its bounding box it fills
(square 1.0, circle about 0.8, triangle about 0.55). Per image the checks are, for each group
of the prompt: an object of its colour is present, one of its colour has its shape, and the
count of objects of its colour and shape is exact; and, for two groups, their relative position
(the mean centres of the groups' objects). An image's score is the fraction of its checks that
pass; `correct` says whether all of them do. Dataset images score 1; noise scores about 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from apex_dist.data.synthetic import BACKGROUND, COLOURS, GRID, MIN_OBJECT_PIXELS, parse_caption

# A pixel belongs to a palette colour within this RGB distance (0-255 scale); the palette's
# colours are over 150 apart, so a pixel is never within the tolerance of two of them.
COLOUR_TOLERANCE = 60.0
# Components smaller than this fraction of the smallest object's bounding box are noise (the
# smallest object, a triangle, fills about half of it).
MIN_AREA_FRACTION = 0.35
# Smallest object side as a fraction of the cell (the low end of synthetic.OBJECT_SIZE_RANGE).
SMALLEST_OBJECT_FRACTION = 0.65
# Fill ratio (area / bounding-box area) boundaries: squares fill 1.0, rendered circles
# 0.76-0.89, triangles 0.50-0.60 (measured on the renderer for sides 5 to 45 pixels).
SQUARE_MIN_FILL = 0.93
CIRCLE_MIN_FILL = 0.68


@dataclass
class DetectedObject:
    colour: str
    shape: str
    area: int
    centre: tuple[float, float]  # (row, column) in pixels


@dataclass
class Evaluation:
    """Scores of a set of images: per image in [0, 1], whether all checks pass, and the mean."""

    scores: list[float]
    correct: list[bool]
    mean: float
    accuracy: float  # fraction of images with every check passed
    details: list[dict]


def _label(classes: np.ndarray) -> np.ndarray:
    """4-connected component labels of equal, non-negative classes (-1: no component).

    Every pixel starts with its own flat index as label; labels shrink to the smallest in the
    component by taking neighbours' minima and jumping through labels (a label is a pixel of
    the same component), which converges in a few dozen vectorised passes.
    """
    height, width = classes.shape
    foreground = classes >= 0
    labels = np.where(foreground, np.arange(height * width).reshape(height, width), -1)
    same_below = foreground[:-1] & (classes[:-1] == classes[1:])
    same_right = foreground[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    while True:
        updated = labels.copy()
        up, down = updated[:-1], updated[1:]
        np.minimum(up, np.where(same_below, labels[1:], up), out=up)
        np.minimum(down, np.where(same_below, labels[:-1], down), out=down)
        left, right = updated[:, :-1], updated[:, 1:]
        np.minimum(left, np.where(same_right, labels[:, 1:], left), out=left)
        np.minimum(right, np.where(same_right, labels[:, :-1], right), out=right)
        flat = updated.reshape(-1)
        updated = np.where(foreground, flat[np.maximum(updated, 0)].reshape(height, width), -1)
        if np.array_equal(updated, labels):
            return labels
        labels = updated


def classify_shape(pixels: np.ndarray) -> str:
    extent = pixels.max(axis=0) - pixels.min(axis=0) + 1
    fill = len(pixels) / float(extent[0] * extent[1])
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """Objects in a uint8 (H, W, 3) image of the synthetic dataset's palette."""
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names] + [BACKGROUND], dtype=np.float32)
    distances = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - palette, axis=-1)
    nearest = distances.argmin(axis=-1)
    close = distances.min(axis=-1) <= COLOUR_TOLERANCE
    cell = min(image.shape[:2]) / GRID
    smallest = max(MIN_OBJECT_PIXELS, SMALLEST_OBJECT_FRACTION * cell)
    min_area = MIN_AREA_FRACTION * smallest**2
    classes = np.where(close & (nearest < len(names)), nearest, -1)
    labels = _label(classes)
    found = []
    identities, inverse, areas = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(labels.shape)
    for number, (identity, area) in enumerate(zip(identities, areas, strict=True)):
        if identity < 0 or area < min_area:
            continue
        pixels = np.argwhere(inverse == number)
        centre = pixels.mean(axis=0)
        colour = names[classes.reshape(-1)[identity]]
        found.append(
            DetectedObject(colour, classify_shape(pixels), int(area), (centre[0], centre[1]))
        )
    return found


def _relation_holds(relation: str, first: list, second: list) -> bool:
    if not first or not second:
        return False
    axis = 1 if relation in ("left of", "right of") else 0
    first_centre = np.mean([item.centre[axis] for item in first])
    second_centre = np.mean([item.centre[axis] for item in second])
    if relation in ("left of", "above"):
        return bool(first_centre < second_centre)
    return bool(first_centre > second_centre)


def check_image(image: np.ndarray, spec: dict) -> dict:
    """The checks of one uint8 (H, W, 3) image against a spec: {name: passed}."""
    objects = detect_objects(image)
    checks: dict[str, bool] = {}
    groups = []
    for number, item in enumerate(spec["objects"]):
        of_colour = [found for found in objects if found.colour == item["colour"]]
        matching = [found for found in of_colour if found.shape == item["shape"]]
        checks[f"group{number}_present"] = bool(of_colour)
        checks[f"group{number}_shape"] = bool(matching)
        checks[f"group{number}_count"] = len(matching) == item["count"]
        groups.append(matching or of_colour)
    if spec.get("relation"):
        checks["relation"] = _relation_holds(spec["relation"], groups[0], groups[1])
    return checks


def _as_spec(spec) -> dict:
    if isinstance(spec, str):
        return parse_caption(spec)
    if isinstance(spec, dict) and "objects" not in spec and "spec" in spec:
        return spec["spec"]  # a sample's json metadata {"caption", "spec"}
    if isinstance(spec, dict) and "objects" in spec:
        return spec
    raise ValueError(
        f"a spec must be a scene dict with 'objects', a metadata dict with 'spec', or a caption "
        f"string (got {type(spec).__name__})"
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) (got {tuple(images.shape)})")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def evaluate_images(images: torch.Tensor, specs: list) -> Evaluation:
    """Score images (B, 3, H, W) in [-1, 1] against their specs (dicts or captions)."""
    if len(specs) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(specs)} specs: give one per image")
    scores, correct, details = [], [], []
    for image, spec in zip(to_uint8(images), specs, strict=True):
        checks = check_image(image, _as_spec(spec))
        scores.append(sum(checks.values()) / len(checks))
        correct.append(all(checks.values()))
        details.append(checks)
    count = max(1, len(scores))
    return Evaluation(scores, correct, sum(scores) / count, sum(correct) / count, details)
