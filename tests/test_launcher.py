"""The launcher, the generated DeepSpeed JSON, the shipped configs and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apex_dist.config import ConfigError, load_config
from apex_dist.distributed.deepspeed_config import build_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Seconds for one single-process training run through the launcher (DeepSpeed start included).
LAUNCH_TIMEOUT = 300


def run_launcher(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "run.py"), *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=LAUNCH_TIMEOUT,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_shipped_config_validates_and_generates_deepspeed_json(path):
    config = load_config(path)  # validation only: no model is built
    deepspeed_config = build_deepspeed_config(config, world_size=16)
    train = config.train
    assert deepspeed_config["train_batch_size"] == (
        train.micro_batch_size * train.gradient_accumulation_steps * 16
    )
    assert deepspeed_config["zero_optimization"]["stage"] == config.parallel.zero_stage


def test_deepspeed_json_follows_the_config():
    full = load_config(
        ROOT / "configs" / "qwen_image_full.yaml",
        [
            "parallel.offload_optimizer=nvme",
            "parallel.offload_params=cpu",
            "parallel.nvme_path=/scratch/nvme",
            "train.gradient_accumulation_steps=3",
            "optimizer.grad_clip=0.5",
            "method.reference.mode=ema",
        ],
    )
    generated = build_deepspeed_config(full, world_size=16)
    zero = generated["zero_optimization"]
    assert generated["bf16"]["enabled"] and not generated["fp16"]["enabled"]
    assert generated["gradient_accumulation_steps"] == 3
    assert generated["train_batch_size"] == 4 * 3 * 16
    assert generated["gradient_clipping"] == 0.5
    assert zero["offload_optimizer"] == {
        "device": "nvme",
        "nvme_path": "/scratch/nvme",
        "pin_memory": True,
    }
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["zero_hpz_partition_size"] == 8
    assert zero["stage3_param_persistence_threshold"] == 0  # the EMA swaps every partition
    # LoRA keeps DeepSpeed in fp32: the base is cast by apex_dist, adapters stay fp32
    lora = build_deepspeed_config(load_config(ROOT / "configs" / "qwen_image_lora.yaml"), 8)
    assert not lora["bf16"]["enabled"] and not lora["fp16"]["enabled"]
    assert "zero_hpz_partition_size" not in lora["zero_optimization"]
    zero2 = build_deepspeed_config(load_config(None, ["parallel.zero_stage=2"]), 2)
    assert zero2["zero_optimization"]["stage"] == 2
    assert "stage3_param_persistence_threshold" not in zero2["zero_optimization"]


def test_config_errors_of_the_engine_sections_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            [
                "parallel.zero_stage=1",
                "parallel.hierarchical_partition_size=8",
                "parallel.offload_params=cpu",
                "train.max_nonfinite_steps=0",
                "optimizer.min_lr_ratio=2.0",
                "logging.sample_count=0",
                "checkpoint.keep_last=0",
            ],
        )
    joined = "\n".join(caught.value.problems)
    for expected in (
        "parallel.zero_stage 1 is not supported",
        "parallel.hierarchical_partition_size=8 (ZeRO++ hpZ) needs zero_stage 3",
        "parallel.offload_params='cpu' needs zero_stage 3",
        "train.max_nonfinite_steps must be >= 1",
        "optimizer.min_lr_ratio must be in [0, 1]",
        "logging.sample_count must be >= 1",
        "checkpoint.keep_last must be >= 1",
    ):
        assert expected in joined, expected


def test_launcher_rejects_a_bad_config_before_starting(tmp_path):
    finished = run_launcher(
        "--config",
        str(ROOT / "configs" / "toy.yaml"),
        "train.stpes=3",
        "parallel.zero_stage=5",
    )
    assert finished.returncode == 2, finished.stderr
    assert "unknown key train.stpes: did you mean 'steps'?" in finished.stderr
    assert "parallel.zero_stage" in finished.stderr
    assert "deepspeed" not in finished.stdout.lower()


def test_launcher_prints_the_deepspeed_json():
    finished = run_launcher(
        "--config", str(ROOT / "configs" / "qwen_image_lora.yaml"), "--print-deepspeed-config"
    )
    assert finished.returncode == 0, finished.stderr
    generated = json.loads(finished.stdout)
    assert generated["train_micro_batch_size_per_gpu"] == 4


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python writes but JSON does not have."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_printed_deepspeed_json_never_holds_non_finite_numbers():
    finished = run_launcher(
        "--config",
        str(ROOT / "configs" / "qwen_image_full.yaml"),
        "--print-deepspeed-config",
        "optimizer.grad_clip=.inf",
    )
    assert finished.returncode == 2, finished.stdout
    assert "optimizer.grad_clip must be a finite number" in finished.stderr
    assert "Infinity" not in finished.stdout
    finished = run_launcher(
        "--config", str(ROOT / "configs" / "toy.yaml"), "--print-deepspeed-config"
    )
    assert finished.returncode == 0, finished.stderr
    assert (
        _strict_json(finished.stdout)["gradient_clipping"]
        == load_config(ROOT / "configs" / "toy.yaml").optimizer.grad_clip
    )


def test_plain_python_launch_trains_saves_and_resumes(tmp_path):
    """One process (no launcher): 3 steps, a grid, a checkpoint; then resume to step 4."""
    output = tmp_path / "run"
    common = [
        "--config",
        str(ROOT / "configs" / "toy.yaml"),
        f"train.output_dir={output}",
        "train.micro_batch_size=16",
        "model.toy.hidden_size=32",
        "checkpoint.every_steps=2",
        "logging.every_steps=1",
        "logging.sample_every_steps=3",
        "logging.sample_count=4",
        "logging.teacher_steps=4",
        "method.reference.mode=ema",
    ]
    finished = run_launcher(*common, "train.steps=3", "--local_rank=0")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "step 3/3 loss" in finished.stdout
    assert "samples/s" in finished.stdout and "eta" in finished.stdout
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert (output / "samples" / "step_00000003.png").is_file()
    assert (output / "samples" / "step_00000000.png").is_file()
    assert (output / "config.yaml").is_file()
    finished = run_launcher(*common, "train.steps=4")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resumed from" in finished.stdout and "at step 3" in finished.stdout
    assert "step 4/4 loss" in finished.stdout
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_launcher_writes_the_environment_file_remote_ranks_need(tmp_path):
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    environment.pop("OMP_NUM_THREADS", None)
    finished = subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "run.py"), "--write-deepspeed-env"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**environment, "WANDB_API_KEY": "secret"},
        timeout=LAUNCH_TIMEOUT,
    )
    assert finished.returncode == 0, finished.stderr
    lines = (tmp_path / ".deepspeed_env").read_text().splitlines()
    assert "DS_ACCELERATOR=cpu" in lines and "WANDB_MODE=offline" in lines
    assert all("=" in line for line in lines)  # DeepSpeed splits each line at its first '='
    assert not any(line.startswith("WANDB_API_KEY") for line in lines)  # secrets stay out
