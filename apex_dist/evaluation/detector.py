"""COCO instance segmentation with Mask2Former from a local snapshot: the objects GenEval counts.

GenEval detects with mmdetection's Mask2Former (Swin-S backbone, COCO instance segmentation).
transformers implements the same architecture (`Mask2FormerForUniversalSegmentation`), and its
COCO instance checkpoints (`facebook/mask2former-swin-{tiny,small,base,large}-coco-instance`)
carry the 80 COCO classes; the Swin-S one is GenEval's own detector.

From raw outputs to detections this module follows mmdetection's instance post-processing
(`MaskFormerFusionHead.instance_postprocess`, the code GenEval ran), not transformers'
`post_process_instance_segmentation` (which resamples masks through a fixed 384x384 grid):

- the image is resized to fit SHORTEST_EDGE x LONGEST_EDGE keeping its aspect ratio and padded
  to a multiple of 32 (mmdetection's test pipeline for these models), normalised as the
  snapshot's preprocessor_config.json says;
- class probabilities are the softmax over the classes and "no object", without the latter;
  the MAX_DETECTIONS_PER_IMAGE most probable (query, class) pairs are candidates;
- each candidate's mask logits are resized to the padded input, cropped to the image, resized
  to the original image and thresholded at 0; its score is the class probability times the mean
  mask probability inside its mask; its box is the mask's bounding box.

Candidates whose class probability is at most `min_score` are dropped before their masks are
computed: a score never exceeds the class probability, so no candidate that could pass
GenEval's lowest threshold is lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as functional

from apex_dist.evaluation.prompts import COCO_CLASSES, COCO_LABEL_ALIASES
from apex_dist.evaluation.rules import DETECTION_THRESHOLD, Detection
from apex_dist.evaluation.snapshots import check_snapshot, loading_arguments

# Resize of the detector's input: the shorter side to 800 pixels, the longer at most 1333
# (mmdetection's Mask2Former COCO test pipeline: Resize img_scale=(1333, 800), keep_ratio).
SHORTEST_EDGE = 800
LONGEST_EDGE = 1333
# Candidates per image (mmdetection's Mask2Former COCO config: test_cfg max_per_image=100).
MAX_DETECTIONS_PER_IMAGE = 100
# Mask logits above this are inside the mask (mmdetection: mask_pred > 0, probability 0.5).
MASK_LOGIT_THRESHOLD = 0.0
# Added to a mask's area when averaging its probabilities (mmdetection's 1e-6).
MASK_AREA_EPSILON = 1e-6
# What the loader accepts, and an example for errors.
DETECTOR_MODEL_TYPES = ("mask2former",)
DETECTOR_EXAMPLE = "facebook/mask2former-swin-small-coco-instance, GenEval's Swin-S detector"


def coco_class_of_label(label: str) -> str | None:
    """The COCO class (GenEval's name) of a detector label, or None for other labels."""
    name = " ".join(label.lower().replace("_", " ").replace("-", " ").split())
    name = COCO_LABEL_ALIASES.get(name, name)
    return name if name in COCO_CLASSES else None


def class_names_of(id2label: dict[Any, str], source: str) -> dict[int, str]:
    """Label id -> COCO class for every label of the detector that is one; refuses a detector
    that lacks any of the 80 classes (it was trained on another dataset)."""
    table = {}
    for label_id, label in id2label.items():
        name = coco_class_of_label(str(label))
        if name is not None:
            table[int(label_id)] = name
    missing = sorted(set(COCO_CLASSES) - set(table.values()))
    if missing:
        raise ValueError(
            f"the detector {source} does not predict {len(missing)} of the 80 COCO classes "
            f"(for example {missing[:5]}; its config.json id2label holds "
            f"{list(id2label.values())[:5]}...): give a COCO instance segmentation checkpoint "
            f"such as {DETECTOR_EXAMPLE}"
        )
    return table


class InstanceDetector:
    """Mask2Former on COCO: images -> `Detection`s with masks (module doc).

    Args:
        model: a `Mask2FormerForUniversalSegmentation` in eval mode.
        processor: its image processor (resize, normalise, pad).
        class_names: label id -> COCO class.
        shortest_edge, longest_edge: the resize of the input (module doc).
    """

    def __init__(
        self,
        model,
        processor,
        class_names: dict[int, str],
        shortest_edge: int = SHORTEST_EDGE,
        longest_edge: int = LONGEST_EDGE,
    ):
        self.model = model
        self.processor = processor
        self.class_names = class_names
        self.size = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}

    @classmethod
    def from_snapshot(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        shortest_edge: int = SHORTEST_EDGE,
        longest_edge: int = LONGEST_EDGE,
    ) -> InstanceDetector:
        """Load a Mask2Former COCO instance snapshot folder (fp32, as GenEval runs it)."""
        config = check_snapshot(path, "the detector", DETECTOR_MODEL_TYPES, DETECTOR_EXAMPLE)
        class_names = class_names_of(config.get("id2label", {}), str(path))
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil

        model = Mask2FormerForUniversalSegmentation.from_pretrained(
            str(path), dtype=torch.float32, **loading_arguments()
        )
        processor = Mask2FormerImageProcessorPil.from_pretrained(str(path), local_files_only=True)
        return cls(model.to(device).eval(), processor, class_names, shortest_edge, longest_edge)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> InstanceDetector:
        self.model.to(device)
        return self

    @torch.no_grad()
    def detect(self, images: list, min_score: float = DETECTION_THRESHOLD) -> list[list[Detection]]:
        """The detections of each PIL image scoring above `min_score`, masks on the CPU."""
        inputs = self.processor(
            images=[image.convert("RGB") for image in images], size=self.size, return_tensors="pt"
        )
        pixel_values = inputs["pixel_values"].to(self.device)
        pixel_mask = inputs["pixel_mask"].to(self.device)
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        padded_size = tuple(pixel_values.shape[-2:])
        results = []
        for index, image in enumerate(images):
            valid = pixel_mask[index].bool()
            resized = (int(valid.any(1).sum()), int(valid.any(0).sum()))
            results.append(
                self._instances(
                    outputs.class_queries_logits[index].float(),
                    outputs.masks_queries_logits[index].float(),
                    padded_size,
                    resized,
                    (image.height, image.width),
                    min_score,
                )
            )
        return results

    def _instances(
        self,
        class_logits: torch.Tensor,  # (queries, classes + 1)
        mask_logits: torch.Tensor,  # (queries, h, w) at a quarter of the padded input
        padded_size: tuple[int, int],
        resized_size: tuple[int, int],
        original_size: tuple[int, int],
        min_score: float,
    ) -> list[Detection]:
        probabilities = class_logits.softmax(-1)[:, :-1]  # (queries, classes)
        classes = probabilities.shape[1]
        candidates = min(MAX_DETECTIONS_PER_IMAGE, probabilities.numel())
        top_probabilities, top_indices = probabilities.flatten().topk(candidates)
        keep = top_probabilities > min_score
        top_probabilities, top_indices = top_probabilities[keep], top_indices[keep]
        labels = (top_indices % classes).tolist()
        queries = top_indices // classes
        if not len(labels):
            return []
        logits = functional.interpolate(
            mask_logits[queries][None], size=padded_size, mode="bilinear", align_corners=False
        )
        logits = logits[..., : resized_size[0], : resized_size[1]]
        logits = functional.interpolate(
            logits, size=original_size, mode="bilinear", align_corners=False
        )[0]  # (candidates, H, W)
        masks = logits > MASK_LOGIT_THRESHOLD
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (
            masks.flatten(1).sum(1) + MASK_AREA_EPSILON
        )
        scores = (top_probabilities * mask_scores).tolist()
        detections = []
        for candidate, label in enumerate(labels):
            name = self.class_names.get(label)
            mask = masks[candidate]
            if name is None or scores[candidate] <= min_score or not bool(mask.any()):
                continue
            rows = torch.nonzero(mask.any(1)).flatten()
            columns = torch.nonzero(mask.any(0)).flatten()
            box = (
                float(columns[0]),
                float(rows[0]),
                float(columns[-1]) + 1,
                float(rows[-1]) + 1,
            )
            detections.append(Detection(name, scores[candidate], box, mask.cpu()))
        return detections
