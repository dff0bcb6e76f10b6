"""The paper's headline in miniature: one-step students against their 50-step teacher with CFG.

    apex-benchmark-method --out runs/benchmark            # the full benchmark (docs/results.md)
    apex-benchmark-method --out runs/benchmark_quick --quick

On the compositional benchmark (`apex_dist.data.benchmark`: GenEval's six tasks on synthetic
shapes, scored exactly, on compositions held out of training) it:

1. data: writes the train split's shards at 32 px, the quickstart's tiny text encoder (the
   same tokenizer and weights, so the shipped teacher's text features mean what they meant in
   its training; every template word but "four" is one token), and the precomputed shards the
   training reads (`tools/encode_prompts.encode_shards`: text features and pixels packed by the
   `qwen-image-pixels-tiny` preset's codec); the snapshot the runs load (`model.pretrained`)
   holds that text encoder and, as the teacher's starting weights, the quickstart's shipped
   teacher (docs/quickstart.md);
2. teacher: `fm` with 10% of the rows on the negative prompt (for classifier-free guidance);
   kept in OUT/teacher_state.pt, loaded when it exists;
3. guidance: the teacher at 50 Euler steps with each CFG scale of a small sweep, scored on
   train-split prompts (never the held-out ones); the best scale is the teacher's row;
4. sweep: `apex_v0` settings (loss kind, distribution-matching weight, guidance ratio) for one
   seed each, scored on train-split prompts; the best is the variant `apex_v0 tuned`;
5. students (`fm`, `apex_v0 defaults`, `apex_v0 tuned`, `apex paper_form`): each for every
   seed, from the teacher's weights, scored on the held-out
   prompts at 1, 2 and 4 NFE (and at 1 NFE every `--curve-every` steps for the curves);
6. report: OUT/results.json, OUT/results.md (also written to --results, docs/results.md for
   the full run), OUT/curves.png (held-out score at 1 NFE against training step, per variant)
   and OUT/grids/*.png (the same held-out prompts and noise for each sampler).

Every run is one `apex_dist.trainer.Trainer` run in this process (one rank, ZeRO-2), the loop
of real training: the WebDataset stream of precomputed shards, the engine, AdamW, clipping.
Each finished sweep run and student is kept as JSON under OUT/sweep and OUT/students (and the
teacher as OUT/teacher_state.pt), so running the same command again continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TEACHER = ROOT / "assets" / "quickstart_teacher"
RESOLUTION = 32
PRESET = "qwen-image-pixels-tiny"
TEXT_MAX_LENGTH = 32
# Fraction of the teacher's rows trained on the negative prompt (what CFG needs).
TEACHER_TEXT_DROPOUT = 0.1
# A student's train.seed is this plus its seed number (the teacher's is 0).
STUDENT_SEED_OFFSET = 100
# Seeds of the evaluation noise: one per teacher repetition; students use the first.
EVALUATION_SEEDS = (1234, 1235, 1236)
STUDENT_NFES = (1, 2, 4)
logger = logging.getLogger("apex_dist.benchmark")

# Overrides shared by every run (the variants add theirs after these).
BASE_OVERRIDES = [
    f"model.preset={PRESET}",
    "model.dtype=fp32",
    f"model.text_max_length={TEXT_MAX_LENGTH}",
    "data.kind=webdataset",
    "data.sample_kind=precomputed",
    "data.shuffle_buffer=256",
    "optimizer.betas=[0.9, 0.99]",
    "optimizer.grad_clip=1.0",
    "parallel.zero_stage=2",
    "checkpoint.every_steps=0",
    "checkpoint.keep_last=1",
    "checkpoint.save_on_signal=false",
    "logging.wandb=disabled",
]
# The students. `apex_v0 defaults` takes every method setting from the config schema;
# `apex_v0 tuned` is filled in by the sweep.
VARIANTS = {
    "fm": ["method.objective=fm"],
    "apex_v0 defaults": ["method.objective=apex_v0"],
}
# The paper-form reading of `apex` (method.md, "A second reading"); its lam ramps over the
# whole run (`method.apex.mix_ramp_steps` is set to the student's steps).
PAPER_FORM = [
    "method.objective=apex",
    "method.apex.reading=paper_form",
    "method.apex.mix_time_weight=t_times_one_minus_t",
    "method.condition_shift.learnable=true",
    "method.loss.kind=l2",
]
LEARNABLE_SHIFT = "method.condition_shift.learnable=true"
# The apex_v0 sweep (one seed each): loss kind, distribution-matching weight (0.125 is 0.5
# normalised over all rows instead of the e2e quarter) and the guidance ratio.
SWEEP = {
    "l2, dm 0.5, w 0": ["method.loss.kind=l2", "method.guidance.ratio=0"],
    "l2, dm 0.125, w 0": [
        "method.loss.kind=l2",
        "method.guidance.ratio=0",
        "method.apex_v0.distribution_matching_weight=0.125",
    ],
    "l2, dm 0, w 0": [
        "method.loss.kind=l2",
        "method.guidance.ratio=0",
        "method.apex_v0.distribution_matching_weight=0",
    ],
    "l2, dm 0.125, w 0.5": [
        "method.loss.kind=l2",
        "method.guidance.ratio=0.5",
        "method.apex_v0.distribution_matching_weight=0.125",
    ],
    "robust, dm 0.125, w 0": [
        "method.loss.kind=robust",
        "method.guidance.ratio=0",
        "method.apex_v0.distribution_matching_weight=0.125",
    ],
    "robust, dm 0.5, w 0.8": ["method.loss.kind=robust"],
}


@dataclass
class Settings:
    """Sizes of one benchmark run (FULL, QUICK, or the tests' tiny one)."""

    scenes: int
    shards: int
    teacher_steps: int
    teacher_lr: float
    student_steps: int
    student_lr: float
    sweep_steps: int
    micro_batch_size: int
    seeds: int
    per_task: int
    curve_every: int
    guidance_scales: tuple[float, ...]
    sweep: tuple[str, ...]
    teacher_sampling_steps: int = 50


FULL = Settings(
    scenes=16384,
    shards=4,
    teacher_steps=4000,
    teacher_lr=1e-3,
    student_steps=300,
    student_lr=3e-4,
    sweep_steps=120,
    micro_batch_size=32,
    seeds=3,
    per_task=24,
    curve_every=50,
    guidance_scales=(1.0, 2.0, 3.0, 4.5),
    sweep=tuple(SWEEP),
)
QUICK = dataclasses.replace(
    FULL,
    scenes=2048,
    shards=2,
    teacher_steps=300,
    student_steps=60,
    sweep_steps=30,
    seeds=2,
    per_task=8,
    curve_every=20,
    guidance_scales=(1.0, 3.0),
    sweep=("l2, dm 0.5, w 0", "l2, dm 0.125, w 0"),
)


# ---- setup --------------------------------------------------------------------------------


def start_process_group(threads: int) -> None:
    """One rank on the CPU in this process, shared by every run."""
    from apex_dist.distributed.runtime import _free_port, init_distributed

    torch.set_num_threads(threads)
    os.environ.update(
        {
            "CUDA_VISIBLE_DEVICES": "",
            "DS_ACCELERATOR": "cpu",
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": str(threads),
        }
    )
    init_distributed()
    for name in ("apex_dist", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def model_spec():
    from apex_dist.models.spec import model_spec as spec_of

    return spec_of(PRESET)


def encoded_urls(out: Path) -> list[str]:
    return sorted(str(path) for path in (out / "data" / "encoded").glob("bench-*.tar"))


def stage_data(out: Path, settings: Settings) -> dict:
    """Train-split shards, the text snapshot, and the precomputed shards (skipped when done)."""
    from apex_dist.data.benchmark import write_benchmark_shards
    from apex_dist.models.tiny import write_text_snapshot
    from apex_tools.encode_prompts import encode_shards
    from apex_tools.quickstart import CAPTION_VOCABULARY

    data, snapshot = out / "data", out / "snapshot"
    if (data / "encoded" / "done").is_file():
        return {"skipped": True}
    if not (snapshot / "transformer").is_dir():
        shutil.rmtree(snapshot, ignore_errors=True)
        write_text_snapshot(snapshot, seed=0, extra_sentences=CAPTION_VOCABULARY)
        shutil.copytree(SHIPPED_TEACHER / "transformer", snapshot / "transformer")
    shutil.rmtree(data, ignore_errors=True)
    write_benchmark_shards(
        data / "bench",
        count=settings.scenes,
        resolution=RESOLUTION,
        samples_per_shard=-(-settings.scenes // settings.shards),
    )
    encoder = model_spec().text_encoder(snapshot, torch.float32, "cpu", TEXT_MAX_LENGTH)
    codec = model_spec().image_codec(None, torch.float32, "cpu")
    sources = sorted(str(path) for path in data.glob("bench-*.tar"))
    summary = encode_shards(
        sources, data / "encoded", encoder, codec, batch_size=64, resolution=RESOLUTION
    )
    (data / "encoded" / "done").write_text(json.dumps(summary))
    return {"skipped": False, **summary}


def build_config(
    out: Path,
    settings: Settings,
    overrides: list[str],
    steps: int,
    lr: float,
    seed: int,
    run_name: str,
    dropout: float = 0.0,
):
    from apex_dist.config import Config, apply_overrides, from_dict

    data = apply_overrides(
        {},
        [
            *BASE_OVERRIDES,
            f"model.pretrained={out / 'snapshot'}",
            f"data.urls={json.dumps(encoded_urls(out))}",
            f"data.epoch_samples={settings.scenes}",
            f"data.text_dropout={dropout}",
            f"train.micro_batch_size={settings.micro_batch_size}",
            f"train.steps={steps}",
            f"train.seed={seed}",
            f"train.output_dir={out / 'runs' / run_name}",
            f"optimizer.lr={lr}",
            f"logging.every_steps={max(1, steps)}",
            f"logging.sample_every_steps={settings.curve_every}",
            *overrides,
        ],
    )
    return from_dict(Config, data, source="benchmark")


# ---- evaluation ---------------------------------------------------------------------------


class Prompts:
    """Encoded evaluation prompts of one split, the negative prompt, and the noise."""

    def __init__(self, out: Path, split: str, per_task: int):
        from apex_dist.data.benchmark import evaluation_specs

        self.specs = evaluation_specs(split, per_task)
        encoder = model_spec().text_encoder(out / "snapshot", torch.float32, "cpu", TEXT_MAX_LENGTH)
        self.text, self.text_mask = encoder.encode([spec["caption"] for spec in self.specs])
        self.neg_text, self.neg_text_mask = encoder.negative("Generate an image.")
        self.codec = model_spec().image_codec(None, torch.float32, "cpu")
        blank, image_shape = self.codec.encode(torch.zeros(1, 3, RESOLUTION, RESOLUTION))
        self.image_shape = tuple(int(size) for size in image_shape)
        self.noise = {
            seed: torch.randn(
                (len(self.specs), *blank.shape[1:]), generator=torch.Generator().manual_seed(seed)
            )
            for seed in EVALUATION_SEEDS
        }

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(packed, self.image_shape)


@torch.no_grad()
def run_sampler(
    model,
    prompts: Prompts,
    kind: str,
    amount: int,
    guidance: float = 1.0,
    seed: int = EVALUATION_SEEDS[0],
) -> torch.Tensor:
    """Decoded images (B, 3, H, W) of the teacher's Euler sampler or the student's sampler."""
    from apex_dist.distributed.engine import VelocityModelAdapter
    from apex_dist.method import sample, sample_euler

    adapter = VelocityModelAdapter(model, torch.float32)
    noise = prompts.noise[seed]
    was_training = model.training
    model.eval()
    try:
        if kind == "teacher":
            packed = sample_euler(
                adapter,
                noise,
                prompts.text,
                prompts.text_mask,
                steps=amount,
                guidance_scale=guidance,
                neg_text=prompts.neg_text,
                neg_text_mask=prompts.neg_text_mask,
                image_shape=prompts.image_shape,
            )
        else:
            packed = sample(
                adapter,
                noise,
                prompts.text,
                prompts.text_mask,
                nfe=amount,
                image_shape=prompts.image_shape,
            )
    finally:
        model.train(was_training)
    return prompts.decode(packed)


def score(images: torch.Tensor, prompts: Prompts) -> dict:
    from apex_dist.data.benchmark import score_benchmark

    result = score_benchmark(images, prompts.specs)
    return {"overall": result.overall, **result.per_task}


class Curve:
    """Stands in for the trainer's validation grid: at every `logging.sample_every_steps` (and
    step 0) it scores the student at 1 NFE on the held-out prompts."""

    def __init__(self, trainer, prompts: Prompts):
        self.trainer, self.prompts, self.points = trainer, prompts, []

    def write(self, step: int) -> None:
        images = run_sampler(self.trainer.engine.module, self.prompts, "student", 1)
        self.points.append((step, score(images, self.prompts)["overall"]))


def train(config, initial_state=None, curve_prompts: Prompts | None = None):
    """One Trainer run; returns (its module, the curve's points, seconds)."""
    from apex_dist.distributed.runtime import init_distributed
    from apex_dist.trainer import Trainer

    shutil.rmtree(config.train.output_dir, ignore_errors=True)
    started = time.perf_counter()
    trainer = Trainer(config, init_distributed(), initial_state=initial_state)
    curve = Curve(trainer, curve_prompts) if curve_prompts is not None else None
    if curve is not None:
        trainer.validation = curve
    summary = trainer.train()
    trainer.close()
    losses = [entry["loss"] for entry in summary.history if entry["loss"] is not None]
    if not losses or not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"{config.train.output_dir}: non-finite or missing losses")
    return trainer.engine.module, (curve.points if curve else []), time.perf_counter() - started


def state_of(module) -> dict:
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


# ---- stages -------------------------------------------------------------------------------


def stage_teacher(out: Path, settings: Settings) -> tuple[dict, dict]:
    path = out / "teacher_state.pt"
    if path.is_file():
        record = torch.load(path, weights_only=True)
        return record["state"], {"skipped": True, "seconds": record["seconds"]}
    config = build_config(
        out,
        settings,
        ["method.objective=fm", "logging.sample_every_steps=0"],
        settings.teacher_steps,
        settings.teacher_lr,
        0,
        "teacher",
        TEACHER_TEXT_DROPOUT,
    )
    module, _, seconds = train(config)
    state = state_of(module)
    torch.save({"state": state, "seconds": seconds}, path)
    log(f"teacher: {settings.teacher_steps} fm steps in {seconds:.0f} s")
    return state, {"skipped": False, "seconds": seconds}


def build_teacher(out: Path, state: dict):
    """A module of the preset loaded with the teacher's weights (for sampling)."""
    spec = model_spec()
    with torch.device("cpu"):
        model = spec.build(spec.snapshot_architecture(out / "snapshot"))
    model.load_state_dict(state)
    return model.eval()


def stage_guidance(teacher, settings: Settings, validation: Prompts) -> dict:
    """Score of the teacher at 50 steps per CFG scale on train-split prompts; the best."""
    scores = {}
    for scale in settings.guidance_scales:
        images = run_sampler(
            teacher, validation, "teacher", settings.teacher_sampling_steps, guidance=scale
        )
        scores[scale] = score(images, validation)["overall"]
        log(f"teacher 50 steps, CFG {scale}: train-split score {scores[scale]:.3f}")
    best = max(scores, key=lambda scale: (scores[scale], -scale))
    return {"scores": {str(scale): value for scale, value in scores.items()}, "best": best}


def stage_sweep(out: Path, settings: Settings, teacher_state: dict, validation: Prompts) -> dict:
    scores = {}
    for name in settings.sweep:
        cached = out / "sweep" / f"{slug(name)}.json"
        if cached.is_file():
            scores[name] = json.loads(cached.read_text())["score"]
            continue
        config = build_config(
            out,
            settings,
            ["method.objective=apex_v0", "logging.sample_every_steps=0", *SWEEP[name]],
            settings.sweep_steps,
            settings.student_lr,
            STUDENT_SEED_OFFSET,
            "sweep_" + slug(name),
        )
        module, _, seconds = train(config, teacher_state)
        images = run_sampler(module, validation, "student", 1)
        scores[name] = score(images, validation)["overall"]
        write_json(cached, {"score": scores[name], "seconds": seconds})
        log(f"sweep {name}: train-split score at 1 NFE {scores[name]:.3f} ({seconds:.0f} s)")
    best = max(scores, key=scores.get)
    return {"scores": scores, "best": best, "overrides": SWEEP[best]}


def stage_students(
    out: Path, settings: Settings, teacher_state: dict, variants: dict, held_out: Prompts
) -> dict:
    results = {}
    for name, overrides in variants.items():
        per_seed = []
        for seed in range(settings.seeds):
            cached = out / "students" / f"{slug(name)}_seed{seed}.json"
            if cached.is_file():
                per_seed.append(json.loads(cached.read_text()))
                continue
            config = build_config(
                out,
                settings,
                overrides,
                settings.student_steps,
                settings.student_lr,
                STUDENT_SEED_OFFSET + seed,
                f"{slug(name)}_seed{seed}",
            )
            start = shift_as_learnable(teacher_state) if LEARNABLE_SHIFT in overrides else None
            start = start or teacher_state
            before = state_of_subset(start)
            module, curve, seconds = train(config, start, curve_prompts=held_out)
            changed = weights_changed(before, module)
            row = {"seconds": seconds, "curve": curve, "weights_changed": changed}
            for nfe in STUDENT_NFES:
                images = run_sampler(module, held_out, "student", nfe)
                row[f"{nfe} NFE"] = score(images, held_out)
                if seed == 0:
                    save_grid(images, out / "grids" / f"{slug(name)}_{nfe}_NFE.png")
            per_seed.append(row)
            write_json(cached, row)
            log(
                f"{name} seed {seed}: 1 NFE held-out {row['1 NFE']['overall']:.3f} "
                f"({seconds:.0f} s)"
            )
        results[name] = per_seed
    return results


def shift_as_learnable(state: dict) -> dict:
    """The teacher's state for a student with a learnable shift: a and b (the same config
    values) as the one-element parameters that model holds instead of 0-dim buffers."""
    return {
        name: value.reshape(1) if name.startswith("condition_shift.") else value
        for name, value in state.items()
    }


def write_json(path: Path, value) -> None:
    """`value` as JSON at `path` (a finished run's result, read back when the tool reruns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str))


def state_of_subset(state: dict) -> dict:
    return {name: value.clone() for name, value in state.items() if value.is_floating_point()}


def weights_changed(before: dict, module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[name], after[name].cpu()) for name in before)


def teacher_rows(
    teacher, held_out: Prompts, guidance: float, out: Path, settings: Settings
) -> dict:
    """The teacher at 50 steps with the chosen CFG scale and at 1 step, each over every
    evaluation noise seed."""
    rows = {}
    for name, steps, scale in (
        (
            f"teacher {settings.teacher_sampling_steps} steps, CFG {guidance:g}",
            settings.teacher_sampling_steps,
            guidance,
        ),
        ("teacher 1 step", 1, 1.0),
    ):
        rows[name] = []
        for seed in EVALUATION_SEEDS:
            images = run_sampler(teacher, held_out, "teacher", steps, scale, seed)
            rows[name].append({"samples": score(images, held_out)})
            if seed == EVALUATION_SEEDS[0]:
                save_grid(images, out / "grids" / f"teacher_{steps}_steps.png")
    return rows


# ---- report -------------------------------------------------------------------------------


def slug(name: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in name).strip("_")


def save_grid(images: torch.Tensor, path: Path) -> None:
    from apex_tools.quickstart import write_image_grid

    write_image_grid([images], path, per_row=16)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(teacher: dict, students: dict) -> tuple[list[str], list[list]]:
    """Rows (sampler, overall and per task as (mean, sd)) of the results table."""
    from apex_dist.data.benchmark import TASKS

    columns = ["overall", *TASKS]
    rows = []
    for name, repetitions in teacher.items():
        scores = [repetition["samples"] for repetition in repetitions]
        rows.append([name, *[mean_sd([s[c] for s in scores]) for c in columns]])
    for name, per_seed in students.items():
        for nfe in STUDENT_NFES:
            scores = [row[f"{nfe} NFE"] for row in per_seed]
            rows.append([f"{name}, {nfe} NFE", *[mean_sd([s[c] for s in scores]) for c in columns]])
    return columns, rows


def format_markdown(record: dict) -> str:
    columns, rows = summary_table(record["teacher"], record["students"])
    lines = [
        "| sampler | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, *cells in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells) + " |")
    return "\n".join(lines)


def plot_curves(students: dict, path: Path) -> None:
    """Held-out score at 1 NFE against training step, mean over seeds, one line per variant."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 420, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    lines = {}
    for name, per_seed in students.items():
        steps = [step for step, _ in per_seed[0]["curve"]]
        if steps:
            values = [
                statistics.fmean(row["curve"][i][1] for row in per_seed) for i in range(len(steps))
            ]
            lines[name] = (steps, values)
    last = max((steps[-1] for steps, _ in lines.values()), default=1) or 1
    top = max((max(values) for _, values in lines.values()), default=1.0)
    top = max(0.1, min(1.0, top * 1.15))

    def at(step, value):
        x = margin + (width - 2 * margin) * step / last
        y = height - margin - (height - 2 * margin) * value / top
        return x, y

    draw.line([at(0, 0), at(last, 0)], fill="black")
    draw.line([at(0, 0), at(0, top)], fill="black")
    for fraction in (0.0, 0.5, 1.0):
        draw.text((4, at(0, top * fraction)[1] - 6), f"{top * fraction:.2f}", fill="black")
        draw.text(
            (at(last * fraction, 0)[0] - 10, height - margin + 6),
            f"{round(last * fraction)}",
            fill="black",
        )
    draw.text(
        (width // 2 - 120, height - 18), "training step (held-out score at 1 NFE)", fill="black"
    )
    for index, (name, (steps, values)) in enumerate(lines.items()):
        colour = palette[index % len(palette)]
        draw.line([at(s, v) for s, v in zip(steps, values, strict=True)], fill=colour, width=2)
        draw.text((margin + 10, 10 + 14 * index), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def write_report(record: dict, out: Path, results_path: Path | None, command: str) -> str:
    table = format_markdown(record)
    guidance = record["guidance"]
    sweep = record.get("sweep")
    text = [
        f"Command: `{command}`",
        "",
        f"Measured in {record['seconds']:.0f} s; held-out prompts: {record['held_out_prompts']} "
        f"({record['settings']['per_task']} per task); students: {record['settings']['seeds']} "
        "seed(s) each, mean ± sd; teacher rows: mean ± sd over "
        f"{len(EVALUATION_SEEDS)} noise seeds.",
        "",
        table,
        "",
        "Teacher CFG sweep (50 steps, train-split prompts): "
        + ", ".join(f"{scale}: {value:.3f}" for scale, value in guidance["scores"].items())
        + f"; chosen {guidance['best']:g}.",
    ]
    if sweep:
        text.append(
            "apex_v0 sweep (1 NFE, train-split prompts, one seed): "
            + ", ".join(f"{name}: {value:.3f}" for name, value in sweep["scores"].items())
            + f"; chosen `{sweep['best']}`."
        )
    markdown = "\n".join(text) + "\n"
    (out / "results.md").write_text(markdown)
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(markdown)
    return markdown


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- main ---------------------------------------------------------------------------------


def run(
    out: Path,
    settings: Settings,
    variants: list[str] | None = None,
    results_path: Path | None = None,
    command: str = "",
) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": dataclasses.asdict(settings), "stages": {}}
    record["stages"]["data"] = stage_data(out, settings)
    teacher_state, record["stages"]["teacher"] = stage_teacher(out, settings)
    teacher = build_teacher(out, teacher_state)
    validation = Prompts(out, "train", settings.per_task)
    held_out = Prompts(out, "held_out", settings.per_task)
    record["held_out_prompts"] = len(held_out.specs)
    record["guidance"] = stage_guidance(teacher, settings, validation)
    chosen = dict(VARIANTS)
    if settings.sweep:
        record["sweep"] = stage_sweep(out, settings, teacher_state, validation)
        chosen["apex_v0 tuned"] = ["method.objective=apex_v0", *record["sweep"]["overrides"]]
    chosen["apex paper_form"] = [
        *PAPER_FORM,
        f"method.apex.mix_ramp_steps={settings.student_steps}",
    ]
    if variants:
        chosen = {name: chosen[name] for name in variants}
    record["variants"] = chosen
    record["teacher"] = teacher_rows(teacher, held_out, record["guidance"]["best"], out, settings)
    record["students"] = stage_students(out, settings, teacher_state, chosen, held_out)
    record["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    plot_curves(record["students"], out / "curves.png")
    print(write_report(record, out, results_path, command))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few minutes instead of an hour")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also write the report here (e.g. docs/results.md)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared CPU, more threads than free cores are far slower)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="student seeds (default: mode's)")
    parser.add_argument("--student-steps", type=int, default=None, help="steps per student")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher fm steps")
    parser.add_argument("--no-sweep", action="store_true", help="skip the apex_v0 sweep")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="students to run (default: fm, apex_v0 defaults, apex_v0 tuned, apex paper_form)",
    )
    arguments = parser.parse_args(argv)
    settings = QUICK if arguments.quick else FULL
    changes = {
        "seeds": arguments.seeds,
        "student_steps": arguments.student_steps,
        "teacher_steps": arguments.teacher_steps,
    }
    settings = dataclasses.replace(
        settings, **{key: value for key, value in changes.items() if value is not None}
    )
    if arguments.no_sweep:
        settings = dataclasses.replace(settings, sweep=())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start_process_group(arguments.threads)
    command = "apex-benchmark-method " + " ".join(argv if argv is not None else sys.argv[1:])
    run(arguments.out.resolve(), settings, arguments.variants, arguments.results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
