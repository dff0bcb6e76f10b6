"""The synthetic compositional dataset, its exact evaluator, and the synthetic and toy streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_dist.config import DataConfig
from apex_dist.data import build_stream, evaluate_images, make_scene, parse_caption, render_scene
from apex_dist.data.streams import DataStateError
from apex_dist.data.synthetic import BACKGROUND, write_synthetic_shards


def as_images(specs, resolution):
    pixels = np.stack([render_scene(spec, resolution) for spec in specs])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_scenes_are_deterministic_and_captions_parse_back():
    assert make_scene(7, seed=1) == make_scene(7, seed=1)
    assert make_scene(7, seed=1) != make_scene(7, seed=2)
    for index in range(100):
        spec = make_scene(index)
        parsed = parse_caption(spec["caption"])
        assert parsed["objects"] == spec["objects"]
        assert parsed["relation"] == spec["relation"]
    assert parse_caption("two red circles left of a blue square")["objects"][0]["count"] == 2
    with pytest.raises(ValueError, match="not of the synthetic dataset's form"):
        parse_caption("a photo of a cat")
    rendered = render_scene(make_scene(3), 64)
    assert rendered.shape == (64, 64, 3) and rendered.dtype == np.uint8
    assert np.array_equal(rendered, render_scene(make_scene(3), 64))


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_dataset_images_score_one_and_noise_scores_near_zero(resolution):
    count = 120 if resolution < 128 else 40
    specs = [make_scene(index, seed=5) for index in range(count)]
    real = evaluate_images(as_images(specs, resolution), specs)
    assert real.mean == 1.0 and real.accuracy == 1.0
    assert len(real.scores) == count
    # captions alone are enough to score (positions come from the image)
    assert evaluate_images(as_images(specs, resolution), [s["caption"] for s in specs]).mean == 1
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(count, 3, resolution, resolution, generator=generator) * 2 - 1
    gaussian = torch.randn(count, 3, resolution, resolution, generator=generator)
    assert evaluate_images(uniform, specs).mean < 0.05
    assert evaluate_images(gaussian, specs).mean < 0.05
    blank = torch.full((count, 3, resolution, resolution), BACKGROUND[0] / 127.5 - 1)
    assert evaluate_images(blank, specs).mean == 0.0


def test_evaluator_catches_wrong_counts_shapes_colours_and_positions():
    spec = {
        "caption": "two red circles left of a blue square",
        "objects": [
            {"colour": "red", "shape": "circle", "count": 2},
            {"colour": "blue", "shape": "square", "count": 1},
        ],
        "relation": "left of",
        "placements": [
            [
                {"cell": [0, 0], "size": 0.8, "offset": [0, 0]},
                {"cell": [2, 1], "size": 0.8, "offset": [0, 0]},
            ],
            [{"cell": [1, 3], "size": 0.8, "offset": [0, 0]}],
        ],
    }
    image = as_images([spec], 64)
    assert evaluate_images(image, [spec]).scores == [1.0]
    wrong = [
        "three red circles left of a blue square",  # count
        "two red triangles left of a blue square",  # shape
        "two green circles left of a blue square",  # colour
        "two red circles right of a blue square",  # position
    ]
    result = evaluate_images(image.expand(4, -1, -1, -1), wrong)
    assert all(0 < score < 1 for score in result.scores)
    assert not any(result.correct)
    assert result.details[3]["relation"] is False and result.details[0]["group0_count"] is False
    # a slightly blurred and noisy copy still scores 1 (colours within the tolerance)
    noisy = image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    assert evaluate_images(noisy.clamp(-1, 1), [spec]).mean == 1.0


def test_synthetic_shards_stream_with_specs_that_score_one(tmp_path):
    summary = write_synthetic_shards(tmp_path / "shapes", 40, 32, seed=2, samples_per_shard=16)
    assert summary["samples"] == 40 and len(summary["shards"]) == 3
    config = DataConfig(
        kind="webdataset",
        urls=[str(tmp_path / "shapes-{000000..000002}.tar")],
        sample_kind="image_text",
        resolution=32,
        shuffle_buffer=8,
    )
    for batch in [b for _, b in zip(range(4), build_stream(config, 0, 1, 4, seed=0), strict=False)]:
        assert batch["image"].shape == (4, 3, 32, 32)
        assert [meta["caption"] for meta in batch["metadata"]] == batch["prompt"]
        assert evaluate_images(batch["image"], batch["metadata"]).mean == 1.0


def test_synthetic_stream_is_deterministic_resumable_and_split_by_rank():
    config = DataConfig(
        kind="synthetic", sample_kind="image_text", resolution=32, synthetic_size=64
    )
    stream = build_stream(config, rank=1, world_size=2, micro_batch_size=4, seed=0)
    batches = [b for _, b in zip(range(10), stream, strict=False)]
    assert stream.batches_per_epoch == 8 and stream.epoch == 1
    assert batches[0]["key"] == [f"synthetic-{index:09d}" for index in range(4, 8)]
    assert batches[8]["key"] == batches[0]["key"]  # the second epoch repeats the scenes
    assert evaluate_images(batches[0]["image"], batches[0]["metadata"]).mean == 1.0
    resumed = build_stream(config, rank=1, world_size=2, micro_batch_size=4, seed=0)
    resumed.load_state_dict({**stream.state_dict(), "batches": 3})
    assert next(iter(resumed))["key"] == batches[3]["key"]
    prompts = DataConfig(kind="synthetic", resolution=32)
    batch = next(iter(build_stream(prompts, 0, 1, 2, seed=0)))
    assert "image" not in batch and len(batch["prompt"]) == 2


def test_toy_stream_gives_objective_batches_and_resumes():
    config = DataConfig(kind="toy")
    stream = build_stream(config, rank=0, world_size=2, micro_batch_size=8, seed=0)
    first = [b for _, b in zip(range(3), stream, strict=False)]
    assert first[0]["latents"].shape == (8, 2) and first[0]["text_mask"].all()
    resumed = build_stream(config, rank=0, world_size=2, micro_batch_size=8, seed=0)
    resumed.load_state_dict({**stream.state_dict(), "batches": 2})
    assert torch.equal(next(iter(resumed))["latents"], first[2]["latents"])
    other_rank = next(iter(build_stream(config, rank=1, world_size=2, micro_batch_size=8, seed=0)))
    assert not torch.equal(other_rank["latents"], first[0]["latents"])
    synthetic = build_stream(
        DataConfig(kind="synthetic", synthetic_size=64),
        rank=0,
        world_size=2,
        micro_batch_size=8,
        seed=0,
    )
    with pytest.raises(DataStateError, match="kind"):
        resumed.load_state_dict(synthetic.state_dict())
