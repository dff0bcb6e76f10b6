"""GenEval's scoring rules on detections: which detections count, and is an image correct?

Pure functions on plain data (no model): the detector gives `Detection`s, a colour classifier is
passed in as a function, and `score_image` applies the rules of GenEval's public
`evaluation/evaluate_images.py` (Ghosh et al., NeurIPS 2023):

1. Which detections count (`select_detections`): those scoring above DETECTION_THRESHOLD, or
   COUNTING_THRESHOLD in the counting task; per class, most confident first, at most
   MAX_OBJECTS_PER_CLASS; overlapping boxes of one class are suppressed above
   MAX_OVERLAP (1.0 in GenEval, so never).
2. Every include clause holds (`score_image`): the class has at least `count` detections; the
   clause's colour, if any, is the colour of each of its `count` most confident detections
   (CLIP on the masked crop, `clip.py`); its position, if any, holds between each of them and
   each object matched by the clause it refers to (`relative_position`). Colour and position
   are judged only on the `count` most confident detections.
3. No exclude clause holds: a class has fewer than `count` detections (in the counting task,
   "three cups" fails with four cups).

An image is correct when all of these hold; the task score is the fraction of correct images
and the GenEval score is the mean of the six task scores (its `summary_scores.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from apex_dist.evaluation.prompts import COLOURS, PromptSpec

# Detection score a detection must exceed to count (evaluate_images.py, option `threshold`,
# default 0.3).
DETECTION_THRESHOLD = 0.3
# The same in the counting task, where a spurious extra object fails the prompt
# (evaluate_images.py, option `counting_threshold`, default 0.9).
COUNTING_THRESHOLD = 0.9
# Detections kept per class, most confident first (evaluate_images.py, `max_objects`, 16).
MAX_OBJECTS_PER_CLASS = 16
# Intersection over union above which a less confident box of the same class is dropped
# (evaluate_images.py, `max_overlap`, default 1.0: no suppression).
MAX_OVERLAP = 1.0
# Fraction of the two objects' summed widths (heights) subtracted from their centres' horizontal
# (vertical) distance before a relation is read (evaluate_images.py, `position_threshold`, 0.1):
# objects that overlap by less than this much are "beside" each other, not "left of".
POSITION_THRESHOLD = 0.1
# A relation holds when the reduced offset along its axis exceeds this fraction of the centres'
# distance, i.e. the direction is within 60 degrees of the axis (evaluate_images.py's 0.5).
DIRECTION_COSINE = 0.5
# A reduced offset below this many pixels on both axes means no relation at all
# (evaluate_images.py's 1e-3).
NEGLIGIBLE_OFFSET = 1e-3


@dataclass
class Detection:
    """One detected object.

    class_name: its COCO class (GenEval's names, `prompts.COCO_CLASSES`).
    score: the detector's confidence in [0, 1].
    box: (x1, y1, x2, y2) in pixels, x to the right and y downwards; x2, y2 exclusive.
    mask: its instance mask (a (H, W) boolean tensor or array of the image), or None.
    """

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: Any = field(default=None, repr=False)

    def to_json(self) -> list[float]:
        return [round(float(value), 2) for value in self.box] + [round(self.score, 4)]


# colour_of(detections of one class, class name) -> the colour name of each detection
ColourClassifier = Callable[[Sequence[Detection], str], list[str]]


@dataclass
class ImageScore:
    """The verdict on one image: correct or not, why not, and the detections that counted."""

    correct: bool
    reasons: list[str]
    detections: dict[str, list[Detection]]


def threshold_for(tag: str) -> float:
    return COUNTING_THRESHOLD if tag == "counting" else DETECTION_THRESHOLD


def box_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    intersection = max(width, 0.0) * max(height, 0.0)

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)

    union = area(first) + area(second) - intersection
    return intersection / union if union > 0 else 0.0


def select_detections(
    detections: Sequence[Detection],
    threshold: float,
    max_per_class: int = MAX_OBJECTS_PER_CLASS,
    max_overlap: float = MAX_OVERLAP,
) -> dict[str, list[Detection]]:
    """Class -> the detections that count: score > threshold, most confident first, at most
    `max_per_class`, boxes overlapping a kept one by more than `max_overlap` IoU dropped."""
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda item: -item.score):
        if detection.score > threshold:
            by_class.setdefault(detection.class_name, []).append(detection)
    selected = {}
    for class_name, candidates in by_class.items():
        kept: list[Detection] = []
        for candidate in candidates[:max_per_class]:
            if max_overlap >= 1.0 or all(
                box_iou(candidate.box, other.box) < max_overlap for other in kept
            ):
                kept.append(candidate)
        selected[class_name] = kept
    return selected


def relative_position(subject: Detection, target: Detection) -> set[str]:
    """Where `subject` lies relative to `target`: a subset of {"left of", "right of", "above",
    "below"} (empty when they overlap too much to say).

    The centres' offset is reduced on each axis by POSITION_THRESHOLD times the two objects'
    summed extent on that axis; a relation holds when the reduced offset along its axis is more
    than DIRECTION_COSINE of the centres' distance."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = subject.box, target.box
    offset_x = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
    offset_y = (ay1 + ay2) / 2 - (by1 + by2) / 2
    extent_x = (ax2 - ax1) + (bx2 - bx1)
    extent_y = (ay2 - ay1) + (by2 - by1)
    reduced_x = math.copysign(max(abs(offset_x) - POSITION_THRESHOLD * extent_x, 0.0), offset_x)
    reduced_y = math.copysign(max(abs(offset_y) - POSITION_THRESHOLD * extent_y, 0.0), offset_y)
    if abs(reduced_x) < NEGLIGIBLE_OFFSET and abs(reduced_y) < NEGLIGIBLE_OFFSET:
        return set()
    distance = math.hypot(offset_x, offset_y)
    direction_x, direction_y = reduced_x / distance, reduced_y / distance
    relations = set()
    if direction_x < -DIRECTION_COSINE:
        relations.add("left of")
    if direction_x > DIRECTION_COSINE:
        relations.add("right of")
    if direction_y < -DIRECTION_COSINE:
        relations.add("above")
    if direction_y > DIRECTION_COSINE:
        relations.add("below")
    return relations


def score_image(
    spec: PromptSpec,
    detections: Sequence[Detection],
    colour_of: Optional[ColourClassifier] = None,
) -> ImageScore:
    """GenEval's verdict on one image of `spec` from all of its detections (module doc).

    `colour_of` names the colour of each given detection; it is called only for clauses with
    a colour, on their `count` most confident detections."""
    selected = select_detections(detections, threshold_for(spec.tag))
    reasons: list[str] = []
    matched: list[Optional[list[Detection]]] = []  # per include clause: its objects, or None
    for clause in spec.include:
        class_name, count = clause["class"], clause["count"]
        found = selected.get(class_name, [])[:count]
        holds = True
        if len(found) < count:
            holds = False
            reasons.append(f"expected {class_name} >= {count}, found {len(found)}")
        if holds and "color" in clause:
            if colour_of is None:
                raise ValueError(f"prompt {spec.prompt!r} needs a colour classifier")
            colours = colour_of(found, class_name)
            wanted = colours.count(clause["color"])
            if wanted < count:
                holds = False
                seen = ", ".join(
                    f"{colours.count(name)} {name}" for name in COLOURS if name in colours
                )
                reasons.append(
                    f"expected {clause['color']} {class_name} >= {count}, found {wanted} "
                    f"{clause['color']} ({seen})"
                )
        if holds and "position" in clause:
            relation, group = clause["position"]
            targets = matched[group]
            if targets is None:
                holds = False
                reasons.append(
                    f"no {spec.include[group]['class']} for {class_name} to be {relation}"
                )
            else:
                for subject in found:
                    for target in targets:
                        relations = relative_position(subject, target)
                        if relation not in relations:
                            holds = False
                            seen = " and ".join(sorted(relations)) or "overlapping"
                            reasons.append(
                                f"expected {class_name} {relation} {target.class_name}, found "
                                f"{seen}"
                            )
                            break
                    if not holds:
                        break
        matched.append(found if holds else None)
    for clause in spec.exclude:
        class_name, count = clause["class"], clause["count"]
        present = len(selected.get(class_name, []))
        if present >= count:
            reasons.append(f"expected {class_name} < {count}, found {present}")
    return ImageScore(not reasons, reasons, selected)
