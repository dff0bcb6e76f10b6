"""Images and their prompts in, GenEval verdicts and CLIP scores out; summaries and reports.

    evaluator = Evaluator.from_snapshots(detector="/models/mask2former-swin-s-coco-instance",
                                         clip="/models/clip-vit-large-patch14", device="cuda")
    results = evaluator.evaluate(images, prompts, specs)     # one ImageResult per image
    summary = summarize(results)                              # per task, GenEval, CLIP score
    write_report(output_dir, summary, results, settings)      # results.json and results.md

An image whose prompt has no GenEval metadata (spec None) gets a CLIP score only. Without a
detector (detector=None) every image gets a CLIP score only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from apex_dist.evaluation.clip import ClipModel
from apex_dist.evaluation.detector import InstanceDetector
from apex_dist.evaluation.prompts import TASKS, PromptSpec
from apex_dist.evaluation.rules import (
    COUNTING_THRESHOLD,
    DETECTION_THRESHOLD,
    MAX_OBJECTS_PER_CLASS,
    MAX_OVERLAP,
    POSITION_THRESHOLD,
    score_image,
)

# Task names in tables (GenEval's README headings).
TASK_TITLES = {
    "single_object": "Single object",
    "two_object": "Two objects",
    "counting": "Counting",
    "colors": "Colors",
    "position": "Position",
    "color_attr": "Color attribution",
}
# Images without GenEval metadata are summarised under this name (CLIP score only).
UNSCORED_TASK = "other"


@dataclass
class ImageResult:
    """The evaluation of one image.

    correct: GenEval's verdict (None without metadata or without a detector).
    reasons: why it is not correct.
    detections: class -> [x1, y1, x2, y2, score] of the detections that counted.
    """

    file: str
    prompt: str
    tag: str
    clip_score: float
    correct: Optional[bool] = None
    reasons: list[str] = field(default_factory=list)
    detections: dict[str, list[list[float]]] = field(default_factory=dict)
    seed: Optional[int] = None


class Evaluator:
    """GenEval-style verdicts (detector + CLIP colours) and CLIP scores for batches of images.

    Args:
        clip: the CLIP model (colours and CLIP score).
        detector: the COCO instance detector, or None for CLIP scores only.
    """

    def __init__(self, clip: ClipModel, detector: Optional[InstanceDetector] = None):
        self.clip = clip
        self.detector = detector

    @classmethod
    def from_snapshots(
        cls,
        clip: str | Path,
        detector: Optional[str | Path] = None,
        device: torch.device | str = "cpu",
        **detector_options: Any,
    ) -> Evaluator:
        """Both models from local snapshot folders (`detector_options`: the input resize)."""
        clip_model = ClipModel.from_snapshot(clip, device=device)
        detector_model = None
        if detector is not None:
            detector_model = InstanceDetector.from_snapshot(
                detector, device=device, **detector_options
            )
        return cls(clip_model, detector_model)

    def to(self, device: torch.device | str) -> Evaluator:
        self.clip.to(device)
        if self.detector is not None:
            self.detector.to(device)
        return self

    def evaluate(
        self,
        images: Sequence,
        prompts: Sequence[str],
        specs: Sequence[Optional[PromptSpec]],
        files: Optional[Sequence[str]] = None,
        seeds: Optional[Sequence[Optional[int]]] = None,
    ) -> list[ImageResult]:
        """One result per PIL image (all sequences of equal length; one batch of the models)."""
        count = len(images)
        if not len(prompts) == len(specs) == count:
            raise ValueError(
                f"{count} images, {len(prompts)} prompts and {len(specs)} specs: give one of "
                "each per image"
            )
        files = list(files) if files is not None else [f"image_{index}" for index in range(count)]
        seeds = list(seeds) if seeds is not None else [None] * count
        clip_scores = self.clip.clip_scores(images, prompts)
        scored = [index for index, spec in enumerate(specs) if spec is not None]
        detections: dict[int, list] = {}
        if self.detector is not None and scored:
            found = self.detector.detect([images[index] for index in scored])
            detections = dict(zip(scored, found, strict=True))
        results = []
        for index in range(count):
            spec = specs[index]
            result = ImageResult(
                file=files[index],
                prompt=prompts[index],
                tag=spec.tag if spec is not None else UNSCORED_TASK,
                clip_score=float(clip_scores[index]),
                seed=seeds[index],
            )
            if index in detections:
                image = images[index]
                verdict = score_image(
                    spec,
                    detections[index],
                    lambda found, name, image=image: self.clip.colours(image, found, name),
                )
                result.correct = verdict.correct
                result.reasons = verdict.reasons
                result.detections = {
                    name: [item.to_json() for item in items]
                    for name, items in verdict.detections.items()
                }
            results.append(result)
        return results


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(results: Sequence[ImageResult]) -> dict[str, Any]:
    """Per task: images, correct images, score (their fraction) and mean CLIP score; the GenEval
    score (mean of the task scores over the tasks present; `complete` when all six are) and the
    mean CLIP score of all images."""
    tasks: dict[str, dict[str, Any]] = {}
    for tag in [*TASKS, UNSCORED_TASK]:
        rows = [result for result in results if result.tag == tag]
        if not rows:
            continue
        judged = [result for result in rows if result.correct is not None]
        correct = sum(1 for result in judged if result.correct)
        tasks[tag] = {
            "images": len(rows),
            "correct": correct if judged else None,
            "score": correct / len(judged) if judged else None,
            "clip_score": _mean([result.clip_score for result in rows]),
        }
    task_scores = [entry["score"] for tag, entry in tasks.items() if tag in TASKS]
    task_scores = [score for score in task_scores if score is not None]
    return {
        "images": len(results),
        "geneval": _mean(task_scores),
        "complete": len(task_scores) == len(TASKS),
        "clip_score": _mean([result.clip_score for result in results]),
        "tasks": tasks,
    }


def rule_settings() -> dict[str, float]:
    """The thresholds in force, written into every report."""
    return {
        "detection_threshold": DETECTION_THRESHOLD,
        "counting_threshold": COUNTING_THRESHOLD,
        "max_objects_per_class": MAX_OBJECTS_PER_CLASS,
        "max_overlap": MAX_OVERLAP,
        "position_threshold": POSITION_THRESHOLD,
    }


def _cell(value: Optional[float], digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per task and one for the GenEval score: images, correct, score, CLIP score."""
    lines = [
        "| task | images | correct | score | CLIP score |",
        "|---|---:|---:|---:|---:|",
    ]
    for tag, entry in summary["tasks"].items():
        title = TASK_TITLES.get(tag, "Other prompts (CLIP score only)")
        correct = "-" if entry["correct"] is None else str(entry["correct"])
        lines.append(
            f"| {title} | {entry['images']} | {correct} | {_cell(entry['score'], 3)} | "
            f"{_cell(entry['clip_score'], 2)} |"
        )
    overall = "GenEval (mean of tasks)" + ("" if summary["complete"] else ", not all six tasks")
    lines.append(
        f"| **{overall}** | {summary['images']} | | **{_cell(summary['geneval'], 3)}** | "
        f"{_cell(summary['clip_score'], 2)} |"
    )
    return "\n".join(lines) + "\n"


def write_report(
    output_dir: str | Path,
    summary: dict[str, Any],
    results: Sequence[ImageResult],
    settings: dict[str, Any],
) -> tuple[Path, Path]:
    """`results.json` (settings, summary, every image) and `results.md` (the table), each
    written atomically; returns their paths."""
    from apex_dist.atomic import atomic_write_json, atomic_write_text

    output_dir = Path(output_dir)
    json_path, markdown_path = output_dir / "results.json", output_dir / "results.md"
    atomic_write_json(
        json_path,
        {
            "settings": {**settings, "rules": rule_settings()},
            "summary": summary,
            "images": [asdict(result) for result in results],
        },
    )
    atomic_write_text(markdown_path, markdown_table(summary))
    return json_path, markdown_path


def evaluate_records(
    evaluator: Evaluator,
    records: Sequence,
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[list[ImageResult], float]:
    """Evaluate `images.ImageRecord`s in batches, with a progress bar (images per second);
    returns the results in record order and the images per second of the whole pass."""
    import time

    from PIL import Image
    from tqdm import tqdm

    results: list[ImageResult] = []
    start = time.perf_counter()
    with tqdm(total=len(records), unit="image", disable=not show_progress) as bar:
        for first in range(0, len(records), batch_size):
            batch = records[first : first + batch_size]
            images = []
            for record in batch:
                with Image.open(record.path) as image:
                    images.append(image.convert("RGB"))
            results += evaluator.evaluate(
                images,
                [record.prompt for record in batch],
                [record.spec for record in batch],
                files=[str(record.path) for record in batch],
                seeds=[record.seed for record in batch],
            )
            bar.update(len(batch))
    seconds = max(time.perf_counter() - start, 1e-9)
    return results, len(records) / seconds
