"""Benchmark the checkpoint converter against DeepSpeed's zero_to_fp32 on the same checkpoint.

Trains a slice of the qwen-image-0.6b preset (its first `--layers` blocks; real tensor shapes)
for one AdamW step with DeepSpeed ZeRO-3 on 2 gloo ranks (CPU), saves the checkpoint (fp32
master weights + Adam moments: at least 2 GB at the default 5 blocks), then converts it twice,
each in its own subprocess:

- DeepSpeed: `convert_zero_checkpoint_to_fp32_state_dict(..., safe_serialization=True)`
- apex_dist: `export_checkpoint(..., mode full, dtype fp32)` (also checks the names and shapes
  against the model)

and prints each one's peak RSS (`ru_maxrss` of that child, from `os.wait4`), time and GB/s of
fp32 weights written. Both write fp32 safetensors in 5 GB shards.

    .venv/bin/python tools/bench_convert.py --workdir /tmp/bench_convert

The work directory is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

# The preset sliced for the benchmark and its per-rank world (the issue asks for 2 ranks).
PRESET = "qwen-image-0.6b"
WORLD_SIZE = 2
TAG = "step_00000001"
# Disk the benchmark needs, as a multiple of the fp32 weights: checkpoint (weights + two Adam
# moments = 3x) plus two fp32 exports (2x), with some margin.
DISK_FACTOR = 6
# The minimum size of the benchmark checkpoint.
MINIMUM_CHECKPOINT_BYTES = 2 * 1000**3

DEEPSPEED_CHILD = """
import json, sys, time
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
started = time.perf_counter()
convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[2], safe_serialization=True)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""
APEX_CHILD = """
import json, sys, time
from apex_dist.export.convert import ExportOptions, export_checkpoint
started = time.perf_counter()
export_checkpoint(sys.argv[1], sys.argv[2], ExportOptions(mode="full", dtype="fp32"))
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def _model_config(layers: int) -> dict:
    from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageTransformer

    with torch.device("meta"):
        model = QwenImageTransformer(**{**QWEN_IMAGE_PRESETS[PRESET], "num_layers": layers})
    return model.diffusers_config()


def _train_and_save(rank: int, port: int, workdir: str, layers: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed

    from apex_dist.models.qwen_image import QwenImageTransformer

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = QwenImageTransformer.from_diffusers_config(_model_config(layers))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}},
    )
    x_t = torch.randn(1, 4, model.in_channels)  # (B, N = 1*2*2, C)
    text = torch.randn(1, 2, model.joint_attention_dim)  # (B, L, D_text)
    time_value = torch.tensor([0.7])
    velocity = engine(x_t, time_value, time_value * 0.5, text, image_shape=(1, 2, 2))
    engine.backward(velocity.square().mean())
    engine.step()
    engine.save_checkpoint(str(Path(workdir) / "run" / "checkpoints"), tag=TAG)


def generate_checkpoint(workdir: Path, layers: int) -> Path:
    """Write the ZeRO-3 checkpoint (2 ranks) and its config.yaml; return the run directory."""
    import torch.multiprocessing as multiprocessing
    import yaml

    snapshot = workdir / "model" / "transformer"
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps(_model_config(layers)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    multiprocessing.spawn(
        _train_and_save, args=(port, str(workdir), layers), nprocs=WORLD_SIZE, join=True
    )
    run = workdir / "run"
    config = {"model": {"preset": PRESET, "pretrained": str(workdir / "model")}}
    (run / "checkpoints" / TAG / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def measure(code: str, arguments: list[str]) -> dict:
    """Run `code` in a fresh interpreter; its wall time, reported seconds and peak RSS."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark child failed with exit code {child.returncode}")
    reported = json.loads(output.decode().strip().splitlines()[-1])
    return {
        "wall_seconds": time.perf_counter() - started,
        "convert_seconds": reported["seconds"],
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports kilobytes
    }


def _directory_bytes(path: Path, pattern: str = "*") -> int:
    return sum(item.stat().st_size for item in path.rglob(pattern) if item.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--layers", type=int, default=5, help="blocks of the sliced preset")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    arguments = parser.parse_args(argv)

    from apex_dist.models.qwen_image import QwenImageTransformer

    with torch.device("meta"):
        model = QwenImageTransformer.from_diffusers_config(_model_config(arguments.layers))
    weight_bytes = 4 * sum(parameter.numel() for parameter in model.parameters())
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(arguments.workdir).free
    if free < DISK_FACTOR * weight_bytes:
        print(
            f"not enough disk in {arguments.workdir}: {free / 1e9:.1f} GB free, need "
            f"{DISK_FACTOR * weight_bytes / 1e9:.1f} GB",
            file=sys.stderr,
        )
        return 1
    try:
        run = generate_checkpoint(arguments.workdir, arguments.layers)
        checkpoint_bytes = _directory_bytes(run / "checkpoints" / TAG, "*.pt")
        print(
            f"checkpoint: {PRESET} sliced to {arguments.layers} blocks, "
            f"{weight_bytes / 4 / 1e6:.0f} M parameters, ZeRO-3 on {WORLD_SIZE} ranks, "
            f"{checkpoint_bytes / 1e9:.2f} GB on disk"
        )
        if checkpoint_bytes < MINIMUM_CHECKPOINT_BYTES:
            print("warning: the checkpoint is smaller than 2 GB; raise --layers", file=sys.stderr)
        results = {}
        for name, code, target in (
            ("deepspeed zero_to_fp32", DEEPSPEED_CHILD, str(run / "checkpoints")),
            ("apex-convert-checkpoint", APEX_CHILD, str(run)),
        ):
            output = arguments.workdir / name.split()[0]
            results[name] = measure(code, [target, str(output)])
            results[name]["output_bytes"] = _directory_bytes(output, "*.safetensors")
            shutil.rmtree(output)
        print(f"{'converter':<26}{'peak RSS':>12}{'time':>10}{'GB/s':>8}")
        for name, result in results.items():
            rate = result["output_bytes"] / result["convert_seconds"] / 1e9
            print(
                f"{name:<26}{result['peak_rss_bytes'] / 1e9:>10.2f}GB"
                f"{result['convert_seconds']:>9.1f}s{rate:>8.2f}"
            )
        ours, theirs = results["apex-convert-checkpoint"], results["deepspeed zero_to_fp32"]
        print(
            f"peak RSS ratio {ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.3f} "
            f"(target <= 0.25), speed ratio "
            f"{theirs['convert_seconds'] / ours['convert_seconds']:.2f} (target >= 1)"
        )
    finally:
        if not arguments.keep:
            shutil.rmtree(arguments.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
