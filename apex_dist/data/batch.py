"""`TrainBatch`: the one batch layout that objectives, the engine and validation read.

`apex_dist.data.prepare.BatchPreparer` makes it from every sample kind (prompts, images with
captions, precomputed features with or without latents, synthetic scenes, the 2-D toy's
points). Tests and library users build it by hand::

    batch = TrainBatch(text=features, text_mask=mask, latents=latents)

or pass a plain dict with the same names (``{"text": ..., "text_mask": ..., "latents": ...}``),
which the objectives turn into a TrainBatch with `as_train_batch`.

Fields (B rows):
    text (B, S, D), text_mask (B, S)   text features and their mask (True: a real token)
    latents (B, ...) or None           the data; None for prompt-only (data-free) training
    latent_shape or None               one row's generated shape, e.g. (tokens, channels):
                                       what data-free training generates when there are no
                                       latents
    image_shape (frames, h, w) or None the token grid of every row's image; passed to the model
                                       with each call (Qwen-Image needs it to place its tokens)
    neg_text (1 or B, S', D), neg_text_mask or None
                                       the negative prompt's features (guidance, text dropout)
    keys, prompts                      each row's sample key and prompt, for logs and labels
    truncated_prompts, text_dropped    counters: prompts cut at model.text_max_length, and rows
                                       whose text was replaced by the negative prompt
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

ImageShape = tuple[int, int, int]


@dataclass
class TrainBatch:
    """One micro-batch as the objectives read it (module doc for every field)."""

    text: Tensor
    text_mask: Tensor
    latents: Optional[Tensor] = None
    latent_shape: Optional[tuple[int, ...]] = None
    image_shape: Optional[ImageShape] = None
    neg_text: Optional[Tensor] = None
    neg_text_mask: Optional[Tensor] = None
    keys: list[str] = field(default_factory=list)
    prompts: Optional[list[str]] = None
    truncated_prompts: int = 0
    text_dropped: int = 0

    @property
    def rows(self) -> int:
        return self.text.shape[0]

    @classmethod
    def from_dict(cls, batch: Mapping[str, Any]) -> TrainBatch:
        """A TrainBatch from a dict with the field names (plus `key` and `prompt`, the stream's
        names for keys and prompts); other keys are ignored. Raises KeyError naming a missing
        'text' or 'text_mask'."""
        for key in ("text", "text_mask"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r} (keys present: {sorted(batch)})")
        names = {item.name for item in dataclasses.fields(cls)} - {"keys", "prompts"}
        values = {name: batch[name] for name in names if batch.get(name) is not None}
        if "image_shape" in values:
            values["image_shape"] = normalise_image_shape(values["image_shape"])
        if "latent_shape" in values:
            values["latent_shape"] = tuple(int(size) for size in values["latent_shape"])
        keys = batch.get("keys", batch.get("key"))
        prompts = batch.get("prompts", batch.get("prompt"))
        return cls(
            **values,
            keys=[str(key) for key in keys] if keys is not None else [],
            prompts=[str(prompt) for prompt in prompts] if prompts is not None else None,
        )

    def to(self, device: Union[torch.device, str]) -> TrainBatch:
        """The same batch with every tensor on `device`."""
        moved = {
            item.name: getattr(self, item.name).to(device)
            for item in dataclasses.fields(self)
            if isinstance(getattr(self, item.name), Tensor)
        }
        return dataclasses.replace(self, **moved)

    def generated_shape(self) -> tuple[int, ...]:
        """(B, ...): the shape of the latents, or of what data-free training generates."""
        if self.latents is not None:
            return tuple(self.latents.shape)
        if self.latent_shape is None:
            raise KeyError(
                "data-free mode needs batch.latent_shape (the shape of one row's latents) "
                "or batch.latents to know what to generate"
            )
        return (self.rows, *self.latent_shape)

    def labels(self) -> list[str]:
        """A label per row for images and logs: its prompt, else its key, else its index."""
        if self.prompts:
            return list(self.prompts[: self.rows])
        if self.keys:
            return list(self.keys[: self.rows])
        return [f"row {index}" for index in range(self.rows)]


def as_train_batch(batch: Union[TrainBatch, Mapping[str, Any]]) -> TrainBatch:
    """`batch` itself, or a TrainBatch made from a dict (`TrainBatch.from_dict`)."""
    if isinstance(batch, TrainBatch):
        return batch
    if isinstance(batch, Mapping):
        return TrainBatch.from_dict(batch)
    raise TypeError(f"batch must be a TrainBatch or a dict of tensors (got {type(batch).__name__})")


def normalise_image_shape(shape: Any) -> ImageShape:
    """(frames, h, w) as ints from a tuple, a tensor, or one shape per row (collated streams);
    rows of one micro-batch must share it."""
    if isinstance(shape, Tensor):
        shape = shape.tolist()
    if shape and isinstance(shape[0], (Sequence, Tensor)) and not isinstance(shape[0], str):
        rows = [tuple(int(size) for size in row) for row in shape]
        if any(row != rows[0] for row in rows):
            raise ValueError(
                f"batch image_shape differs between rows ({rows}); a micro-batch must hold one "
                "image size (use aspect-ratio buckets)"
            )
        return rows[0]
    return tuple(int(size) for size in shape)
