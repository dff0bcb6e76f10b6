"""The conditional 2-D toy data: eight classes of shaped point clouds with known laws.

Eight classes, each a differently shaped 2-D distribution (ring, blob, bar, cross, two blobs,
square outline, spiral, arc) centred on a circle of radius CENTER_RADIUS. A fixed random
TEXT_DIM-wide embedding per class plays the text features (one token), and one more row plays
the negative prompt. `DataPool` is a large fixed draw to train from; `ToyStream`
(apex_dist.data.streams, `data.kind: toy`) serves it to the Trainer, and
tools/toy_experiment.py scores samples against `sample_data`'s true distributions.
"""

from __future__ import annotations

import math

import torch

NUM_CLASSES = 8
# Class centres lie on a circle of this radius; shapes stay within SHAPE_RADIUS of the centre,
# so each class's Voronoi cell (its "region") contains its whole shape.
CENTER_RADIUS = 4.0
SHAPE_RADIUS = 1.2
# Width of the class embeddings: model.toy.text_dim's default.
TEXT_DIM = 16
# Row of the embedding table that plays the negative prompt "Generate an image.".
NEGATIVE_INDEX = NUM_CLASSES
EMBEDDING_SEED = 1234
# Training draws batches from a fixed pool of this many true samples per seed.
POOL_SIZE = 1 << 17


def class_centers() -> torch.Tensor:
    """(NUM_CLASSES, 2): the centre of each class, evenly spaced on the circle."""
    angles = torch.arange(NUM_CLASSES) * (2 * math.pi / NUM_CLASSES)
    return CENTER_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def _shape_points(label: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Points of one class's shape around the origin, within SHAPE_RADIUS."""
    uniform = torch.rand(count, generator=generator)
    normal = torch.randn(count, 2, generator=generator)
    if label == 0:  # ring
        angle = 2 * math.pi * uniform
        points = 0.9 * torch.stack([torch.cos(angle), torch.sin(angle)], 1) + 0.05 * normal
    elif label == 1:  # round blob
        points = 0.35 * normal
    elif label == 2:  # horizontal bar
        points = torch.stack([2 * uniform - 1, torch.zeros(count)], 1) + 0.05 * normal
    elif label == 3:  # cross
        along = 2 * uniform - 1
        horizontal = torch.rand(count, generator=generator) < 0.5
        points = (
            torch.where(
                horizontal[:, None],
                torch.stack([along, torch.zeros(count)], 1),
                torch.stack([torch.zeros(count), along], 1),
            )
            + 0.05 * normal
        )
    elif label == 4:  # two blobs
        side = torch.where(torch.rand(count, generator=generator) < 0.5, -0.6, 0.6)
        points = torch.stack([side, torch.zeros(count)], 1) + 0.15 * normal
    elif label == 5:  # square outline
        along = 2 * uniform - 1
        edge = torch.randint(0, 4, (count,), generator=generator)
        x = torch.where(edge < 2, along, torch.where(edge == 2, -1.0, 1.0)) * 0.7
        y = torch.where(edge < 2, torch.where(edge == 0, -1.0, 1.0), along) * 0.7
        points = torch.stack([x, y], 1) + 0.03 * normal
    elif label == 6:  # spiral
        turn = 3 * math.pi * uniform
        radius = 0.15 + 0.3 * turn / math.pi
        points = (
            torch.stack([radius * torch.cos(turn), radius * torch.sin(turn)], 1) + 0.04 * normal
        )
    else:  # half-moon arc
        angle = math.pi * uniform
        points = torch.stack([torch.cos(angle), torch.sin(angle) - 0.5], 1) + 0.06 * normal
    return points.clamp(-SHAPE_RADIUS, SHAPE_RADIUS)


def sample_data(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """True samples (B, 2) for class labels (B,)."""
    points = torch.empty(labels.shape[0], 2)
    for label in range(NUM_CLASSES):
        chosen = labels == label
        if chosen.any():
            points[chosen] = _shape_points(label, int(chosen.sum()), generator)
    return points + class_centers()[labels]


def class_embeddings() -> torch.Tensor:
    """(NUM_CLASSES + 1, 1, TEXT_DIM): one "text token" per class, and the negative prompt."""
    generator = torch.Generator().manual_seed(EMBEDDING_SEED)
    return torch.randn(NUM_CLASSES + 1, 1, TEXT_DIM, generator=generator)


class DataPool:
    """A large fixed draw of (label, point) pairs to train from: drawing a batch is one index."""

    def __init__(self, size: int, generator: torch.Generator):
        self.labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
        self.points = sample_data(self.labels, generator)
        self.embeddings = class_embeddings()

    def batch(self, rows: int, generator: torch.Generator, dropout: float = 0.0) -> dict:
        """A batch in the objectives' format; `dropout` replaces text by the negative prompt."""
        index = torch.randint(0, self.labels.shape[0], (rows,), generator=generator)
        text_labels = self.labels[index]
        if dropout > 0:
            dropped = torch.rand(rows, generator=generator) < dropout
            text_labels = torch.where(dropped, NEGATIVE_INDEX, text_labels)
        return {
            "latents": self.points[index],
            "text": self.embeddings[text_labels],
            "text_mask": torch.ones(rows, 1, dtype=torch.bool),
            "neg_text": self.embeddings[NEGATIVE_INDEX : NEGATIVE_INDEX + 1],
            "neg_text_mask": torch.ones(1, 1, dtype=torch.bool),
        }
