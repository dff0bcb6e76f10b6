"""Images from a distilled student (or its teacher): the Python side of `apex-generate`.

The student comes from a training run directory, a full or merged export, or a LoRA export on
its base snapshot (`apex_dist.export.student`, which also undoes an export's one-step fold);
the text encoder and the VAE (or the pixel codec) come from the snapshot, through the training
batch preparer (`apex_dist.data.prepare.BatchPreparer`).

`Generator` samples a batch of (prompt, seed) pairs: the noise of an image, and at 2 and 4 NFE
the fresh noise of each re-noising, come from a CPU generator seeded by that image's seed, so an
image depends on its prompt and seed only (not on the batch or the device's random stream).
`generator_from_arguments` builds one from apex-generate's options (used by `apex-eval
generate`); `main` is the console script (docs/generate.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from apex_dist.export.convert import nested
from apex_dist.export.student import (
    DTYPE_NAMES,
    SOURCE_LORA_EXPORT,
    SOURCE_RUN,
    LoadedModel,
    SourceError,
    is_snapshot,
    load_student,
    load_teacher,
    pretrained_of,
    run_config_path,
    source_kind,
    torch_dtype,
)
from apex_dist.models.velocity import VelocityModelAdapter

logger = logging.getLogger("apex_dist")

# Student numbers of function evaluations the sampler's grids are tuned for (method.md).
STUDENT_NFES = (1, 2, 4)
# The teacher's defaults: 50 Euler steps with classifier-free guidance 4 (Qwen-Image's
# true_cfg_scale default, also logging.teacher_guidance_scale) against the empty prompt.
TEACHER_STEPS = 50
TEACHER_GUIDANCE_SCALE = 4.0
TEACHER_NEGATIVE_PROMPT = ""
# Image side when neither the options nor the run's config give one.
DEFAULT_RESOLUTION = 1024
# Preset assumed for exports when --preset is not given (the family decides the image codec;
# the architecture itself always comes from the files).
DEFAULT_EXPORT_PRESET = "qwen-image-20b"
# Columns of one contact sheet (more images go to further sheets), and the longest side of an
# image on a sheet (larger images are shrunk, so that a sheet of 1024-pixel images stays small).
SHEET_COLUMNS = 8
SHEET_CELL_PIXELS = 256


class GenerateError(SourceError):
    """A wrong option or input of apex-generate (a `SourceError`, as the loaders' own)."""


# --------------------------------------------------------------------------------------------
# sampling


@dataclass
class Settings:
    """How images are made (apex-generate's options; `build_parser` documents each)."""

    source: Optional[Path] = None
    base: Optional[Path] = None
    tag: Optional[str] = None
    weights: str = "trained"
    lora_alpha: Optional[float] = None
    teacher: bool = False
    compare: bool = False
    preset: Optional[str] = None
    nfe: int = 1
    teacher_steps: int = TEACHER_STEPS
    guidance_scale: float = TEACHER_GUIDANCE_SCALE
    negative_prompt: str = TEACHER_NEGATIVE_PROMPT
    height: Optional[int] = None
    width: Optional[int] = None
    resolution: Optional[int] = None
    aspect: float = 1.0
    dtype: str = "fp32"
    device: Optional[str] = None
    batch_size: int = 4

    def check(self) -> None:
        """Every wrong option at once, as one GenerateError."""
        problems = []
        if self.nfe not in STUDENT_NFES:
            problems.append(f"--nfe must be one of {', '.join(map(str, STUDENT_NFES))}")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
        if self.weights not in ("trained", "ema"):
            problems.append("--weights must be trained or ema")
        for name in ("batch_size", "teacher_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("height", "width", "resolution"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name} must be >= 1 (got {value})")
        if (self.height is None) != (self.width is None):
            problems.append("--height and --width go together (or use --resolution/--aspect)")
        if self.aspect <= 0:
            problems.append(f"--aspect must be > 0 (got {self.aspect})")
        if self.source is None and not self.teacher:
            problems.append("--source is required (a run directory or an export), or --teacher")
        if (self.teacher or self.compare) and self.base is None and self.source is None:
            problems.append("--teacher needs --base SNAPSHOT_DIR")
        if self.compare and self.source is None:
            problems.append("--compare needs --source (the student) and the teacher's snapshot")
        if problems:
            raise GenerateError("; ".join(problems))


def image_size(settings: Settings, run_resolution: Optional[int]) -> tuple[int, int]:
    """(height, width): --height/--width, else --resolution (or the run's data.resolution)
    at --aspect (width / height), rounded like the training buckets."""
    from apex_dist.data.samples import bucket_sizes

    if settings.height is not None and settings.width is not None:
        return settings.height, settings.width
    resolution = settings.resolution or run_resolution or DEFAULT_RESOLUTION
    return bucket_sizes(resolution, [settings.aspect])[0]


def _device(name: Optional[str]) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise GenerateError(f"--device {name!r}: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GenerateError("--device cuda: no CUDA device is available (use --device cpu)")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Generator:
    """Samples images of (prompt, seed) pairs with a student and/or its teacher (module doc).

    Args:
        settings: the options.
        student: the student (None: teacher only).
        teacher: the teacher (None: student only).
        preparer: the text encoder and image codec (`apex_dist.data.prepare.BatchPreparer`).
        size: (height, width) of the images.
        device: where sampling runs.
    """

    def __init__(
        self,
        settings: Settings,
        student: Optional[LoadedModel],
        teacher: Optional[LoadedModel],
        preparer,
        size: tuple[int, int],
        device: torch.device,
    ):
        self.settings = settings
        self.student = student
        self.teacher = teacher
        self.preparer = preparer
        self.size = size
        self.device = device
        self.latent_shape = preparer.geometry.latent_shape(*size)
        self.image_shape = preparer.geometry.image_shape(*size)
        # inputs cast to the model's dtype, velocities returned in fp32 (as in training)
        self.velocity = {
            which: VelocityModelAdapter(loaded.model, torch_dtype(settings.dtype))
            for which, loaded in (("student", student), ("teacher", teacher))
            if loaded is not None
        }
        self.seconds: dict[str, float] = {"student": 0.0, "teacher": 0.0}
        self.images_made: dict[str, int] = {"student": 0, "teacher": 0}

    # ---- the callable of apex-eval generate ----------------------------------------------------

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        """Images of the main model (the student, or the teacher with --teacher)."""
        return self.images(prompts, seeds, "teacher" if self.student is None else "student")

    def images(self, prompts: Sequence[str], seeds: Sequence[int], which: str) -> list:
        """PIL images of `which` ("student" or "teacher"), one per (prompt, seed)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one each")
        pictures = []
        for start in range(0, len(prompts), self.settings.batch_size):
            stop = start + self.settings.batch_size
            latents = self.latents(list(prompts[start:stop]), list(seeds[start:stop]), which)
            pictures += self.decode(latents)
        return pictures

    @torch.no_grad()
    def latents(self, prompts: list[str], seeds: list[int], which: str) -> Tensor:
        """Sampled latents (B, N, C) of one batch, timed per model."""
        from apex_dist.method import sample, sample_euler

        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators])
        noise = noise.to(self.device)
        text, mask, _ = self.preparer.encode_prompts(prompts)
        text, mask = text.to(self.device), mask.to(self.device)
        started = time.perf_counter()
        if which == "student":
            latents = sample(
                self.velocity["student"],
                noise,
                text,
                mask,
                nfe=self.settings.nfe,
                generator=generators,
                image_shape=self.image_shape,
            )
        else:
            negative, negative_mask = self.preparer.text_encoder().negative(
                self.settings.negative_prompt
            )
            latents = sample_euler(
                self.velocity["teacher"],
                noise,
                text,
                mask,
                steps=self.settings.teacher_steps,
                guidance_scale=self.settings.guidance_scale,
                neg_text=negative.to(self.device).float(),
                neg_text_mask=negative_mask.to(self.device),
                image_shape=self.image_shape,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[which] += time.perf_counter() - started
        self.images_made[which] += len(prompts)
        return latents

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list:
        """Latents -> PIL images (the VAE or the pixel codec)."""
        from PIL import Image

        images = self.preparer.decode(latents, self.image_shape).float().clamp(-1, 1)
        pixels = ((images + 1) * 127.5).round().to(torch.uint8).cpu()
        return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]

    def chunks(self, which: str) -> dict[str, str]:
        """The PNG text chunks that say how an image of `which` was made."""
        height, width = self.size
        chunks = {"model": which, "size": f"{width}x{height}", "dtype": self.settings.dtype}
        if which == "student":
            chunks.update({"nfe": str(self.settings.nfe), "source": self.student.description})
        else:
            chunks.update(
                {
                    "steps": str(self.settings.teacher_steps),
                    "guidance_scale": f"{self.settings.guidance_scale:g}",
                    "negative_prompt": self.settings.negative_prompt,
                    "source": self.teacher.description,
                }
            )
        return chunks

    @torch.no_grad()
    def warm_up(self, which: str, prompt: str) -> None:
        """One untimed pass of `which` (kernels, allocator), so that timings measure sampling."""
        from apex_dist.method import sample, sample_euler

        noise = torch.zeros((1, *self.latent_shape), device=self.device)
        text, mask, _ = self.preparer.encode_prompts([prompt])
        text, mask = text.to(self.device), mask.to(self.device)
        if which == "student":
            sample(self.velocity[which], noise, text, mask, nfe=1, image_shape=self.image_shape)
        else:
            sample_euler(
                self.velocity[which], noise, text, mask, steps=1, image_shape=self.image_shape
            )

    def per_second(self, which: str) -> float:
        seconds = self.seconds[which]
        return self.images_made[which] / seconds if seconds > 0 else float("nan")


def _preparer(settings: Settings, run_config: Optional[Path], snapshot, device):
    """The batch preparer (text encoder and image codec) of a config that holds only what they
    need: the preset (the run's, --preset, or DEFAULT_EXPORT_PRESET), the snapshot, the dtype
    and the run's text length; and the run's data.resolution (None without a run). The rest of
    a run's config (data paths, evaluation models) is not read, so a run moved to another
    machine still generates."""
    import yaml

    from apex_dist.config import load_config
    from apex_dist.data.prepare import BatchPreparer

    recorded = yaml.safe_load(run_config.read_text()) if run_config is not None else {}
    preset = settings.preset or nested(recorded, "model", "preset") or DEFAULT_EXPORT_PRESET
    if snapshot is None:
        raise GenerateError(
            "no snapshot for the text encoder and VAE: pass --base SNAPSHOT_DIR"
            + ("" if run_config is None else f" ({run_config} sets no model.pretrained)")
        )
    if not Path(snapshot).is_dir():
        raise GenerateError(
            f"the snapshot {snapshot} (model.pretrained of {run_config}) does not exist on this "
            "machine: pass --base SNAPSHOT_DIR with the text encoder and VAE"
        )
    overrides = [
        f"model.preset={preset}",
        f"model.pretrained={snapshot}",
        f"model.dtype={settings.dtype}",
    ]
    text_max_length = nested(recorded, "model", "text_max_length")
    if text_max_length is not None:
        overrides.append(f"model.text_max_length={text_max_length}")
    try:
        config = load_config(None, overrides)
    except ValueError as error:
        raise GenerateError(f"the text encoder and image codec: {error}") from None
    return BatchPreparer(config, device, 0), nested(recorded, "data", "resolution")


def build_generator(settings: Settings) -> Generator:
    """Load what `settings` asks for and return the Generator (GenerateError on bad input).

    Cheap checks come first (options, paths, the run's config, the snapshot, the image size);
    then each transformer is loaded and moved to the device before the next one is loaded, so
    that the host holds one model at a time.
    """
    settings.check()
    device = _device(settings.device)
    source, snapshot = settings.source, settings.base
    wants_student = source is not None and (settings.compare or not settings.teacher)
    run_config = None
    if source is not None and snapshot is None and not wants_student and is_snapshot(source):
        snapshot = source  # --teacher --source SNAPSHOT: the base model itself
    elif source is not None:
        kind = source_kind(source)
        if kind == SOURCE_RUN:
            run_config = run_config_path(source, settings.tag)
        elif kind == SOURCE_LORA_EXPORT and snapshot is None:
            raise GenerateError(
                f"{source} is a LoRA export: it holds the adapters only; pass --base "
                "SNAPSHOT_DIR with the model the LoRA was trained on"
            )
    if snapshot is None and run_config is not None:
        snapshot = pretrained_of(run_config)
    preparer, resolution = _preparer(settings, run_config, snapshot, device)
    try:
        size = image_size(settings, resolution)
        preparer.geometry.image_shape(*size)
    except ValueError as error:
        raise GenerateError(f"image size: {error}") from None
    student = teacher = None
    if wants_student:
        student = load_student(
            source,
            settings.base,
            settings.tag,
            settings.weights,
            settings.dtype,
            settings.lora_alpha,
        )
        student.model.to(device)
    if settings.teacher or settings.compare:
        teacher = load_teacher(snapshot, settings.dtype)
        teacher.model.to(device)
    return Generator(settings, student, teacher, preparer, size, device)


# --------------------------------------------------------------------------------------------
# options, files and the command line


class _Parser(argparse.ArgumentParser):
    """argparse that raises GenerateError instead of exiting (apex-eval builds generators
    from these options inside its own process)."""

    def error(self, message: str):
        raise GenerateError(message)


def build_parser() -> argparse.ArgumentParser:
    """apex-generate's options (also the options after `--` of `apex-eval generate`)."""
    parser = _Parser(
        prog="apex-generate",
        description="Generate images with a distilled APEX student (or its teacher).",
        epilog="docs/generate.md has the commands for each source and what each option means.",
    )
    parser.add_argument("prompts", nargs="*", help="prompts (also --prompt-file)")
    parser.add_argument("--prompt-file", type=Path, help="text file with one prompt per line")
    parser.add_argument(
        "--source",
        type=Path,
        help="the student: a training run directory (its checkpoints/latest), a full or merged "
        "export, or a LoRA export (with --base)",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="base snapshot (Hugging Face layout): text encoder, VAE, the teacher, and the base "
        "weights of a LoRA (default for runs: config.yaml model.pretrained)",
    )
    parser.add_argument(
        "--tag", help="checkpoint tag of a run, e.g. step_00001000 (default: latest)"
    )
    parser.add_argument(
        "--weights", choices=("trained", "ema"), default="trained", help="a run's weights"
    )
    parser.add_argument(
        "--lora-alpha",
        type=float,
        help="LoRA alpha, over the one of the run's config.yaml or the LoRA file (needed when "
        "neither names it)",
    )
    parser.add_argument(
        "--teacher", action="store_true", help="generate with the base model (Euler + CFG)"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="student and teacher on the same prompts and seeds; prints the measured speed-up",
    )
    parser.add_argument(
        "--preset",
        help=f"model preset deciding the image codec (default: the run's, else "
        f"{DEFAULT_EXPORT_PRESET}; qwen-image-pixels-* for pixel space)",
    )
    parser.add_argument(
        "--nfe", type=int, default=1, choices=STUDENT_NFES, help="student steps (default 1)"
    )
    parser.add_argument(
        "--teacher-steps", type=int, default=TEACHER_STEPS, help="teacher's Euler steps"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=TEACHER_GUIDANCE_SCALE,
        help="teacher's classifier-free guidance scale (1 disables)",
    )
    parser.add_argument(
        "--negative-prompt",
        default=TEACHER_NEGATIVE_PROMPT,
        help="teacher's negative prompt (default: empty)",
    )
    parser.add_argument("--height", type=int, help="image height in pixels (with --width)")
    parser.add_argument("--width", type=int, help="image width in pixels (with --height)")
    parser.add_argument(
        "--resolution",
        type=int,
        help=f"image side for a square image; default the run's data.resolution, else "
        f"{DEFAULT_RESOLUTION}",
    )
    parser.add_argument(
        "--aspect", type=float, default=1.0, help="width / height at --resolution (default 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the first image; image i gets seed + i"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="one seed per image (overrides --seed)"
    )
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images of each prompt")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="model dtype")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--out", type=Path, default=Path("generated"), help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def settings_from(arguments: argparse.Namespace) -> Settings:
    return Settings(
        source=arguments.source,
        base=arguments.base,
        tag=arguments.tag,
        weights=arguments.weights,
        lora_alpha=arguments.lora_alpha,
        teacher=arguments.teacher,
        compare=arguments.compare,
        preset=arguments.preset,
        nfe=arguments.nfe,
        teacher_steps=arguments.teacher_steps,
        guidance_scale=arguments.guidance_scale,
        negative_prompt=arguments.negative_prompt,
        height=arguments.height,
        width=arguments.width,
        resolution=arguments.resolution,
        aspect=arguments.aspect,
        dtype=arguments.dtype,
        device=arguments.device,
        batch_size=arguments.batch_size,
    )


def generator_from_arguments(arguments: list[str]) -> Callable[[list[str], list[int]], list]:
    """The image generator of apex-generate's `arguments` (prompts and --out are ignored): a
    callable (prompts, seeds) -> PIL images, one per pair (`apex-eval generate` calls it)."""
    return build_generator(settings_from(build_parser().parse_args(list(arguments))))


def read_prompts(arguments: argparse.Namespace) -> list[str]:
    prompts = list(arguments.prompts)
    if arguments.prompt_file is not None:
        try:
            lines = arguments.prompt_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise GenerateError(f"--prompt-file {arguments.prompt_file}: {error}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise GenerateError("no prompts: give them as arguments or with --prompt-file")
    return prompts


def image_jobs(arguments: argparse.Namespace, prompts: list[str]) -> list[tuple[str, int, str]]:
    """(prompt, seed, file name) of every image, prompt by prompt."""
    per_prompt = arguments.images_per_prompt
    if per_prompt < 1:
        raise GenerateError(f"--images-per-prompt must be >= 1 (got {per_prompt})")
    count = len(prompts) * per_prompt
    seeds = arguments.seeds
    if seeds is not None and len(seeds) != count:
        raise GenerateError(
            f"--seeds gives {len(seeds)} seeds for {count} images ({len(prompts)} prompts x "
            f"{per_prompt}): give one per image, or --seed for consecutive seeds"
        )
    if seeds is None:
        seeds = [arguments.seed + index for index in range(count)]
    return [
        (prompt, seeds[index * per_prompt + sample], f"{index:05d}_{sample}.png")
        for index, prompt in enumerate(prompts)
        for sample in range(per_prompt)
    ]


def write_contact_sheets(
    rows: list[tuple[str, list]], captions: list[str], folder: Path
) -> list[Path]:
    """Labelled sheets (one row per model, the prompt and seed under each column), at most
    SHEET_COLUMNS columns each: contact_sheet.png, or contact_sheet_000.png, ... ."""
    import numpy

    from apex_dist.validation import save_labelled_grid

    def as_tensor(picture) -> Tensor:
        thumbnail = picture.convert("RGB")
        thumbnail.thumbnail((SHEET_CELL_PIXELS, SHEET_CELL_PIXELS))
        return torch.from_numpy(numpy.array(thumbnail)).permute(2, 0, 1) / 255.0

    starts = range(0, len(captions), SHEET_COLUMNS)
    paths = []
    for number, start in enumerate(starts):
        stop = start + SHEET_COLUMNS
        name = "contact_sheet.png" if len(starts) == 1 else f"contact_sheet_{number:03d}.png"
        sheet_rows = [
            (label, [as_tensor(p) for p in pictures[start:stop]]) for label, pictures in rows
        ]
        save_labelled_grid(sheet_rows, captions[start:stop], folder / name)
        paths.append(folder / name)
    return paths


def write_metadata(folder: Path, jobs: list[tuple[str, int, str]]) -> None:
    """metadata.jsonl listing the images with their prompts and seeds, so that `apex-eval
    score FOLDER` reads the folder (and not the contact sheets beside the images)."""
    from apex_dist.atomic import atomic_write_text
    from apex_dist.evaluation.images import METADATA_FILE

    lines = [
        json.dumps({"file": name, "prompt": prompt, "seed": seed}) + "\n"
        for prompt, seed, name in jobs
    ]
    atomic_write_text(folder / METADATA_FILE, "".join(lines))


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    """apex-generate: images, contact sheets and timings; returns what it measured."""
    from tqdm import tqdm

    from apex_dist.evaluation.images import ImageRecord, save_png

    prompts = read_prompts(arguments)
    jobs = image_jobs(arguments, prompts)
    settings = settings_from(arguments)
    generator = build_generator(settings)
    which_models = (
        ["student", "teacher"]
        if settings.compare
        else ["teacher" if generator.student is None else "student"]
    )
    folder = Path(arguments.out)
    labels = {
        "student": f"student\n{settings.nfe} NFE",
        "teacher": f"teacher\n{settings.teacher_steps} steps\ncfg {settings.guidance_scale:g}",
    }
    rows = []
    for which in which_models:
        subfolder = folder / which if settings.compare else folder
        subfolder.mkdir(parents=True, exist_ok=True)
        if settings.compare:
            generator.warm_up(which, jobs[0][0])
        pictures = []
        batch_size = settings.batch_size
        with tqdm(total=len(jobs), unit="image", desc=which, disable=arguments.quiet) as bar:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                latents = generator.latents(
                    [job[0] for job in batch], [job[1] for job in batch], which
                )
                images = generator.decode(latents)
                chunks = generator.chunks(which)
                for image, (prompt, seed, name) in zip(images, batch, strict=True):
                    save_png(
                        image, subfolder / name, ImageRecord(Path(name), prompt, seed=seed), chunks
                    )
                pictures += images
                bar.update(len(batch))
        write_metadata(subfolder, jobs)
        rows.append((labels[which], pictures))
    sheets = write_contact_sheets(rows, [f"{job[0]} (seed {job[1]})" for job in jobs], folder)
    measured: dict[str, Any] = {"images": len(jobs), "sheets": [str(path) for path in sheets]}
    device = generator.device
    for which in which_models:
        rate = generator.per_second(which)
        measured[f"{which}_images_per_second"] = rate
        measured[f"{which}_seconds"] = generator.seconds[which]
        print(
            f"{which}: {generator.images_made[which]} images in {generator.seconds[which]:.2f} s "
            f"of sampling, {rate:.3f} images/s on {device}"
        )
    if settings.compare:
        guided = settings.guidance_scale != 1
        evaluations = settings.teacher_steps * (2 if guided else 1)
        speedup = measured["teacher_seconds"] / max(measured["student_seconds"], 1e-12)
        measured.update({"speedup": speedup, "evaluation_ratio": evaluations / settings.nfe})
        teacher = f"{settings.teacher_steps} steps" + (" x 2 for CFG" if guided else ", no CFG")
        print(
            f"speed-up: {speedup:.1f}x measured (student {settings.nfe} NFE vs teacher "
            f"{teacher}; {evaluations / settings.nfe:.0f}x fewer transformer evaluations)"
        )
    written = len(jobs) * len(which_models)
    print(f"wrote {written} images and {len(sheets)} contact sheet(s) to {folder}")
    return measured


def main(argv: Optional[list[str]] = None) -> int:
    """The console script: exit 0, or 2 with one line naming the problem (no traceback)."""
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        arguments = build_parser().parse_args(argv)
        run(arguments)
    except SourceError as error:  # GenerateError included
        print(f"apex-generate: error: {error}", file=sys.stderr)
        return 2
    return 0
