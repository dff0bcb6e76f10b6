"""Convert an apex_dist DeepSpeed checkpoint to safetensors for diffusers and ComfyUI.

Reads DeepSpeed's files from disk only (no GPU, no process group, any world size, ZeRO-1/2/3)
and streams tensors, so memory stays near one chunk whatever the model size.

    apex-convert-checkpoint runs/qwen_full exported/               # full weights, diffusers layout
    apex-convert-checkpoint runs/qwen_lora lora/ --lora-format diffusers comfyui
    apex-convert-checkpoint runs/qwen_lora merged/ --mode merged --base /models/Qwen-Image
    apex-convert-checkpoint runs/qwen_full ema/ --weights ema --dtype fp32 --verify

Student exports are folded for one-step sampling at t = 1 by default (--no-fold writes the
weights as trained).

See docs/export.md for the layouts written and what loads them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apex_dist.export.convert import (
    DTYPES,
    ExportOptions,
    ModelMismatchError,
    export_checkpoint,
    exportable_presets,
    format_bytes,
    parse_size,
)
from apex_dist.export.torch_archive import CheckpointFormatError
from apex_dist.method.sampler import ONE_STEP_TIME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apex-convert-checkpoint",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="run output directory, its checkpoints/ directory, or one tag directory",
    )
    parser.add_argument("output", type=Path, help="directory to create with the exported files")
    parser.add_argument("--tag", help="checkpoint tag (default: the one named in 'latest')")
    parser.add_argument(
        "--mode",
        choices=("auto", "full", "lora", "merged"),
        default="auto",
        help="full weights, LoRA adapters only, or LoRA merged into --base "
        "(auto: lora for LoRA checkpoints, else full)",
    )
    parser.add_argument(
        "--weights",
        choices=("trained", "ema"),
        default="trained",
        help="the optimizer's fp32 master weights or the EMA kept by the run",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="output dtype of floating tensors (default: bf16 for full/merged, fp32 for lora)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard (full/merged)"
    )
    parser.add_argument(
        "--keep-apex-keys",
        action="store_true",
        help="keep E2 (time_text_embed_2.*) and condition_shift.* in a full/merged export, "
        "unfolded: for apex_dist's loader (diffusers warns and drops them)",
    )
    fold = parser.add_mutually_exclusive_group()
    fold.add_argument(
        "--no-fold",
        action="store_true",
        help="write the weights and adapters as trained, without the one-step fold of E2 "
        "into E1's last bias (stock clients then do not reproduce the one-step student)",
    )
    fold.add_argument(
        "--fold-time",
        type=float,
        default=ONE_STEP_TIME,
        help=f"the one-step sampling time the fold is made for (default {ONE_STEP_TIME:g})",
    )
    parser.add_argument(
        "--lora-format",
        nargs="+",
        choices=("diffusers", "comfyui"),
        default=["diffusers"],
        help="LoRA file(s) to write: diffusers' names and/or ComfyUI's",
    )
    parser.add_argument("--base", type=Path, help="snapshot with the base weights (mode merged)")
    parser.add_argument(
        "--preset",
        choices=tuple(exportable_presets()),
        help="model to check against, instead of the checkpoint's config.yaml",
    )
    parser.add_argument(
        "--model-config", type=Path, help="diffusers transformer config.json of the model"
    )
    parser.add_argument(
        "--lora-alpha", type=float, help="LoRA alpha, instead of config.yaml model.lora.alpha"
    )
    parser.add_argument(
        "--verify", action="store_true", help="reread every written tensor and compare it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        options = ExportOptions(
            mode=arguments.mode,
            weights=arguments.weights,
            dtype=arguments.dtype,
            max_shard_bytes=parse_size(arguments.max_shard_size),
            keep_apex_keys=arguments.keep_apex_keys,
            fold_time=None if arguments.no_fold else arguments.fold_time,
            lora_formats=tuple(arguments.lora_format),
            base=arguments.base,
            preset=arguments.preset,
            model_config=arguments.model_config,
            lora_alpha=arguments.lora_alpha,
            verify=arguments.verify,
            overwrite=arguments.overwrite,
        )
        report = export_checkpoint(arguments.checkpoint, arguments.output, options, arguments.tag)
    except (CheckpointFormatError, ModelMismatchError, FileExistsError, ValueError) as error:
        print(f"apex-convert-checkpoint: error: {error}", file=sys.stderr)
        return 1
    rate = report.bytes_written / max(report.seconds, 1e-9)
    print(
        f"wrote {report.tensors} tensors ({format_bytes(report.bytes_written)}, mode "
        f"{report.mode}) to {report.output} in {report.seconds:.1f} s "
        f"({format_bytes(int(rate))}/s){', verified' if report.verified else ''}"
    )
    for name in report.files:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
