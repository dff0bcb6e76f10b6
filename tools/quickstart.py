"""The quickstart: compositional data, a tiny teacher, APEX distillation, resume, and the
student against its teacher on prompts it never saw.

    make demo                                   # = python tools/quickstart.py --out runs/quickstart
    apex-quickstart --out runs/quickstart       # the same, as a console script

Stages (each skipped when its output exists, so re-running the command resumes):

1. data: the train split of the compositional benchmark (`apex_dist.data.benchmark`: GenEval's
   six tasks on synthetic shapes, a quarter of the compositions held out) at 32 px, a tiny
   random Qwen2.5-VL text encoder snapshot (`apex_dist.models.tiny`), and precomputed shards
   (`tools/encode_prompts.encode_shards`: text features, pixels packed in 2x2 patches by
   `apex_dist.models.pixels.PixelCodec`).
2. teacher: the shipped benchmark teacher (`assets/benchmark_teacher`), or with
   --train-teacher an `fm` pretraining of the `qwen-image-pixels-tiny` preset through the real
   launcher (`deepspeed --num_gpus 2 launcher/run.py --config configs/quickstart.yaml`, ZeRO-3,
   CPU), exported to a snapshot (`apex_dist.export`).
3. student: APEX (`apex_v0`) from the teacher snapshot, in two launcher invocations: the second
   resumes from the first one's `latest` checkpoint.
4. evaluate: the teacher at 50 Euler steps with CFG and at 1 step, the student at 1 and 4 NFE,
   on the same noise, on held-out and on train-split prompts, scored per task by the
   benchmark's evaluator; a labelled grid of held-out prompts, the table as `results.json`
   and printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apex_dist.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
# The teacher the demo distils: the compositional benchmark's teacher, made by
# `apex-benchmark-method --export-teacher` (docs/results.md gives the command); a snapshot
# (`transformer/config.json` + fp32 safetensors with E2) and `teacher_info.json` (its CFG scale).
SHIPPED_TEACHER = ROOT / "assets" / "benchmark_teacher"
# The first teacher (`fm` on 128 scenes of the plain shapes dataset, docs/quickstart.md): the
# starting weights of the benchmark's teacher and of one trained here with --train-teacher.
FIRST_TEACHER = ROOT / "assets" / "quickstart_teacher"
logger = logging.getLogger("apex_dist.quickstart")

# Image side of the demo: the synthetic evaluator works from 32 px (docs/data.md).
RESOLUTION = 32
# Words of the synthetic dataset's captions, added to the tiny tokenizer's training text so
# that each colour, shape, count and relation is one token.
CAPTION_VOCABULARY = (
    "a two three red green blue yellow purple circle circles square squares triangle "
    "triangles left of right of above below",
)
# Fraction of a pretraining run's rows on the negative prompt (what CFG needs).
TEACHER_TEXT_DROPOUT = 0.1
# CFG scale of a teacher trained here (--train-teacher); the shipped one records its own.
DEFAULT_GUIDANCE = 4.5
# The samplers of the table: (name, teacher?, Euler steps or NFE, with CFG?).
SAMPLERS = (
    ("teacher 50 steps, CFG", True, 50, True),
    ("teacher 1 step", True, 1, False),
    ("student 1 NFE", False, 1, False),
    ("student 4 NFE", False, 4, False),
)
# The evaluated prompt sets: compositions never trained on, and the training split's.
PROMPT_SETS = ("held_out", "train")
# Held-out prompts per task in the labelled grid.
GRID_PROMPTS_PER_TASK = 2


@dataclass
class Settings:
    """Sizes of one quickstart run (the defaults are the full demo; tests shorten them)."""

    out: Path
    scenes: int
    shards: int
    teacher_steps: int
    teacher_lr: float
    student_steps: int
    student_lr: float
    micro_batch_size: int
    per_task: int
    processes: int
    train_teacher: bool = False
    guidance: float | None = None
    extra_overrides: tuple[str, ...] = ()

    @property
    def teacher_model(self) -> Path:
        """The teacher snapshot: trained here (--train-teacher) or the shipped one."""
        return self.out / "teacher_model" if self.train_teacher else SHIPPED_TEACHER


# ---- helpers ------------------------------------------------------------------------------


def quickstart_spec():
    """The model spec of the quickstart config's preset (its text encoder, pixel codec and
    transformer)."""
    from apex_dist.config import load_config
    from apex_dist.models.spec import model_spec

    return model_spec(load_config(CONFIG, []).model.preset)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def latest_step(run_dir: Path) -> int:
    """The step of `run_dir`'s latest complete checkpoint, 0 when there is none."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    return int(latest.read_text().strip().removeprefix("step_"))


def encoded_urls(settings: Settings) -> list[str]:
    return [
        str(settings.out / "data" / "encoded" / f"bench-{index:06d}.tar")
        for index in range(settings.shards)
    ]


def teacher_guidance(settings: Settings) -> float:
    """The CFG scale of the teacher's row: --guidance, else the shipped teacher's own."""
    if settings.guidance is not None:
        return settings.guidance
    info = settings.teacher_model / "teacher_info.json"
    if info.is_file():
        return float(json.loads(info.read_text())["guidance_scale"])
    return DEFAULT_GUIDANCE


def common_overrides(settings: Settings) -> list[str]:
    urls = json.dumps(encoded_urls(settings))
    return [
        f"data.urls={urls}",
        f"data.epoch_samples={settings.scenes}",
        f"train.micro_batch_size={settings.micro_batch_size}",
        *settings.extra_overrides,
    ]


def launch(settings: Settings, overrides: list[str], log_name: str) -> str:
    """Run launcher/run.py on `settings.processes` DeepSpeed ranks; return its stdout."""
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), environment.get("PYTHONPATH")])
    )
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [
        str(deepspeed),
        "--num_gpus",
        str(settings.processes),
        "--master_port",
        str(free_port()),
        str(ROOT / "launcher" / "run.py"),
        "--config",
        str(CONFIG),
        *overrides,
    ]
    log_path = settings.out / "logs" / f"{log_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("launching %s (log %s)", " ".join(command[:6]) + " ...", log_path)
    lines = []
    with open(log_path, "w", buffering=1) as log:  # line-buffered: follow it with tail -f
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in process.stdout:
            log.write(line)
            lines.append(line)
            if " loss " in line or "resumed from" in line or "Error" in line:
                print(f"  [{log_name}] {line.rstrip()}", flush=True)
        code = process.wait()
    if code != 0:
        tail = "".join(lines[-40:])
        raise RuntimeError(f"{log_name}: the launcher exited with {code}; log {log_path}:\n{tail}")
    return "".join(lines)


def export_model(run_dir: Path, output: Path) -> None:
    """The run's latest checkpoint as an fp32 snapshot with E2 (`<output>/transformer`)."""
    from apex_dist.export.convert import ExportOptions, export_checkpoint

    temporary = output.with_name(f".{output.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    options = ExportOptions(mode="full", dtype="fp32", keep_apex_keys=True)
    export_checkpoint(run_dir, temporary / "transformer", options)
    temporary.replace(output)


# ---- stages -------------------------------------------------------------------------------


def write_text_snapshot_once(snapshot: Path) -> None:
    """The tiny text encoder and tokenizer every quickstart and benchmark run shares."""
    from apex_dist.models.tiny import write_text_snapshot

    if (snapshot / "tokenizer").is_dir():
        return
    temporary = snapshot.with_name(f".{snapshot.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    write_text_snapshot(temporary, seed=0, extra_sentences=CAPTION_VOCABULARY)
    temporary.replace(snapshot)


def compose_snapshot(text_snapshot: Path, transformer_snapshot: Path, destination: Path) -> Path:
    """A snapshot with the text encoder and tokenizer of one and the transformer of another
    (what `model.pretrained` of a run with text dropout or CFG needs); kept when it exists."""
    if (destination / "transformer").is_dir():
        return destination
    temporary = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    for part, source in (
        ("text_encoder", text_snapshot),
        ("tokenizer", text_snapshot),
        ("transformer", transformer_snapshot),
    ):
        shutil.copytree(source / part, temporary / part)
    temporary.replace(destination)
    return destination


def write_training_data(data: Path, snapshot: Path, scenes: int, shards: int) -> dict:
    """The benchmark's train split as image-text shards under `data`, then encoded (fp32 text
    features, packed pixels) into `data/encoded`; shards already encoded are kept."""
    from apex_dist.data.benchmark import write_benchmark_shards
    from apex_tools.encode_prompts import encode_shards

    if not (data / "index.json").is_file():
        write_benchmark_shards(
            data / "bench",
            count=scenes,
            resolution=RESOLUTION,
            samples_per_shard=-(-scenes // shards),
        )
    spec = quickstart_spec()
    text_encoder = spec.text_encoder(snapshot, torch.float32, "cpu", max_length=32)
    codec = spec.image_codec(None, torch.float32, "cpu")  # the pixel codec: no snapshot
    sources = sorted(str(path) for path in data.glob("bench-*.tar"))
    return encode_shards(
        sources, data / "encoded", text_encoder, codec, batch_size=64, resolution=RESOLUTION
    )


def stage_data(settings: Settings) -> dict:
    if all(Path(url).is_file() for url in encoded_urls(settings)):
        return {"skipped": True}
    snapshot = settings.out / "text_snapshot"
    write_text_snapshot_once(snapshot)
    summary = write_training_data(settings.out / "data", snapshot, settings.scenes, settings.shards)
    return {
        "skipped": False,
        "shards": summary["encoded_shards"],
        "samples": summary["samples"],
        "bad_samples": summary["skipped"],
    }


def stage_teacher(settings: Settings) -> dict:
    run_dir = settings.out / "teacher"
    model_dir = settings.teacher_model
    if not settings.train_teacher:
        if not (model_dir / "transformer").is_dir():
            raise FileNotFoundError(
                f"the shipped teacher {model_dir} is missing; train one with --train-teacher "
                "(docs/quickstart.md)"
            )
        return {"skipped": True, "teacher": str(model_dir)}
    if model_dir.is_dir():
        return {"skipped": True, "teacher": str(model_dir)}
    start = compose_snapshot(
        settings.out / "text_snapshot", FIRST_TEACHER, settings.out / "teacher_start"
    )
    overrides = [
        *common_overrides(settings),
        f"model.pretrained={start}",
        "method.objective=fm",
        f"data.text_dropout={TEACHER_TEXT_DROPOUT}",
        f"optimizer.lr={settings.teacher_lr}",
        f"train.steps={settings.teacher_steps}",
        f"train.output_dir={run_dir}",
        "logging.sample_every_steps=0",
        f"checkpoint.every_steps={settings.teacher_steps}",
    ]
    launch(settings, overrides, "teacher")
    export_model(run_dir, model_dir)
    return {"skipped": False, "teacher": str(model_dir), "steps": latest_step(run_dir)}


def stage_student(settings: Settings) -> dict:
    """Two launcher invocations; the second resumes from the first's latest checkpoint."""
    run_dir = settings.out / "student"
    half = settings.student_steps // 2
    start = compose_snapshot(
        settings.out / "text_snapshot", settings.teacher_model, settings.out / "student_start"
    )
    overrides = [
        *common_overrides(settings),
        f"model.pretrained={start}",
        f"optimizer.lr={settings.student_lr}",
        f"train.output_dir={run_dir}",
        f"checkpoint.every_steps={half}",
        f"logging.sample_every_steps={half}",
    ]
    result = {"first_part_steps": None, "resumed_at": None}
    if latest_step(run_dir) >= settings.student_steps:
        return {"skipped": True, **result}
    if latest_step(run_dir) < half:
        launch(settings, [*overrides, f"train.steps={half}"], "student_part1")
        result["first_part_steps"] = latest_step(run_dir)
    output = launch(
        settings, [*overrides, f"train.steps={settings.student_steps}"], "student_part2"
    )
    resumed = [line for line in output.splitlines() if "resumed from" in line]
    if resumed:
        result["resumed_at"] = int(resumed[-1].rsplit("at step", 1)[1].split()[0])
    return {"skipped": False, **result}


def load_snapshot(path: Path):
    """A transformer snapshot (teacher or exported student) in fp32 on the CPU, built and
    loaded by the quickstart preset's spec (E2 from E1 when the snapshot has none)."""
    spec = quickstart_spec()
    with torch.device("cpu"):
        model = spec.build(spec.snapshot_architecture(path))
    spec.load_pretrained(model, path, "fp32")
    return model.eval()


def evaluation_batch(settings: Settings) -> dict:
    """The first `evaluation_count` scenes of the encoded shards, in order."""
    from safetensors.torch import load as load_safetensors

    from apex_dist.data.sources import read_shard

    rows = []
    for url in encoded_urls(settings):
        for sample in read_shard(url):
            tensors = load_safetensors(sample.members["safetensors"])
            rows.append((tensors, json.loads(sample.members["json"])))
            if len(rows) == settings.evaluation_count:
                break
        if len(rows) == settings.evaluation_count:
            break
    length = max(len(tensors["text_mask"]) for tensors, _ in rows)
    width = rows[0][0]["text"].shape[-1]
    text = torch.zeros(len(rows), length, width)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, (tensors, _) in enumerate(rows):
        size = len(tensors["text_mask"])
        text[index, :size] = tensors["text"]
        mask[index, :size] = tensors["text_mask"].bool()
    return {
        "text": text,
        "text_mask": mask,
        "latents": torch.stack([tensors["latents"] for tensors, _ in rows]),
        "image_shape": tuple(int(size) for size in rows[0][0]["image_shape"]),
        "specs": [metadata for _, metadata in rows],
    }


def write_image_grid(columns: list[torch.Tensor], path: Path, per_row: int = 8) -> None:
    """Images (B, 3, H, W) in [-1, 1], one column group per sampler side by side; atomic PNG."""
    from PIL import Image

    count, _, height, width = columns[0].shape
    gap = 2
    rows = -(-count // per_row)
    group_width = per_row * (width + gap)
    grid = torch.ones(3, rows * (height + gap), len(columns) * (group_width + 3 * gap))
    for column_index, images in enumerate(columns):
        for index, image in enumerate(images.clamp(-1, 1).add(1).div(2)):
            top = (index // per_row) * (height + gap)
            left = column_index * (group_width + 3 * gap) + (index % per_row) * (width + gap)
            grid[:, top : top + height, left : left + width] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def write_labelled_grid(
    columns: dict[str, torch.Tensor], captions: list[str], path: Path, scale: int = 4
) -> None:
    """One row per caption, one column per named set of images (B, 3, H, W) in [-1, 1],
    enlarged `scale` times, names on top and captions on the left; atomic PNG."""
    from PIL import Image, ImageDraw

    from apex_dist.data.evaluate import to_uint8

    size = next(iter(columns.values())).shape[-1] * scale
    header, gap = 30, 4
    caption_width = 12 + int(
        max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(caption) for caption in captions)
    )
    width = caption_width + len(columns) * (size + gap)
    canvas = Image.new("RGB", (width, header + len(captions) * (size + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, name in enumerate(columns):
        left = caption_width + column * (size + gap)
        draw.multiline_text((left, 2), name.replace(", ", ",\n"), fill="black")
    for row, caption in enumerate(captions):
        top = header + row * (size + gap)
        draw.text((4, top + size // 2 - 6), caption, fill="black")
        for column, images in enumerate(columns.values()):
            picture = Image.fromarray(to_uint8(images[row : row + 1])[0])
            picture = picture.resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(picture, (caption_width + column * (size + gap), top))
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")


def references(specs: list[dict]) -> torch.Tensor:
    """Renders of the prompts' drawn scenes (B, 3, H, W) in [-1, 1]: what a correct image is."""
    from apex_dist.data.benchmark import render_benchmark

    pictures = [torch.from_numpy(render_benchmark(spec, RESOLUTION)) for spec in specs]
    return torch.stack(pictures).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def stage_evaluate(settings: Settings) -> dict:
    """Every sampler on the held-out and the train-split prompts from the same noise, scored
    by the benchmark's evaluator; per-sampler grids and the labelled held-out grid."""
    from apex_tools.benchmark_method import Prompts, run_sampler, score, slug

    student_model = settings.out / "student_model"
    if not student_model.is_dir():
        export_model(settings.out / "student", student_model)
    guidance = teacher_guidance(settings)
    models = {True: load_snapshot(settings.teacher_model), False: load_snapshot(student_model)}
    grids = settings.out / "grids"
    rows = {}
    results = {"guidance": guidance, "per_task": settings.per_task, "prompts": {}}
    for prompt_set in PROMPT_SETS:
        prompts = Prompts(settings.out / "text_snapshot", prompt_set, settings.per_task)
        results["prompts"][prompt_set] = len(prompts.specs)
        pictures = {"asked (a correct render)": references(prompts.specs)}
        results[f"{prompt_set}_reference_score"] = score(
            pictures["asked (a correct render)"], prompts
        )["overall"]
        for name, is_teacher, amount, with_guidance in SAMPLERS:
            label = f"{name} {guidance:g}" if with_guidance else name
            started = time.perf_counter()
            images = run_sampler(
                models[is_teacher],
                prompts,
                "teacher" if is_teacher else "student",
                amount,
                guidance if with_guidance else 1.0,
            )
            row = rows.setdefault(label, {"sampler": label, "seconds": {}})
            row["seconds"][prompt_set] = round(time.perf_counter() - started, 2)
            row[prompt_set] = score(images, prompts)
            pictures[label] = images
            if prompt_set == "held_out":
                write_image_grid([images], grids / f"{slug(label)}.png", per_row=settings.per_task)
        if prompt_set == "held_out":
            chosen = [
                task * settings.per_task + index
                for task in range(len(prompts.specs) // settings.per_task)
                for index in range(min(GRID_PROMPTS_PER_TASK, settings.per_task))
            ]
            write_labelled_grid(
                {name: images[chosen] for name, images in pictures.items()},
                [prompts.specs[index]["caption"] for index in chosen],
                grids / "held_out_comparison.png",
            )
    results["rows"] = list(rows.values())
    held_out = {label: row["held_out"]["overall"] for label, row in rows.items()}
    teacher_label = f"{SAMPLERS[0][0]} {guidance:g}"
    results["student_1_nfe_over_teacher"] = held_out["student 1 NFE"] / max(
        held_out[teacher_label], 1e-9
    )
    results["grids"] = sorted(str(path) for path in grids.glob("*.png"))
    (settings.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    prompts = results["prompts"]
    lines = [
        f"compositional benchmark, {results['per_task']} prompts per task: "
        f"{prompts['held_out']} held-out prompts (compositions never trained on), "
        f"{prompts['train']} train-split prompts; a correct render of each scores "
        f"{results['held_out_reference_score']:.3f} / {results['train_reference_score']:.3f}",
        "| sampler | held-out: all checks | held-out: checks passed | "
        "train split: all checks | train split: checks passed |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [
            f"{row[prompt_set][measure]:.3f}"
            for prompt_set in PROMPT_SETS
            for measure in ("overall", "checks")
        ]
        lines.append(f"| {row['sampler']} | " + " | ".join(cells) + " |")
    lines.append(
        "held-out, all checks: the student at 1 NFE scores "
        f"{results['student_1_nfe_over_teacher']:.2f}x the teacher at 50 steps with CFG "
        f"{results['guidance']:g}"
    )
    return "\n".join(lines)


def run(settings: Settings) -> dict:
    """Every stage in order; returns {stage: summary} (also written to stages.json)."""
    settings.out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name, stage in (
        ("data", stage_data),
        ("teacher", stage_teacher),
        ("student", stage_student),
        ("evaluate", stage_evaluate),
    ):
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        summaries[name] = stage(settings)
        summaries[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"== {name} done in {summaries[name]['seconds']} s", flush=True)
    (settings.out / "stages.json").write_text(json.dumps(summaries, indent=2, default=str))
    return summaries


def parse_arguments(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="folder of every output")
    parser.add_argument("--scenes", type=int, default=16384, help="train-split scenes")
    parser.add_argument("--shards", type=int, default=4, help="shards the scenes are split into")
    parser.add_argument(
        "--train-teacher",
        action="store_true",
        help="pretrain the teacher with fm here instead of using the shipped one",
    )
    parser.add_argument("--teacher-steps", type=int, default=4000, help="fm pretraining steps")
    parser.add_argument("--teacher-lr", type=float, default=1e-3, help="teacher learning rate")
    parser.add_argument("--student-steps", type=int, default=250, help="APEX steps (2 parts)")
    parser.add_argument("--student-lr", type=float, default=3e-4, help="student learning rate")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="rows per rank")
    parser.add_argument(
        "--per-task", type=int, default=24, help="evaluated prompts per task and prompt set"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"the teacher's CFG scale (default: the shipped teacher's, {DEFAULT_GUIDANCE} else)",
    )
    parser.add_argument("--processes", type=int, default=2, help="DeepSpeed ranks")
    parser.add_argument(
        "overrides", nargs="*", help="extra key=value config overrides for both training runs"
    )
    arguments = parser.parse_args(argv)
    if arguments.student_steps < 2:
        parser.error("--student-steps must be >= 2: the run is done in two halves")
    if arguments.micro_batch_size % 4:
        parser.error("--micro-batch-size must be a multiple of 4 (apex_v0 splits it in four)")
    return Settings(
        out=Path(arguments.out).resolve(),
        scenes=arguments.scenes,
        shards=arguments.shards,
        teacher_steps=arguments.teacher_steps,
        teacher_lr=arguments.teacher_lr,
        student_steps=arguments.student_steps,
        student_lr=arguments.student_lr,
        micro_batch_size=arguments.micro_batch_size,
        per_task=arguments.per_task,
        guidance=arguments.guidance,
        processes=arguments.processes,
        train_teacher=arguments.train_teacher,
        extra_overrides=tuple(arguments.overrides),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = parse_arguments(argv)
    started = time.perf_counter()
    run(settings)
    results = json.loads((settings.out / "results.json").read_text())
    print(format_table(results))
    print(f"grids: {settings.out / 'grids'}; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
