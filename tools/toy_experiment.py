"""APEX on a conditional 2-D toy problem: teacher, students, and a table of distances.

Eight classes, each a differently shaped distribution placed on a circle. A small MLP velocity
model (apex_dist.models.ToyVelocityModel, the same interface as the 20B MMDiT; its class
embedding plays the text) is pretrained with `fm` as the teacher. Students start from the
teacher's weights and are distilled with `apex` (both correction signs), `apex_v0` (with data,
and data-free from a frozen teacher) and `fm` as a control. Each is scored, over several seeds,
by the sliced Wasserstein distance to the true class-conditional distributions and by the
fraction of samples landing in their own class's region, for the teacher at 50 and 1 Euler
steps and each student at 1 and 2 NFE.

Every run (teacher or student) is one `apex_dist.trainer.Trainer` run, the loop of real
training: the 2-D toy stream (apex_dist.data.toy, `data.kind: toy`), ZeRO-2 on a process group
of one rank per worker process, on the CPU; a student starts from its teacher's weights
(`initial_state`). The runs' directories (config, final checkpoint) go to OUT/runs.

    python tools/toy_experiment.py --out runs/toy    # full table (timings: docs/toy_experiment.md)
    python tools/toy_experiment.py --quick           # the shortened run of the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apex_dist.config import Config, apply_overrides, from_dict, to_dict
from apex_dist.data.toy import NUM_CLASSES, class_centers, class_embeddings, sample_data
from apex_dist.method import sample, sample_euler

SLICED_PROJECTIONS = 256
# Fraction of teacher batches trained on the negative prompt (what classifier-free guidance needs).
TEACHER_TEXT_DROPOUT = 0.1
# A student's train.seed is its teacher's plus this (its own model noise and data draws).
STUDENT_SEED_OFFSET = 100
# The worker process's rank info (set by `start_worker`, used by every run in that process).
WORKER: dict = {}


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
# The tests' shortened run: a smaller teacher, fewer student steps, fewer scored samples.
QUICK = dataclasses.replace(
    FULL, teacher_steps=1500, teacher_batch_size=128, student_steps=300, samples_per_class=300
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
# How the Trainer runs a toy job: the 2-D toy stream, ZeRO-2 on one rank, nothing written but
# the final checkpoint, no signal handlers in the pool's workers.
RUN_OVERRIDES = [
    "data.kind=toy",
    "parallel.zero_stage=2",
    "checkpoint.every_steps=0",
    "checkpoint.keep_last=1",
    "checkpoint.save_on_signal=false",
    "logging.wandb=disabled",
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


def build_config(
    overrides: list[str],
    batch_size: int,
    steps: int = 1,
    lr: float = 1e-4,
    seed: int = 0,
    output_dir: str = "runs/toy",
    dropout: float = 0.0,
) -> Config:
    """The Trainer's config of one toy run: the 2-D toy stream, ZeRO-2 on one rank, one report
    and one checkpoint at the end."""
    data = apply_overrides(
        {},
        [
            *BASE_OVERRIDES,
            *RUN_OVERRIDES,
            f"train.micro_batch_size={batch_size}",
            f"train.steps={steps}",
            f"train.seed={seed}",
            f"train.output_dir={output_dir}",
            f"optimizer.lr={lr}",
            f"data.text_dropout={dropout}",
            f"logging.every_steps={steps}",
            *overrides,
        ],
    )
    return from_dict(Config, data, source="toy experiment")


def train(config: Config, initial_state: dict | None = None):
    """One run of the Trainer in this worker's process group; returns the closed trainer
    (its module holds the trained weights)."""
    from apex_dist.trainer import Trainer

    trainer = Trainer(config, WORKER["info"], initial_state=initial_state)
    trainer.train()
    trainer.close()
    return trainer


def start_cpu_rank(threads: int):
    """`threads` torch threads and a process group of one CPU rank (a free port of its own) in
    this process, shared by every run in it; the library's per-run log lines silenced (the
    tools print one line per run instead). Returns the rank info."""
    from apex_dist.distributed.runtime import _free_port, init_distributed

    torch.set_num_threads(threads)
    os.environ.update(
        {
            "CUDA_VISIBLE_DEVICES": "",  # CPU runs (their timings are the CPU's)
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
    info = init_distributed()
    for name in ("apex_dist", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return info


def start_worker(threads: int) -> None:
    """Pool initializer: one CPU rank (`start_cpu_rank`) for every run of this worker."""
    WORKER["info"] = start_cpu_rank(threads)


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


def train_teacher(seed: int, settings: Settings, runs: Path) -> tuple[dict, dict]:
    """Pretrain one seed's teacher with `fm`; returns (its state dict, its scores)."""
    config = build_config(
        ["method.objective=fm"],
        settings.teacher_batch_size,
        settings.teacher_steps,
        settings.teacher_lr,
        seed,
        str(runs / f"seed{seed}" / "teacher"),
        TEACHER_TEXT_DROPOUT,
    )
    started = time.perf_counter()
    teacher = train(config).engine.module
    log(f"seed {seed}: teacher trained in {time.perf_counter() - started:.1f}s")
    state = {name: value.detach().cpu().clone() for name, value in teacher.state_dict().items()}
    return state, score_samplers(teacher, teacher_samplers(), settings, seed)


def train_student(
    seed: int, name: str, teacher_state: dict, settings: Settings, runs: Path
) -> dict:
    """Distil one student from the seed's teacher; returns its scores at 1 and 2 NFE."""
    config = build_config(
        STUDENTS[name],
        settings.student_batch_size,
        settings.student_steps,
        settings.student_lr,
        seed + STUDENT_SEED_OFFSET,
        str(runs / f"seed{seed}" / name.replace(" ", "_")),
    )
    started = time.perf_counter()
    student = train(config, initial_state=teacher_state).engine.module
    results = score_samplers(student, student_samplers(name), settings, seed)
    log(
        f"seed {seed}: {name} trained in {time.perf_counter() - started:.1f}s, 1 NFE distance "
        f"{results[f'{name} 1 NFE']['distance']:.4f}"
    )
    return results


def run_seeds(
    seeds: int, settings: Settings, students: list[str], workers: int, runs: Path
) -> list[dict]:
    """Every seed's teacher, then its students, as jobs over `workers` processes of one thread
    and one process group each; returns one result dict a seed."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=start_worker, initargs=(1,)) as processes:
        teacher_jobs = [
            processes.apply_async(train_teacher, (seed, settings, runs)) for seed in range(seeds)
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
                    processes.apply_async(
                        train_student, (seed, name, teacher_state, settings, runs)
                    ),
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
    with tempfile.TemporaryDirectory() as scratch:
        runs = arguments.out / "runs" if arguments.out is not None else Path(scratch)
        per_seed = run_seeds(arguments.seeds, settings, arguments.students, workers, runs)
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
