"""tools/bench_gpu.py: the CPU dry run covers every section, the script refuses clearly without
CUDA, and its FLOP count reproduces the baseline's TFLOP/s figures (architecture.md)."""

from __future__ import annotations

import json

import pytest
import torch

from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS
from apex_tools import bench_gpu

# architecture.md: diffusers + peft eager on one H100 at 20B, 1024x1024 (4096 image + 256 text
# tokens): no-grad forward 0.212 s at batch 1 (345 TFLOP/s) and 0.389 s at batch 2 (376).
BASELINE_FORWARD = {1: (0.212, 345.0), 2: (0.389, 376.0)}
# The quoted TFLOP/s are rounded to 1 TFLOP/s.
TFLOPS_TOLERANCE = 1.0


def test_dry_run_measures_every_section_against_diffusers(tmp_path, capsys):
    output = tmp_path / "bench.json"
    results = bench_gpu.run(bench_gpu.parse_arguments(["--dry-run", "--json", str(output)]))
    printed = capsys.readouterr().out
    assert results["device"] == "cpu" and results["preset"] == "qwen-image-tiny"
    assert results["matmul"]["tflops"] > 0

    attention = results["attention"]
    assert attention["choice"] == "flash"
    for backend in ("sdpa default", "flash", "math"):
        assert attention["backends"][backend]["forward_tflops"] > 0
        assert attention["backends"][backend]["forward_backward_tflops"] > 0
    assert "needs a CUDA device" in attention["backends"]["cudnn"]["skipped"]
    assert 0 < attention["choice_fraction_of_best"] <= 1

    for section in ("forward", "lora"):
        rows = results["comparison"][section]
        assert sorted(rows) == [1, 2]
        for row in rows.values():
            assert row["apex_seconds"] > 0 and row["diffusers_seconds"] > 0
            assert row["speedup"] == pytest.approx(row["diffusers_seconds"] / row["apex_seconds"])
            assert row["mfu"] == pytest.approx(row["apex_tflops"] / results["matmul"]["tflops"])
    for title in ("dispatch choice: flash", "no-grad forward", "LoRA fwd+bwd, ckpt"):
        assert title in printed
    saved = json.loads(output.read_text())
    assert saved["comparison"]["forward"]["1"]["apex_seconds"] > 0


def test_refuses_without_cuda_and_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--preset", "qwen-image-tiny"]) == 2
    error = capsys.readouterr().err
    assert "needs a CUDA device" in error and "--dry-run" in error


@pytest.mark.parametrize("batch", sorted(BASELINE_FORWARD))
def test_flop_count_reproduces_the_baseline_figures(batch):
    preset = QWEN_IMAGE_PRESETS["qwen-image-20b"]
    grid = bench_gpu.image_grid(preset, 1024)
    assert grid == (1, 64, 64)
    seconds, tflops = BASELINE_FORWARD[batch]
    flops = batch * bench_gpu.forward_flops(preset, 64 * 64, bench_gpu.DEFAULT_TEXT_TOKENS)
    assert flops / seconds / 1e12 == pytest.approx(tflops, abs=TFLOPS_TOLERANCE)
    lora = bench_gpu.lora_step_flops(preset, 64 * 64, bench_gpu.DEFAULT_TEXT_TOKENS)
    assert 3 * flops / batch < lora < 4 * flops / batch


def test_resolution_must_fit_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of 16"):
        bench_gpu.image_grid(QWEN_IMAGE_PRESETS["qwen-image-20b"], 1000)
