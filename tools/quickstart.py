"""The quickstart: synthetic data, a tiny teacher, APEX distillation, resume and evaluation.

    make demo                                   # = python tools/quickstart.py --out runs/quickstart
    apex-quickstart --out runs/quickstart       # the same, as a console script

Stages (each skipped when its output exists, so re-running the command resumes):

1. data: synthetic shapes scenes (`apex_dist.data.write_synthetic_shards`) at 32 px, a tiny
   random Qwen2.5-VL text encoder snapshot (`apex_dist.models.tiny`), and precomputed shards
   (`tools/encode_prompts.encode_shards`: text features, pixels packed in 2x2 patches by
   `apex_dist.models.pixels.PixelCodec`).
2. teacher: `fm` pretraining of the `qwen-image-pixels-tiny` preset through the real launcher
   (`deepspeed --num_gpus 2 launcher/run.py --config configs/quickstart.yaml`, ZeRO-3, CPU),
   exported to a snapshot (`apex_dist.export`).
3. student: APEX (`apex_v0`) from the teacher snapshot, in two launcher invocations: the second
   resumes from the first one's `latest` checkpoint.
4. evaluate: the teacher at 50 and 1 Euler steps and the student at 1 NFE on the same noise and
   prompts, scored by the synthetic evaluator (`apex_dist.data.evaluate_images`); sample grids
   as PNG and the table as `results.json` and printed.
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
# The teacher the repository ships: `fm` pretraining by this driver (docs/quickstart.md gives
# the command), exported as a snapshot (`transformer/config.json` + safetensors, fp32, with E2).
SHIPPED_TEACHER = ROOT / "assets" / "quickstart_teacher"
logger = logging.getLogger("apex_dist.quickstart")

# Image side of the demo: the synthetic evaluator works from 32 px (docs/data.md).
RESOLUTION = 32
# Words of the synthetic dataset's captions, added to the tiny tokenizer's training text so
# that each colour, shape, count and relation is one token.
CAPTION_VOCABULARY = (
    "a two three red green blue yellow purple circle circles square squares triangle "
    "triangles left of right of above below",
)
# Seed of the evaluation noise (any fixed value; distinct from the training seeds).
EVALUATION_SEED = 1234
# The three samplers of the table: (name, teacher?, steps or NFE).
SAMPLERS = (
    ("teacher 50 steps", True, 50),
    ("teacher 1 step", True, 1),
    ("student 1 NFE", False, 1),
)


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
    evaluation_count: int
    processes: int
    train_teacher: bool = False
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
        str(settings.out / "data" / "encoded" / f"shapes-{index:06d}.tar")
        for index in range(settings.shards)
    ]


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


def stage_data(settings: Settings) -> dict:
    from apex_dist.data.synthetic import write_synthetic_shards
    from apex_dist.models.tiny import write_text_snapshot
    from apex_tools.encode_prompts import encode_shards

    data = settings.out / "data"
    encoded = data / "encoded"
    if all(Path(url).is_file() for url in encoded_urls(settings)):
        return {"skipped": True}
    snapshot = settings.out / "text_snapshot"
    if not (snapshot / "tokenizer").is_dir():
        temporary = snapshot.with_name(f".{snapshot.name}.partial")
        shutil.rmtree(temporary, ignore_errors=True)
        write_text_snapshot(temporary, seed=0, extra_sentences=CAPTION_VOCABULARY)
        temporary.replace(snapshot)
    if not (data / "index.json").is_file():
        write_synthetic_shards(
            data / "shapes",
            count=settings.scenes,
            resolution=RESOLUTION,
            samples_per_shard=-(-settings.scenes // settings.shards),
        )
    spec = quickstart_spec()
    text_encoder = spec.text_encoder(snapshot, torch.bfloat16, "cpu", max_length=32)
    codec = spec.image_codec(None, torch.float32, "cpu")  # the pixel codec: no snapshot
    sources = sorted(str(path) for path in data.glob("shapes-*.tar"))
    summary = encode_shards(
        sources, encoded, text_encoder, codec, batch_size=64, resolution=RESOLUTION
    )
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
    overrides = [
        *common_overrides(settings),
        "method.objective=fm",
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
    overrides = [
        *common_overrides(settings),
        f"model.pretrained={settings.teacher_model}",
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


def stage_evaluate(settings: Settings) -> dict:
    from apex_dist.data import evaluate_images
    from apex_dist.distributed.engine import VelocityModelAdapter
    from apex_dist.method import sample, sample_euler

    student_model = settings.out / "student_model"
    if not student_model.is_dir():
        export_model(settings.out / "student", student_model)
    batch = evaluation_batch(settings)
    codec = quickstart_spec().image_codec(None, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(EVALUATION_SEED)
    noise = torch.randn(batch["latents"].shape, generator=generator)
    models = {True: load_snapshot(settings.teacher_model), False: load_snapshot(student_model)}
    grids = settings.out / "grids"
    rows, images = [], {"data": codec.decode(batch["latents"], batch["image_shape"])}
    data_score = evaluate_images(images["data"], batch["specs"])
    for name, is_teacher, steps in SAMPLERS:
        adapter = VelocityModelAdapter(models[is_teacher], torch.float32)
        conditions = (batch["text"], batch["text_mask"])
        shape = batch["image_shape"]
        started = time.perf_counter()
        if is_teacher:
            packed = sample_euler(adapter, noise, *conditions, steps=steps, image_shape=shape)
        else:
            packed = sample(adapter, noise, *conditions, nfe=steps, image_shape=shape)
        seconds = time.perf_counter() - started
        pictures = codec.decode(packed, batch["image_shape"])
        images[name] = pictures
        score = evaluate_images(pictures, batch["specs"])
        write_image_grid([pictures], grids / f"{name.replace(' ', '_')}.png")
        rows.append(
            {
                "sampler": name,
                "score": score.mean,
                "accuracy": score.accuracy,
                "seconds": round(seconds, 2),
            }
        )
    write_image_grid(list(images.values()), grids / "comparison.png")
    scores = {row["sampler"]: row["score"] for row in rows}
    results = {
        "student_beats_teacher_one_step": scores["student 1 NFE"] > scores["teacher 1 step"],
        "evaluated_images": len(batch["specs"]),
        "data_score": data_score.mean,
        "rows": rows,
        "grids": sorted(str(path) for path in grids.glob("*.png")),
    }
    (settings.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    lines = [
        f"synthetic evaluator on {results['evaluated_images']} training prompts "
        f"(dataset images score {results['data_score']:.3f})",
        "| sampler | score (mean of checks) | all checks passed |",
        "|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['sampler']} | {row['score']:.3f} | {row['accuracy']:.3f} |")
    verdict = "beats" if results["student_beats_teacher_one_step"] else "does NOT beat"
    lines.append(f"the student at 1 NFE {verdict} the teacher at 1 step")
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
    parser.add_argument("--scenes", type=int, default=128, help="distinct synthetic scenes")
    parser.add_argument("--shards", type=int, default=2, help="shards the scenes are split into")
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
    parser.add_argument("--evaluation-count", type=int, default=64, help="prompts evaluated")
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
        evaluation_count=arguments.evaluation_count,
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
