"""CLIP from a local snapshot: the colour of a detected object, and CLIP score.

Colour (GenEval's evaluate_images.py, with open_clip's ViT-L-14 "openai" weights, which are the
weights of transformers' `openai/clip-vit-large-patch14`): the object's pixels are kept by its
mask on a CROP_BACKGROUND grey canvas, the canvas is cropped to the object's box, and CLIP
classifies the crop zero-shot among the ten colours. Each colour's class vector is the mean of
the normalised text embeddings of COLOUR_TEMPLATES for the object's class, normalised again
(the zero-shot recipe of Radford et al. 2021, as clip_benchmark implements it).

CLIP score (Hessel et al. 2021, "CLIPScore", as torchmetrics reports it): CLIP_SCORE_SCALE times
the cosine similarity of the image and prompt embeddings, clipped at 0; prompts are cut to the
text model's 77 positions. A cheaper signal than GenEval: no detector, one forward per image.

Images are preprocessed by the snapshot's own settings with transformers' PIL image processor
(shorter side to 224 with bicubic resampling, centre crop, CLIP's mean and standard deviation),
which is what open_clip does for these weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from apex_dist.evaluation.prompts import COLOURS
from apex_dist.evaluation.rules import Detection
from apex_dist.evaluation.snapshots import check_snapshot, loading_arguments

# Background of a masked crop (evaluate_images.py, option `bgcolor`, default "#999").
CROP_BACKGROUND = (153, 153, 153)
# Text templates of the colour classifier, {colour} and {name} filled in (evaluate_images.py).
COLOUR_TEMPLATES = (
    "a photo of a {colour} {name}",
    "a photo of a {colour}-colored {name}",
    "a photo of a {colour} object",
)
# CLIP score = 100 * max(cos, 0) (torchmetrics' CLIPScore; Hessel et al. use 2.5 instead).
CLIP_SCORE_SCALE = 100.0
# Crops classified per forward pass (evaluate_images.py's batch of 16).
CROPS_PER_BATCH = 16
CLIP_MODEL_TYPES = ("clip",)
CLIP_EXAMPLE = "openai/clip-vit-large-patch14, GenEval's ViT-L/14"


def masked_crop(image, detection: Detection):
    """The object's pixels on a grey canvas, cropped to its box (a PIL image)."""
    import numpy
    from PIL import Image

    image = image.convert("RGB")
    if detection.mask is not None:
        mask = numpy.asarray(detection.mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"a {detection.class_name} mask of shape {mask.shape} does not match the "
                f"{image.width}x{image.height} image"
            )
        canvas = Image.new("RGB", image.size, CROP_BACKGROUND)
        image = Image.composite(image, canvas, Image.fromarray(mask.astype(numpy.uint8) * 255))
    x1, y1, x2, y2 = (round(value) for value in detection.box)
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


class ClipModel:
    """A CLIP model and its preprocessing: embeddings, colours of detections, CLIP scores.

    Args:
        model: a `CLIPModel` in eval mode.
        tokenizer: its tokenizer.
        processor: its image processor.
    """

    def __init__(self, model, tokenizer, processor):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self._colour_vectors: dict[str, torch.Tensor] = {}

    @classmethod
    def from_snapshot(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ClipModel:
        check_snapshot(path, "the CLIP model", CLIP_MODEL_TYPES, CLIP_EXAMPLE)
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        model = CLIPModel.from_pretrained(str(path), dtype=dtype, **loading_arguments())
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        processor = CLIPImageProcessorPil.from_pretrained(str(path), local_files_only=True)
        return cls(model.to(device).eval(), tokenizer, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ClipModel:
        self.model.to(device)
        self._colour_vectors = {
            name: vector.to(device) for name, vector in self._colour_vectors.items()
        }
        return self

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) unit vectors; texts longer than the model's positions are cut."""
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """(len(images), D) unit vectors of PIL images."""
        pixels = self.processor(
            images=[image.convert("RGB") for image in images], return_tensors="pt"
        )["pixel_values"]
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        features = self.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def colour_vectors(self, class_name: str) -> torch.Tensor:
        """(colours, D): one zero-shot class vector per colour for objects of `class_name`."""
        if class_name not in self._colour_vectors:
            vectors = []
            for colour in COLOURS:
                texts = [
                    template.format(colour=colour, name=class_name) for template in COLOUR_TEMPLATES
                ]
                vectors.append(
                    torch.nn.functional.normalize(self.text_embeddings(texts).mean(0), dim=-1)
                )
            self._colour_vectors[class_name] = torch.stack(vectors)
        return self._colour_vectors[class_name]

    def colours(self, image, detections: Sequence[Detection], class_name: str) -> list[str]:
        """The colour of each detection of `class_name` in `image` (module doc)."""
        vectors = self.colour_vectors(class_name)
        names = []
        for start in range(0, len(detections), CROPS_PER_BATCH):
            crops = [
                masked_crop(image, item) for item in detections[start : start + CROPS_PER_BATCH]
            ]
            similarity = self.image_embeddings(crops) @ vectors.T
            names += [COLOURS[index] for index in similarity.argmax(-1).tolist()]
        return names

    def clip_scores(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        """CLIP_SCORE_SCALE * max(cos(image, prompt), 0) per pair (module doc)."""
        similarity = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return (CLIP_SCORE_SCALE * similarity.clamp(min=0)).tolist()
