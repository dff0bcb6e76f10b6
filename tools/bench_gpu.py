"""Single-GPU speed of apex_dist's Qwen-Image stack against diffusers + peft in eager mode.

Measured in one run, each apex_dist figure next to the same measurement of diffusers' eager
`QwenImageTransformer2DModel` (with peft LoRA for the training pass), as a ratio:

1. bf16 matmul TFLOP/s (8192^3), the peak that MFU figures are counted against;
2. attention TFLOP/s per backend at the model's joint sequence (forward, and forward +
   backward), next to PyTorch's default SDPA choice (what diffusers runs), and the choice of
   `apex_kernels.attention` with its distance to the fastest;
3. no-grad forward at each batch size: seconds, TFLOP/s, MFU, peak memory;
4. LoRA (rank 64 on attention and MLPs) forward + backward with activation checkpointing on
   every block: seconds, executed TFLOP/s, peak memory.

Defaults: Qwen-Image 20B (random weights, bf16) at 1024x1024 with 256 text tokens, batches 1
and 2 (docs/performance.md has the baseline to beat). `--preset` and `--resolution` run it
smaller. It needs CUDA and refuses without it; `--dry-run` runs every section on the CPU at
the tiny preset in fp32 in seconds, so that the script is tested without a GPU.

    python tools/bench_gpu.py                               # the issue's benchmark (H100)
    python tools/bench_gpu.py --preset qwen-image-0.6b --resolution 512
    python tools/bench_gpu.py --dry-run                     # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import nn

import apex_kernels
from apex_dist.models.conditioning import init_apex_weights
from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS
from apex_dist.models.spec import ModelSpec, model_spec
from apex_dist.models.specs.qwen_image import SPEC as QWEN_IMAGE_SPEC
from apex_kernels.attention import (
    BACKENDS,
    choose_backend,
    describe_call,
    detect_availability,
    unsupported_reason,
)

# Text tokens of the benchmark (4096 image + 256 text tokens at 1024x1024).
DEFAULT_TEXT_TOKENS = 256
DEFAULT_RESOLUTION = 1024
DEFAULT_BATCHES = (1, 2)
# LoRA of the benchmark: rank 64 (alpha 64) on attention and MLPs.
LORA_RANK = 64
LORA_TARGETS = "attention_mlp"
# Matrix side of the matmul peak measurement (architecture.md: 767 TFLOP/s on an H100).
MATMUL_SIDE = 8192
# Backward of attention runs 5 matmuls of the forward's size against the forward's 2.
ATTENTION_BACKWARD_FACTOR = 2.5
# The dispatch's choice must be within this fraction of the fastest backend (issue 7).
CHOICE_TOLERANCE = 0.05
# Dry run: the tiny preset at 32x32 pixels (2x2 patches) with 8 text tokens, fp32 on CPU.
DRY_RUN = {"preset": "qwen-image-tiny", "resolution": 32, "text_tokens": 8, "dtype": "fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TERA = 1e12
GIB = 2**30


class NoCudaError(RuntimeError):
    """The benchmark was asked to run on a machine without a CUDA device."""


# --------------------------------------------------------------------------------------------
# counting


def image_grid(
    preset: dict[str, Any], resolution: int, spec: ModelSpec = QWEN_IMAGE_SPEC
) -> tuple[int, int, int]:
    """(frames, height, width) in tokens of a square image of `resolution` pixels, by the
    spec's latent geometry (Qwen-Image: VAE factor 8 x patch size)."""
    if resolution < 1:
        raise ValueError(f"--resolution {resolution} must be positive")
    return spec.geometry(preset).image_shape(resolution, resolution)


def forward_flops(
    preset: dict[str, Any], image_tokens: int, text_tokens: int, spec: ModelSpec = QWEN_IMAGE_SPEC
) -> int:
    """Matmul FLOPs of one forward of one sample (2 per multiply-add), as the spec counts them
    (`QwenImageSpec.forward_flops`). At 20B and 1024x1024 this is 7.31e13, so the baseline's
    0.212 s is 345 TFLOP/s."""
    return spec.forward_flops(preset, image_tokens, text_tokens)


def lora_step_flops(preset: dict[str, Any], image_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs executed by a LoRA forward + backward with every block checkpointed.

    Forward and recomputation (2 forwards), the backward's input gradients through every
    linear layer (1 forward's linear FLOPs; frozen weights get no weight gradient) and the
    attention backward (2.5 forwards of attention). The adapters' own FLOPs are left out.
    """
    width = preset["num_attention_heads"] * preset["attention_head_dim"]
    tokens = image_tokens + text_tokens
    attention = preset["num_layers"] * 4 * tokens * tokens * width
    total = forward_flops(preset, image_tokens, text_tokens)
    linear = total - attention
    return 3 * linear + (2 + ATTENTION_BACKWARD_FACTOR) * attention


# --------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """Peak allocated memory since the last reset, or None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def median_seconds(
    function: Callable[[], Any], device: torch.device, warmup: int, iterations: int
) -> float:
    """Median wall time of `function` over `iterations` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (a 20B model never exists in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --------------------------------------------------------------------------------------------
# sections


def measure_matmul_peak(device, dtype, warmup, iterations, side=MATMUL_SIDE) -> dict[str, Any]:
    """TFLOP/s of one square matmul of `side`."""
    left = torch.randn(side, side, device=device, dtype=dtype)
    right = torch.randn(side, side, device=device, dtype=dtype)
    seconds = median_seconds(lambda: left @ right, device, warmup, iterations)
    return {"side": side, "seconds": seconds, "tflops": 2 * side**3 / seconds / TERA}


def measure_attention(preset, tokens, batch, device, dtype, warmup, iterations) -> dict[str, Any]:
    """Forward and forward + backward TFLOP/s of every backend that can run the shape."""
    heads, head_dim = preset["num_attention_heads"], preset["attention_head_dim"]
    shape = (batch, heads, tokens, head_dim)
    query, key, value = (
        torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    grad_output = torch.randn(shape, device=device, dtype=dtype)
    forward = 4 * batch * heads * tokens * tokens * head_dim
    call = describe_call(query, padded=False)
    availability = detect_availability(device.type)
    rows: dict[str, dict[str, Any]] = {}

    def measure(run: Callable[[], torch.Tensor]) -> dict[str, Any]:
        def forward_backward() -> None:
            torch.autograd.grad(run(), (query, key, value), grad_output)

        with torch.no_grad():
            seconds = median_seconds(run, device, warmup, iterations)
        both = median_seconds(forward_backward, device, warmup, iterations)
        total = forward * (1 + ATTENTION_BACKWARD_FACTOR)
        return {
            "forward_seconds": seconds,
            "forward_tflops": forward / seconds / TERA,
            "forward_backward_seconds": both,
            "forward_backward_tflops": total / both / TERA,
        }

    # PyTorch's own choice, as diffusers calls it
    rows["sdpa default"] = measure(
        lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value)
    )
    for backend in BACKENDS:
        reason = unsupported_reason(backend, call, availability)
        if reason is not None:
            rows[backend] = {"skipped": reason}
            continue
        rows[backend] = measure(
            lambda backend=backend: apex_kernels.attention(query, key, value, backend=backend)
        )
    measured = {name: row for name, row in rows.items() if "forward_tflops" in row}
    best = max(row["forward_tflops"] for row in measured.values())
    choice = choose_backend(call, availability)
    chosen = rows[choice]["forward_tflops"]
    return {
        "shape": list(shape),
        "backends": rows,
        "choice": choice,
        "choice_fraction_of_best": chosen / best,
        "choice_within_tolerance": chosen >= (1 - CHOICE_TOLERANCE) * best,
    }


def make_inputs(preset, grid, text_tokens, batch, device, dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(batch)
    image_tokens = grid[0] * grid[1] * grid[2]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return {
        "latents": randn(batch, image_tokens, preset["in_channels"]),
        "text": randn(batch, text_tokens, preset["joint_attention_dim"]),
        "time": torch.rand(batch, generator=generator).to(device, dtype),
    }


def build_apex_model(preset_name, device, dtype, compile_blocks) -> nn.Module:
    spec = model_spec(preset_name)
    with default_dtype(dtype), torch.device(device):
        model = spec.build(spec.presets[preset_name])
    init_apex_weights(model)
    if compile_blocks:
        apex_kernels.compile_blocks(model)
    return model.eval()


def build_diffusers_model(preset, device, dtype) -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    with default_dtype(dtype), torch.device(device):
        model = QwenImageTransformer2DModel(**preset)
    return model.eval()


def apex_forward(model, inputs, grid) -> torch.Tensor:
    time_ = inputs["time"]
    return model(inputs["latents"], time_, time_, inputs["text"], None, None, image_shape=grid)


def diffusers_forward(model, inputs, grid) -> torch.Tensor:
    batch = inputs["latents"].shape[0]
    return model(
        hidden_states=inputs["latents"],
        encoder_hidden_states=inputs["text"],
        encoder_hidden_states_mask=None,  # no padding: no mask, as apex_dist runs it
        timestep=inputs["time"],
        img_shapes=[grid] * batch,
        return_dict=False,
    )[0]


def add_apex_lora(model: nn.Module) -> None:
    """apex_dist's LoRA (apex_dist.models.lora: fp32 adapters, E2 trained in full)."""
    from apex_dist.config import LoraConfig
    from apex_dist.models.lora import apply_lora

    apply_lora(
        model, LoraConfig(enabled=True, rank=LORA_RANK, alpha=LORA_RANK, targets=LORA_TARGETS)
    )
    model.enable_activation_checkpointing()


def add_peft_lora(model: nn.Module) -> None:
    """peft's LoRA on the same modules of diffusers' model, with its gradient checkpointing."""
    import peft

    from apex_dist.models.lora import target_module_pattern

    model.requires_grad_(False)
    config = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=target_module_pattern(LORA_TARGETS)
    )
    peft.inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    model.enable_gradient_checkpointing()


def measure_model(
    name, build, forward, add_lora, preset, grid, arguments, device, dtype, sections
) -> dict[str, Any]:
    """Forward (no grad) and LoRA forward + backward of one implementation at each batch."""
    results: dict[str, Any] = {"forward": {}, "lora": {}}
    reset_peak_memory(device)
    model = build()
    image_tokens = grid[0] * grid[1] * grid[2]
    if "forward" in sections:
        for batch in arguments.batches:
            inputs = make_inputs(preset, grid, arguments.text_tokens, batch, device, dtype)
            reset_peak_memory(device)
            with torch.no_grad():
                seconds = median_seconds(
                    lambda inputs=inputs: forward(model, inputs, grid),
                    device,
                    arguments.warmup,
                    arguments.iterations,
                )
            flops = batch * forward_flops(preset, image_tokens, arguments.text_tokens)
            results["forward"][batch] = {
                "seconds": seconds,
                "tflops": flops / seconds / TERA,
                "peak_gib": peak_memory_gib(device),
            }
    if "lora" in sections:
        add_lora(model)
        model.train()
        for batch in arguments.batches:
            inputs = make_inputs(preset, grid, arguments.text_tokens, batch, device, dtype)

            def step(inputs=inputs) -> None:
                output = forward(model, inputs, grid)
                output.float().square().mean().backward()
                model.zero_grad(set_to_none=True)

            reset_peak_memory(device)
            seconds = median_seconds(step, device, arguments.warmup, arguments.iterations)
            flops = batch * lora_step_flops(preset, image_tokens, arguments.text_tokens)
            results["lora"][batch] = {
                "seconds": seconds,
                "tflops": flops / seconds / TERA,
                "peak_gib": peak_memory_gib(device),
            }
    model = None  # free the weights before the next implementation is built
    reset_peak_memory(device)
    print(f"  measured {name}", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# report


def format_memory(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f} GiB"


def report(results: dict[str, Any]) -> str:
    """The tables of a run as text."""
    lines = [
        f"device: {results['device']}; preset {results['preset']}, {results['resolution']}px, "
        f"{results['image_tokens']} image + {results['text_tokens']} text tokens, "
        f"{results['dtype']}",
    ]
    peak = results.get("matmul")
    if peak:
        lines.append(f"matmul {peak['side']}^3: {peak['tflops']:.1f} TFLOP/s (the MFU peak)")
    attention = results.get("attention")
    if attention:
        lines += ["", f"attention {tuple(attention['shape'])} (batch, heads, tokens, head_dim)"]
        lines.append(f"{'backend':<14}{'fwd TFLOP/s':>12}{'fwd+bwd TFLOP/s':>17}")
        for name, row in attention["backends"].items():
            if "skipped" in row:
                lines.append(f"{name:<14}  skipped: {row['skipped']}")
            else:
                lines.append(
                    f"{name:<14}{row['forward_tflops']:>12.1f}"
                    f"{row['forward_backward_tflops']:>17.1f}"
                )
        lines.append(
            f"dispatch choice: {attention['choice']} "
            f"({100 * attention['choice_fraction_of_best']:.0f}% of the fastest forward)"
        )
    for section, title in (("forward", "no-grad forward"), ("lora", "LoRA fwd+bwd, ckpt")):
        rows = results.get("comparison", {}).get(section)
        if not rows:
            continue
        lines += ["", title]
        lines.append(
            f"{'batch':<6}{'apex_dist s':>12}{'diffusers s':>12}{'speed-up':>10}"
            f"{'TFLOP/s':>9}{'MFU':>6}{'peak apex':>12}{'peak diff.':>12}"
        )
        for batch, row in rows.items():
            mfu = "" if row["mfu"] is None else f"{100 * row['mfu']:.0f}%"
            baseline = "" if row["diffusers_seconds"] is None else f"{row['diffusers_seconds']:.4f}"
            speedup = "" if row["speedup"] is None else f"{row['speedup']:.2f}x"
            lines.append(
                f"{batch:<6}{row['apex_seconds']:>12.4f}{baseline:>12}{speedup:>10}"
                f"{row['apex_tflops']:>9.1f}{mfu:>6}"
                f"{format_memory(row['apex_peak_gib']):>12}"
                f"{format_memory(row['diffusers_peak_gib']):>12}"
            )
    return "\n".join(lines)


def compare(ours: dict[str, Any], theirs: Optional[dict[str, Any]], peak: Optional[float]):
    """Per section and batch: both timings, speed-up (diffusers / apex_dist) and MFU."""
    comparison: dict[str, Any] = {}
    for section, rows in ours.items():
        comparison[section] = {}
        for batch, row in rows.items():
            baseline = (theirs or {}).get(section, {}).get(batch)
            comparison[section][batch] = {
                "apex_seconds": row["seconds"],
                "apex_tflops": row["tflops"],
                "apex_peak_gib": row["peak_gib"],
                "diffusers_seconds": baseline["seconds"] if baseline else None,
                "diffusers_peak_gib": baseline["peak_gib"] if baseline else None,
                "speedup": baseline["seconds"] / row["seconds"] if baseline else None,
                "mfu": row["tflops"] / peak if peak else None,
            }
    return comparison


def write_json(results: dict[str, Any], path: str) -> None:
    """Write the results atomically (temporary name, then rename)."""
    from apex_dist.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# entry point

SECTIONS = ("matmul", "attention", "forward", "lora")


def parse_arguments(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="apex_dist vs diffusers + peft on one GPU (docs/performance.md)"
    )
    parser.add_argument("--preset", choices=sorted(QWEN_IMAGE_PRESETS), default="qwen-image-20b")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="pixels")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS)
    parser.add_argument(
        "--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="batch sizes"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per measurement")
    parser.add_argument("--iterations", type=int, default=10, help="timed runs (median)")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run"
    )
    parser.add_argument("--no-diffusers", action="store_true", help="skip the baseline")
    parser.add_argument("--attention-backend", choices=apex_kernels.BACKEND_CHOICES, default="auto")
    parser.add_argument("--no-fused", action="store_true", help="PyTorch ops, no Triton kernels")
    parser.add_argument("--compile-blocks", action="store_true", help="torch.compile each block")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU smoke run: tiny preset, 32px, fp32, one timed run (checks the script only)",
    )
    arguments = parser.parse_args(argv)
    if arguments.dry_run:
        for name, value in DRY_RUN.items():
            setattr(arguments, name, value)
        arguments.warmup, arguments.iterations = 1, 1
    return arguments


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    """Every section of the benchmark; returns the results (also printed)."""
    if arguments.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise NoCudaError(
            "bench_gpu.py measures GPU speed and needs a CUDA device; this machine has none. "
            "Run it on a GPU machine, or pass --dry-run for a CPU smoke run of the script."
        )
    else:
        device = torch.device("cuda")
    dtype = DTYPES[arguments.dtype]
    spec = model_spec(arguments.preset)
    preset = spec.presets[arguments.preset]
    grid = image_grid(preset, arguments.resolution, spec)
    image_tokens = grid[0] * grid[1] * grid[2]
    sections = set(arguments.sections)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "device": device_name,
        "command": " ".join(sys.argv),
        "preset": arguments.preset,
        "resolution": arguments.resolution,
        "image_tokens": image_tokens,
        "text_tokens": arguments.text_tokens,
        "dtype": arguments.dtype,
        "attention_backend": arguments.attention_backend,
        "fused": not arguments.no_fused,
        "compile_blocks": arguments.compile_blocks,
    }
    apex_kernels.configure(arguments.attention_backend, not arguments.no_fused)
    peak = None
    if "matmul" in sections:
        side = MATMUL_SIDE if device.type == "cuda" else 256
        results["matmul"] = measure_matmul_peak(
            device, dtype, arguments.warmup, arguments.iterations, side
        )
        peak = results["matmul"]["tflops"]
    if "attention" in sections:
        results["attention"] = measure_attention(
            preset, image_tokens + arguments.text_tokens, 1, device, dtype,
            arguments.warmup, arguments.iterations,
        )  # fmt: skip
    model_sections = sections & {"forward", "lora"}
    if model_sections:
        common = (preset, grid, arguments, device, dtype, model_sections)
        ours = measure_model(
            "apex_dist",
            lambda: build_apex_model(arguments.preset, device, dtype, arguments.compile_blocks),
            apex_forward,
            add_apex_lora,
            *common,
        )
        theirs = None
        if not arguments.no_diffusers:
            with apex_kernels.fused_kernels(False):
                theirs = measure_model(
                    "diffusers + peft",
                    lambda: build_diffusers_model(preset, device, dtype),
                    diffusers_forward,
                    add_peft_lora,
                    *common,
                )
        results["comparison"] = compare(ours, theirs, peak)
    print(report(results), flush=True)
    if arguments.json:
        write_json(results, arguments.json)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    arguments = parse_arguments(argv)
    try:
        run(arguments)
    except NoCudaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        apex_kernels.configure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
