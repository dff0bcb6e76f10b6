"""The quickstart (tools/quickstart.py, `make demo`): pixel codec, preset, shipped teacher, and a
shortened run of the whole driver (2 DeepSpeed ranks on CPU, ZeRO-3, resume)."""

from __future__ import annotations

import json

import pytest
import torch

from apex_dist.config import load_config
from apex_dist.models.pixels import TOKEN_FEATURES, PixelCodec
from apex_dist.models.qwen_image import QwenImageTransformer
from apex_tools import quickstart


def test_pixel_codec_round_trips_and_keeps_a_half_size_image_in_front():
    codec = PixelCodec()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    packed, image_shape = codec.encode(images)
    assert packed.shape == (2, 64, TOKEN_FEATURES) and image_shape == (1, 8, 8)
    assert torch.equal(codec.decode(packed, image_shape), images)
    # unpacked like a Qwen-Image latent (channel, 2x2 patch), the first three channels are the
    # image's every other pixel: what the training loop's validation grids show
    latent = packed.reshape(2, 8, 8, 12, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 12, 16, 16)
    assert torch.equal(latent[:, :3], images[:, :, ::2, ::2])
    # one token is one 4x4 pixel patch
    assert torch.equal(packed[0, 0].sort().values, images[0, :, :4, :4].flatten().sort().values)
    with pytest.raises(ValueError, match="multiples of 4"):
        codec.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="do not match image_shape"):
        codec.decode(packed, (1, 4, 8))


def test_pixel_preset_reads_the_codec_tokens():
    model = QwenImageTransformer.from_preset("qwen-image-pixels-tiny")
    packed, image_shape = PixelCodec().encode(torch.zeros(2, 3, 32, 32))
    times = torch.full((2,), 0.5)
    text = torch.randn(2, 5, 32)
    velocity = model(
        packed,
        times,
        times,
        text,
        torch.ones(2, 5, dtype=torch.bool),
        None,
        image_shape=image_shape,
    )
    assert velocity.shape == packed.shape


def test_quickstart_config_is_the_pixel_apex_run():
    config = load_config(quickstart.CONFIG)
    assert config.model.preset == "qwen-image-pixels-tiny"
    assert config.method.objective == "apex_v0" and config.method.loss.kind == "l2"
    assert config.method.guidance.ratio == 0.0
    assert config.parallel.zero_stage == 3 and config.checkpoint.resume == "latest"


def test_shipped_teacher_loads_and_its_50_steps_beat_its_1_step(tmp_path):
    """The shipped teacher is an fm run of this repository's driver, exported with E2; it loads
    into the preset, and on the demo's first prompts its 50-step samples pass most of the
    evaluator's checks and clearly more than its 1-step samples."""
    from apex_dist.data import evaluate_images
    from apex_dist.distributed.engine import VelocityModelAdapter
    from apex_dist.method import sample_euler

    snapshot = quickstart.SHIPPED_TEACHER
    info = json.loads((snapshot / "transformer" / "export_info.json").read_text())
    assert info["apex_keys"] == "kept" and info["dtype"] == "fp32"
    assert info["model"].endswith("qwen-image-pixels-tiny")
    settings = quickstart.parse_arguments(
        ["--out", str(tmp_path), "--scenes", "16", "--shards", "1"]
    )
    settings.evaluation_count = 16
    quickstart.stage_data(settings)
    teacher = quickstart.load_snapshot(snapshot)
    assert teacher.img_in.in_features == TOKEN_FEATURES
    batch = quickstart.evaluation_batch(settings)
    adapter = VelocityModelAdapter(teacher, torch.float32)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    scores = {}
    for steps in (1, 50):
        packed = sample_euler(
            adapter,
            noise,
            batch["text"],
            batch["text_mask"],
            steps=steps,
            image_shape=batch["image_shape"],
        )
        images = PixelCodec().decode(packed, batch["image_shape"])
        assert images.shape == (16, 3, 32, 32) and torch.isfinite(images).all()
        scores[steps] = evaluate_images(images, batch["specs"]).mean
    assert scores[50] > 0.6, scores
    assert scores[50] > scores[1] + 0.15, scores


def test_shortened_quickstart_runs_every_stage_and_resumes(tmp_path, capsys):
    """The driver end to end with 2 ranks: data, a teacher pretrained with fm, the student in
    two launcher invocations (the second resumes), evaluation with grids and the table; a
    second call skips every stage."""
    out = tmp_path / "quickstart"
    arguments = [
        "--out", str(out), "--train-teacher", "--scenes", "16", "--teacher-steps", "3",
        "--student-steps", "4", "--micro-batch-size", "4", "--evaluation-count", "8",
        "logging.every_steps=1", "logging.sample_count=4", "logging.teacher_steps=2",
    ]  # fmt: skip
    assert quickstart.main(arguments) == 0
    printed = capsys.readouterr().out
    stages = json.loads((out / "stages.json").read_text())
    assert stages["data"]["skipped"] is False and stages["data"]["samples"] == 16
    assert stages["teacher"]["skipped"] is False and stages["teacher"]["steps"] == 3
    assert (out / "teacher_model" / "transformer" / "config.json").is_file()
    assert stages["student"]["first_part_steps"] == 2
    assert stages["student"]["resumed_at"] == 2
    assert (out / "student" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert "resumed from" in (out / "logs" / "student_part2.log").read_text()
    assert (out / "student" / "samples" / "step_00000004.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [row["sampler"] for row in results["rows"]] == [
        "teacher 50 steps",
        "teacher 1 step",
        "student 1 NFE",
    ]
    assert results["data_score"] == 1.0
    for row in results["rows"]:
        assert 0.0 <= row["score"] <= 1.0
        grid = out / "grids" / f"{row['sampler'].replace(' ', '_')}.png"
        assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "grids" / "comparison.png").is_file()
    for name in ("| teacher 50 steps |", "| teacher 1 step |", "| student 1 NFE |"):
        assert name in printed
    # everything exists: a second run skips every stage and prints the same table
    assert quickstart.main(arguments) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert stages["data"]["skipped"] and stages["teacher"]["skipped"]
    assert stages["student"]["skipped"]
