"""Entry point of a training run.

    deepspeed --num_gpus 8 launcher/run.py --config configs/qwen_image_lora.yaml [key=value ...]
    torchrun --nproc_per_node 8 launcher/run.py --config configs/X.yaml [key=value ...]
    python launcher/run.py --config configs/quickstart.yaml train.steps=10    # one process

Parses the arguments, loads and validates the config (every problem reported before anything
heavy starts), builds the trainer, trains, cleans up. `--local_rank` (passed by the DeepSpeed
launcher) is accepted; the rank comes from the environment. Exit codes: 0 done or stopped
cleanly by a preemption signal after saving, 2 invalid configuration, 1 any other error
(printed with the rank that raised it).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

# Exit code of an invalid configuration (argparse uses 2 for usage errors as well).
CONFIG_ERROR_EXIT_CODE = 2


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train an APEX one-step student with DeepSpeed ZeRO.",
        epilog="Overrides are dotted keys: train.steps=200 method.reference.mode=ema",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher"
    )
    parser.add_argument(
        "--print-deepspeed-config",
        action="store_true",
        help="print the generated DeepSpeed JSON for this world size and exit",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
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
