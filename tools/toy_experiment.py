"""APEX on a conditional 2-D toy problem: teacher, students, and a table of distances.

Eight classes, each a differently shaped distribution placed on a circle. A small MLP velocity
model (apex_dist.models.ToyVelocityModel, the same interface as the 20B MMDiT; its class
embedding plays the text) is pretrained with `fm` as the teacher. Students start from the
teacher's weights and are distilled with `apex` (both correction signs), `apex_v0` (with data,
and data-free from a frozen teacher) and `fm` as a control. Each is scored, over several seeds,
by the sliced Wasserstein distance to the true class-conditional distributions and by the
fraction of samples landing in their own class's region, for the teacher at 50 and 1 Euler
steps and each student at 1 and 2 NFE.

    python tools/toy_experiment.py --out runs/toy    # full table (timings: docs/toy_experiment.md)
    python tools/toy_experiment.py --quick           # the shortened run of the tests
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apex_dist.config import Config, apply_overrides, from_dict, to_dict
from apex_dist.data.toy import (
    NUM_CLASSES,
    POOL_SIZE,
    DataPool,
    class_centers,
    class_embeddings,
    sample_data,
)
from apex_dist.method import build_objective, build_reference, sample, sample_euler
from apex_dist.models import build_model

SLICED_PROJECTIONS = 256
# Fraction of teacher batches trained on the negative prompt (what classifier-free guidance needs).
TEACHER_TEXT_DROPOUT = 0.1


def sliced_wasserstein(first: torch.Tensor, second: torch.Tensor, generator) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets."""
    directions = torch.randn(2, SLICED_PROJECTIONS, generator=generator)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_first = (first @ directions).sort(dim=0).values
    projected_second = (second @ directions).sort(dim=0).values
    return float((projected_first - projected_second).square().mean().sqrt())


def evaluate(
    points: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, generator
) -> dict:
    """Mean per-class sliced Wasserstein distance and fraction in the own class's region."""
    distances = []
    for label in range(NUM_CLASSES):
        chosen = labels == label
        distances.append(sliced_wasserstein(points[chosen], reference[chosen], generator))
    nearest = torch.cdist(points, class_centers()).argmin(dim=1)
    return {
        "distance": statistics.fmean(distances),
        "in_region": float((nearest == labels).float().mean()),
    }


@dataclass
class Settings:
    teacher_steps: int
    teacher_batch_size: int
    teacher_lr: float
    student_steps: int
    student_batch_size: int
    student_lr: float
    samples_per_class: int


FULL = Settings(
    teacher_steps=2500,
    teacher_batch_size=256,
    teacher_lr=1e-3,
    student_steps=800,
    student_batch_size=128,
    student_lr=2e-4,
    samples_per_class=1000,
)
QUICK = Settings(
    teacher_steps=1500,
    teacher_batch_size=128,
    teacher_lr=1e-3,
    student_steps=300,
    student_batch_size=128,
    student_lr=2e-4,
    samples_per_class=300,
)

# The base configuration of every toy run, and each student's overrides of it.
BASE_OVERRIDES = [
    "model.preset=toy-mlp",
    "model.toy.hidden_size=128",
    "model.toy.num_blocks=3",
    "method.loss.kind=l2",
    "method.guidance.ratio=0",
    "train.micro_batch_size=256",
]
STUDENTS = {
    "fm": ["method.objective=fm"],
    "apex toward_fake": ["method.objective=apex", "method.apex.correction=toward_fake"],
    "apex away_from_fake": ["method.objective=apex", "method.apex.correction=away_from_fake"],
    "apex generator-reading": [
        "method.objective=apex",
        "method.apex.fake_source=noise",
        "method.apex.correction=away_from_fake",
        "method.apex.target_time=t",
        "method.apex.detach_fake=true",
    ],
    "apex_v0": ["method.objective=apex_v0"],
    "apex_v0 data-free": [
        "method.objective=apex_v0",
        "method.apex_v0.data_free=true",
        "method.reference.mode=frozen_base",
    ],
}
# The table of `make toy` and docs/toy_experiment.md: the students (fm control, apex
# with both correction signs, apex_v0) and data-free apex_v0. The generator reading of apex is
# a separate run (`--students "apex generator-reading"`) to keep the table within 5 minutes.
DEFAULT_STUDENTS = [name for name in STUDENTS if name != "apex generator-reading"]


def build_config(overrides: list[str], batch_size: int) -> Config:
    data = apply_overrides(
        {}, [*BASE_OVERRIDES, f"train.micro_batch_size={batch_size}", *overrides]
    )
    return from_dict(Config, data, source="toy experiment")


def train(model, config: Config, pool: DataPool, steps: int, lr: float, seed: int, dropout=0.0):
    """Train `model` in place with the configured objective; returns the final loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    objective = build_objective(config.method)
    reference = build_reference(
        config.method.reference.mode, model, config.method.reference.ema_decay
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    loss = torch.zeros(())
    for _ in range(steps):
        batch = pool.batch(config.train.micro_batch_size, generator, dropout)
        loss, _ = objective(model, batch, reference)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
        optimizer.step()
        if reference is not None:
            reference.update(model)
    return float(loss.detach())


def score_samplers(model, samplers: dict, settings: Settings, seed: int) -> dict:
    """Evaluate each named sampler on the same labels and noise against fresh true samples."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.samples_per_class)
    reference = sample_data(labels, generator)
    embeddings = class_embeddings()
    text = embeddings[labels]
    mask = torch.ones(labels.shape[0], 1, dtype=torch.bool)
    noise = torch.randn(labels.shape[0], 2, generator=generator)
    results = {}
    model.eval()
    for name, run in samplers.items():
        points = run(model, noise, text, mask)
        results[name] = evaluate(points, labels, reference, generator)
    model.train()
    return results


def teacher_samplers() -> dict:
    return {
        "teacher 50 steps": lambda m, z, c, k: sample_euler(m, z, c, k, steps=50),
        "teacher 1 step": lambda m, z, c, k: sample_euler(m, z, c, k, steps=1),
    }


def student_samplers(name: str) -> dict:
    return {
        f"{name} 1 NFE": lambda m, z, c, k: sample(m, z, c, k, nfe=1),
        f"{name} 2 NFE": lambda m, z, c, k: sample(m, z, c, k, nfe=2),
    }


def train_teacher(seed: int, settings: Settings, threads: int = 0) -> tuple[dict, dict]:
    """Pretrain one seed's teacher with `fm`; returns (its state dict, its scores)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pool = DataPool(POOL_SIZE, torch.Generator().manual_seed(seed))
    config = build_config(["method.objective=fm"], settings.teacher_batch_size)
    teacher = build_model(config)
    started = time.perf_counter()
    train(
        teacher,
        config,
        pool,
        settings.teacher_steps,
        settings.teacher_lr,
        seed,
        dropout=TEACHER_TEXT_DROPOUT,
    )
    log(f"seed {seed}: teacher trained in {time.perf_counter() - started:.1f}s")
    return teacher.state_dict(), score_samplers(teacher, teacher_samplers(), settings, seed)


def train_student(
    seed: int, name: str, teacher_state: dict, settings: Settings, threads: int = 0
) -> dict:
    """Distil one student from the seed's teacher; returns its scores at 1 and 2 NFE."""
    if threads:
        torch.set_num_threads(threads)
    pool = DataPool(POOL_SIZE, torch.Generator().manual_seed(seed))
    config = build_config(STUDENTS[name], settings.student_batch_size)
    student = build_model(config)
    student.load_state_dict(teacher_state)
    started = time.perf_counter()
    train(student, config, pool, settings.student_steps, settings.student_lr, seed + 100)
    results = score_samplers(student, student_samplers(name), settings, seed)
    log(
        f"seed {seed}: {name} trained in {time.perf_counter() - started:.1f}s, 1 NFE distance "
        f"{results[f'{name} 1 NFE']['distance']:.4f}"
    )
    return results


def run_seeds(seeds: int, settings: Settings, students: list[str], workers: int) -> list[dict]:
    """Every seed's teacher, then its students, as jobs over `workers` processes of one thread
    each (in this process when workers is 1); returns one result dict a seed."""
    if workers <= 1:
        teachers = [train_teacher(seed, settings) for seed in range(seeds)]
        results = [dict(scores) for _, scores in teachers]
        for seed, name in itertools.product(range(seeds), students):
            results[seed].update(train_student(seed, name, teachers[seed][0], settings))
        return results
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as processes:
        teacher_jobs = [
            processes.apply_async(train_teacher, (seed, settings, 1)) for seed in range(seeds)
        ]
        # A seed's students are queued as soon as its teacher is done, so no worker waits
        # for the last teacher while others could already distil.
        results, student_jobs = [], []
        for seed, teacher_job in enumerate(teacher_jobs):
            teacher_state, scores = teacher_job.get()
            results.append(dict(scores))
            student_jobs += [
                (
                    seed,
                    processes.apply_async(train_student, (seed, name, teacher_state, settings, 1)),
                )
                for name in students
            ]
        for seed, job in student_jobs:
            results[seed].update(job.get())
    return results


def summarise(per_seed: list[dict]) -> dict:
    """{row: {metric: (mean, standard deviation)}} over seeds."""
    summary = {}
    for row in per_seed[0]:
        summary[row] = {}
        for metric in per_seed[0][row]:
            values = [result[row][metric] for result in per_seed]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[row][metric] = (statistics.fmean(values), spread)
    return summary


def format_table(summary: dict, seeds: int) -> str:
    teacher_50 = summary["teacher 50 steps"]["distance"][0]
    lines = [
        f"| sampler | sliced W2 distance (mean ± sd, {seeds} seeds) | / teacher 50 steps "
        "| in own class region |",
        "|---|---|---|---|",
    ]
    for row, metrics in summary.items():
        distance, distance_sd = metrics["distance"]
        region, region_sd = metrics["in_region"]
        lines.append(
            f"| {row} | {distance:.4f} ± {distance_sd:.4f} | {distance / teacher_50:.2f}x "
            f"| {region:.3f} ± {region_sd:.3f} |"
        )
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="number of seeds (teacher and students)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes running seeds in parallel, one thread each (default: the core count)",
    )
    parser.add_argument("--quick", action="store_true", help="short schedule (the test suite's)")
    parser.add_argument(
        "--students",
        nargs="+",
        default=DEFAULT_STUDENTS,
        choices=list(STUDENTS),
        metavar="NAME",
        help=f"students to distil (default: {', '.join(DEFAULT_STUDENTS)}; all: "
        f"{', '.join(STUDENTS)})",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for table.md and results.json"
    )
    arguments = parser.parse_args(argv)
    if arguments.seeds < 1:
        parser.error("--seeds must be >= 1")
    settings = QUICK if arguments.quick else FULL
    started = time.perf_counter()
    workers = min(arguments.workers, arguments.seeds * max(1, len(arguments.students)))
    per_seed = run_seeds(arguments.seeds, settings, arguments.students, workers)
    summary = summarise(per_seed)
    table = format_table(summary, arguments.seeds)
    elapsed = time.perf_counter() - started
    print(table)
    print(f"\n{arguments.seeds} seed(s), {elapsed:.0f} s")
    if arguments.out is not None:
        arguments.out.mkdir(parents=True, exist_ok=True)
        (arguments.out / "table.md").write_text(table + "\n")
        record = {
            "settings": settings.__dict__,
            "seeds": arguments.seeds,
            "seconds": elapsed,
            "summary": summary,
            "per_seed": per_seed,
            "student_configs": {
                name: to_dict(build_config(STUDENTS[name], settings.student_batch_size).method)
                for name in arguments.students
            },
        }
        (arguments.out / "results.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
