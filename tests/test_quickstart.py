"""The quickstart (tools/quickstart.py, `make demo`): pixel codec, preset, shipped teacher, and a
shortened run of the whole driver (2 DeepSpeed ranks on CPU, ZeRO-3, resume)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from apex_dist.config import load_config
from apex_dist.data.benchmark import TASKS
from apex_dist.models.pixels import TOKEN_FEATURES, PixelCodec
from apex_dist.models.qwen_image import QwenImageTransformer
from apex_tools import benchmark_method as bench
from apex_tools import quickstart

# How many more of the checks the shipped teacher passes at 50 guided steps than at 1 step on
# 24 held-out prompts: measured 0.618 against 0 (0.486 to 0.632 over three noise seeds).
CHECKS_MARGIN = 0.4


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
    assert config.method.objective == "apex_v0" and config.method.loss.kind == "robust"
    assert config.method.guidance.ratio == 0.8
    assert config.parallel.zero_stage == 3 and config.checkpoint.resume == "latest"


def test_shipped_teacher_loads_and_its_guided_50_steps_pass_held_out_prompts(tmp_path):
    """The shipped teacher is the benchmark tool's export, with how it was made and its CFG
    scale; it loads into the preset, and on held-out compositions its 50 guided steps pass
    checks its single step does not."""
    snapshot = quickstart.SHIPPED_TEACHER
    info = json.loads((snapshot / "teacher_info.json").read_text())
    assert "--export-teacher assets/benchmark_teacher" in info["command"]
    assert info["weights"] in ("trained", "ema") and info["guidance_scale"] > 1
    assert info["curve"][-1]["step"] == info["teacher_steps"]
    teacher = quickstart.load_snapshot(snapshot)
    assert teacher.img_in.in_features == TOKEN_FEATURES
    quickstart.write_text_snapshot_once(tmp_path / "text")
    prompts = bench.Prompts(tmp_path / "text", "held_out", per_task=4)
    scores = {}
    for steps, guidance in ((1, 1.0), (50, info["guidance_scale"])):
        images = bench.run_sampler(teacher, prompts, "teacher", steps, guidance)
        assert images.shape == (24, 3, 32, 32) and torch.isfinite(images).all()
        scores[steps] = bench.score(images, prompts)
    assert scores[50]["checks"] > scores[1]["checks"] + CHECKS_MARGIN, scores
    assert scores[50]["overall"] > 0.25, scores  # measured 0.417 (0.333 to 0.458)


def test_shortened_quickstart_runs_every_stage_and_resumes(tmp_path, capsys):
    """The driver end to end with 2 ranks: data, a teacher pretrained with fm, the student in
    two launcher invocations (the second resumes), evaluation with grids and the table; a
    second call skips every stage."""
    out = tmp_path / "quickstart"
    arguments = [
        "--out", str(out), "--train-teacher", "--scenes", "16", "--teacher-steps", "3",
        "--student-steps", "4", "--micro-batch-size", "4", "--per-task", "2",
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
    guidance = quickstart.DEFAULT_GUIDANCE  # a teacher trained here has no recorded scale
    labels = [f"teacher 50 steps, CFG {guidance:g}", "teacher 1 step", "student 1 NFE"]
    assert [row["sampler"] for row in results["rows"]] == [*labels, "student 4 NFE"]
    # 2 prompts of each of the six tasks in each set; correct renders pass every check
    assert results["prompts"] == {"held_out": 12, "train": 12}
    assert results["held_out_reference_score"] == results["train_reference_score"] == 1.0
    for row in results["rows"]:
        for prompt_set in ("held_out", "train"):
            assert 0.0 <= row[prompt_set]["overall"] <= row[prompt_set]["checks"] <= 1.0
            assert set(TASKS) <= set(row[prompt_set])
        grid = out / "grids" / f"{bench.slug(row['sampler'])}.png"
        assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the labelled grid: a header and 2 rows of each task's held-out prompts, 5 columns
    with Image.open(out / "grids" / "held_out_comparison.png") as grid:
        caption_width = grid.size[0] - 5 * (128 + 4)
        assert 40 < caption_width < 400 and grid.size[1] == 30 + 12 * (128 + 4)
    for label in labels:
        assert f"| {label} |" in printed
    assert "the student at 1 NFE scores" in printed
    # everything exists: a second run skips every stage and prints the same table
    assert quickstart.main(arguments) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert stages["data"]["skipped"] and stages["teacher"]["skipped"]
    assert stages["student"]["skipped"]
