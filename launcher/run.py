"""Entry point of a training run.

    deepspeed --num_gpus 8 launcher/run.py --config configs/qwen_image_lora.yaml [key=value ...]
    torchrun --nproc_per_node 8 launcher/run.py --config configs/X.yaml [key=value ...]
    python launcher/run.py --config configs/quickstart.yaml train.steps=10    # one process

Parses the arguments, loads and validates the config (every problem reported before anything
heavy starts), builds the trainer, trains, cleans up. `--local_rank` (passed by the DeepSpeed
launcher) is accepted; the rank comes from the environment. Exit codes: 0 done, or stopped
cleanly after saving (a signal, or the launcher gone), 2 invalid configuration, 3 ended by the
watchdog (a rank stopped making progress, `train.watchdog_seconds`), 1 any other error (printed
with the rank that raised it).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

# Exit code of an invalid configuration (argparse uses 2 for usage errors as well).
CONFIG_ERROR_EXIT_CODE = 2
# Variables the ranks of a multi-node `deepspeed --hostfile` run need from the launching shell.
# DeepSpeed starts remote ranks over ssh with a clean environment and forwards only variables
# whose names start with its own prefixes (PYTHON, NCCL on CUDA, ...) plus what `.deepspeed_env`
# lists; these are the ones apex_dist, torch and the libraries it loads read. Secrets
# (WANDB_API_KEY, HF_TOKEN) are never written: keep them in ~/.netrc or the nodes' environment.
DEEPSPEED_ENV_VARIABLES = (
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "TORCH_EXTENSIONS_DIR",
    "CUDA_HOME",
    "LD_LIBRARY_PATH",
    "PATH",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_ENTITY",
    "TRITON_CACHE_DIR",
)
DEEPSPEED_ENV_FILE = ".deepspeed_env"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train an APEX one-step student with DeepSpeed ZeRO.",
        epilog="Overrides are dotted keys: train.steps=200 method.reference.mode=ema",
    )
    parser.add_argument("--config", help="YAML config file (see configs/); required to train")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher"
    )
    parser.add_argument(
        "--print-deepspeed-config",
        action="store_true",
        help="print the generated DeepSpeed JSON for this world size and exit",
    )
    parser.add_argument(
        "--write-deepspeed-env",
        action="store_true",
        help=f"write {DEEPSPEED_ENV_FILE} here with the variables remote ranks need "
        "(deepspeed --hostfile) and exit",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    arguments = parser.parse_args(argv)
    if arguments.config is None and not arguments.write_deepspeed_env:
        parser.error("--config is required (the YAML file of the run, see configs/)")
    return arguments


def write_deepspeed_env(directory: str = ".") -> str:
    """Write `.deepspeed_env` (NAME=value lines, DeepSpeed's format) with the variables of
    DEEPSPEED_ENV_VARIABLES set in this shell; return the file's path. Written atomically."""
    lines = [
        f"{name}={os.environ[name]}"
        for name in DEEPSPEED_ENV_VARIABLES
        if os.environ.get(name) and "\n" not in os.environ[name]
    ]
    from apex_dist.atomic import atomic_write_text

    path = os.path.join(directory, DEEPSPEED_ENV_FILE)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.write_deepspeed_env:
        path = write_deepspeed_env()
        with open(path) as handle:
            names = [line.split("=", 1)[0] for line in handle if line.strip()]
        print(f"wrote {path}: {', '.join(names) or 'nothing (none of the variables is set)'}")
        return 0
    if arguments.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(arguments.local_rank))
    from apex_dist.config import ConfigError, load_config

    try:
        config = load_config(arguments.config, arguments.overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    if arguments.print_deepspeed_config:
        import json

        from apex_dist.distributed.deepspeed_config import build_deepspeed_config

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            # allow_nan=False: NaN and Infinity are not JSON (validation refuses them first)
            text = json.dumps(build_deepspeed_config(config, world_size), indent=2, allow_nan=False)
        except ValueError as error:
            print(f"cannot write the DeepSpeed config as JSON: {error}", file=sys.stderr)
            return CONFIG_ERROR_EXIT_CODE
        print(text)
        return 0

    from apex_dist.trainer import Trainer

    rank = os.environ.get("RANK", "0")
    trainer = None
    try:
        trainer = Trainer(config)
        summary = trainer.train()
        if trainer.info.is_main:
            print(
                f"finished: {summary.steps_done} steps ({summary.stopped_by}); "
                f"checkpoint {summary.last_checkpoint}"
            )
        return 0
    except Exception:
        print(f"[rank {rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
