"""Data: resumable WebDataset streams, shard writing, and the synthetic compositional dataset.

See docs/data.md for the formats, the stream's order and resume, and the tools.
"""

from apex_dist.data.evaluate import Evaluation, evaluate_images
from apex_dist.data.streams import (
    DataQualityError,
    DataStateError,
    SyntheticStream,
    ToyStream,
    WebDatasetStream,
    build_stream,
)
from apex_dist.data.synthetic import make_scene, parse_caption, render_scene

__all__ = [
    "DataQualityError",
    "DataStateError",
    "Evaluation",
    "SyntheticStream",
    "ToyStream",
    "WebDatasetStream",
    "build_stream",
    "evaluate_images",
    "make_scene",
    "parse_caption",
    "render_scene",
]
