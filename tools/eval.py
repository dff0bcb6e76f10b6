"""GenEval-style scores and CLIP score of generated images, from local model snapshots.

    apex-eval prompts prompts.jsonl                              # the prompt set (580 prompts)
    apex-eval score IMAGES --detector /models/mask2former-swin-small-coco-instance \\
        --clip /models/clip-vit-large-patch14                    # a folder of images
    apex-eval generate --out evals/student --detector ... --clip ... \\
        -- --source runs/qwen_lora --nfe 1                       # generate, then score

`score` reads the folder's metadata.jsonl, GenEval's numbered folders, or the prompts in the
PNGs' text chunks; `generate` writes such a folder through `apex_dist.generate` (the options
after `--` are its own) and scores it. Each writes results.json and results.md (one row per
task) and prints the table. docs/evaluation.md says how to stage the weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from apex_dist.evaluation.detector import LONGEST_EDGE, SHORTEST_EDGE
from apex_dist.evaluation.evaluator import (
    Evaluator,
    evaluate_records,
    markdown_table,
    summarize,
    write_report,
)
from apex_dist.evaluation.images import ImageGenerator, generate_folder, read_image_folder
from apex_dist.evaluation.prompts import (
    DEFAULT_PER_TASK,
    DEFAULT_SEED,
    generate_prompt_set,
    read_prompt_set,
    specs_by_prompt,
    write_prompt_set,
)

logger = logging.getLogger("apex_dist.evaluation")
# GenEval scores 4 images per prompt (its generation script's n_samples default).
DEFAULT_IMAGES_PER_PROMPT = 4


def _add_prompt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        type=Path,
        help="prompt file (JSONL: this tool's or GenEval's evaluation_metadata.jsonl); default: "
        "the set generated from --seed and --per-task",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="prompt set seed")
    parser.add_argument(
        "--per-task",
        type=int,
        default=DEFAULT_PER_TASK,
        help="prompts per task (single object: at most 80)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clip",
        type=Path,
        required=True,
        help="CLIP snapshot folder (openai/clip-vit-large-patch14)",
    )
    parser.add_argument(
        "--detector",
        type=Path,
        help="Mask2Former COCO instance snapshot folder (facebook/mask2former-swin-small-coco-"
        "instance); without it only the CLIP score is computed",
    )
    parser.add_argument(
        "--detector-input",
        type=int,
        nargs=2,
        metavar=("SHORTEST", "LONGEST"),
        default=(SHORTEST_EDGE, LONGEST_EDGE),
        help="resize of the detector's input: shorter side, longest side at most (default: "
        "GenEval's mmdetection test pipeline)",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apex-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("prompts", help="write the prompt set as JSONL")
    prompts.add_argument("output", type=Path, help="JSONL file to write")
    prompts.add_argument("--seed", type=int, default=DEFAULT_SEED, help="prompt set seed")
    prompts.add_argument("--per-task", type=int, default=DEFAULT_PER_TASK, help="prompts per task")

    score = commands.add_parser("score", help="evaluate a folder of images")
    score.add_argument("images", type=Path, help="folder of images with their prompts")
    score.add_argument("--out", type=Path, help="report folder (default: IMAGES/evaluation)")
    _add_prompt_options(score)
    _add_model_options(score)

    generate = commands.add_parser(
        "generate",
        help="generate the prompt set through apex_dist.generate, then evaluate it "
        "(generator options after --)",
    )
    generate.add_argument("--out", type=Path, required=True, help="folder for images and report")
    generate.add_argument(
        "--images-per-prompt",
        type=int,
        default=DEFAULT_IMAGES_PER_PROMPT,
        help="images of each prompt, each with its own seed (GenEval: 4)",
    )
    generate.add_argument("--image-seed", type=int, default=0, help="seed of the first image")
    _add_prompt_options(generate)
    _add_model_options(generate)
    return parser


def build_generator(generator_arguments: list[str]) -> ImageGenerator:
    """The image generator of `apex_dist.generate`, configured by its own command-line options
    (`apex-eval generate ... -- <options>`): its `generator_from_arguments(list[str])` returns a
    callable (prompts, seeds) -> PIL images (docs/evaluation.md)."""
    try:
        from apex_dist import generate
    except ImportError as error:
        raise RuntimeError(
            f"the generate mode needs apex_dist.generate, which this installation lacks "
            f"({error}): generate the images with your own tool into a folder (docs/"
            "evaluation.md) and run `apex-eval score` on it"
        ) from None
    return generate.generator_from_arguments(generator_arguments)


def _device(name: Optional[str]) -> str:
    if name:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _specs(arguments: argparse.Namespace):
    if arguments.prompts is not None:
        return read_prompt_set(arguments.prompts)
    return generate_prompt_set(arguments.seed, arguments.per_task)


def _score_folder(arguments: argparse.Namespace, folder: Path, output: Path, specs) -> int:
    records = read_image_folder(folder, specs_by_prompt(specs))
    device = _device(arguments.device)
    shortest, longest = arguments.detector_input
    evaluator = Evaluator.from_snapshots(
        arguments.clip,
        arguments.detector,
        device=device,
        shortest_edge=shortest,
        longest_edge=longest,
    )
    results, images_per_second = evaluate_records(
        evaluator, records, arguments.batch_size, show_progress=not arguments.quiet
    )
    summary = summarize(results)
    settings = {
        "images": str(folder),
        "detector": str(arguments.detector) if arguments.detector else None,
        "detector_input": [shortest, longest],
        "clip": str(arguments.clip),
        "device": device,
        "images_per_second": images_per_second,
    }
    json_path, markdown_path = write_report(output, summary, results, settings)
    print(markdown_table(summary), end="")
    print(f"{len(results)} images, {images_per_second:.2f} images/s on {device}")
    print(f"wrote {json_path} and {markdown_path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    generator_arguments: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, generator_arguments = argv[:split], argv[split + 1 :]
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if arguments.command == "prompts":
            specs = generate_prompt_set(arguments.seed, arguments.per_task)
            write_prompt_set(specs, arguments.output)
            print(f"wrote {len(specs)} prompts to {arguments.output}")
            return 0
        if arguments.batch_size < 1 or min(arguments.detector_input) < 1:
            raise ValueError("--batch-size and --detector-input must be >= 1")
        specs = _specs(arguments)
        if arguments.command == "score":
            output = arguments.out or arguments.images / "evaluation"
            return _score_folder(arguments, arguments.images, output, specs)
        if arguments.images_per_prompt < 1:
            raise ValueError("--images-per-prompt must be >= 1")
        generator = build_generator(generator_arguments)
        from tqdm import tqdm

        total = len(specs) * arguments.images_per_prompt
        with tqdm(total=total, unit="image", disable=arguments.quiet, desc="generate") as bar:
            generate_folder(
                generator,
                specs,
                arguments.out,
                per_prompt=arguments.images_per_prompt,
                base_seed=arguments.image_seed,
                batch_size=arguments.batch_size,
                progress=bar.update,
            )
        return _score_folder(arguments, arguments.out, arguments.out, specs)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"apex-eval: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
