"""The periodic evaluation during training (apex_dist.evaluation.training).

- 2 gloo ranks, a stub generator (one rank slower) and a stub scorer: shares, equal numbers of
  generation calls, the gather in prompt order, a scoring failure on rank 0 and a missing
  snapshot at start ending both ranks together instead of leaving one in a collective.
- One process with the real student path: a tiny Qwen-Image snapshot (text encoder, transformer,
  VAE), the run's batch preparer, 1-NFE sampling and decoding, scored by the tiny detector and
  CLIP snapshots; the scores reach the metrics and the report folder.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from apex_dist.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parent))

WORLD_SIZE = 2
# Seconds the 2-rank session may take on a loaded 2-core machine (no DeepSpeed: a gloo group).
SESSION_TIMEOUT = 120
# Extra seconds rank 1 spends per generation call, so that rank 0 waits in the gather.
SLOW_RANK_DELAY = 0.3
PROMPTS = 5  # 3 for rank 0, 2 for rank 1
IMAGE_SIDE = 8


def evaluation_config(directory: Path, *overrides: str):
    return load_config(
        None,
        [
            "model.preset=qwen-image-tiny",
            "method.objective=fm",
            f"train.output_dir={directory}",
            "train.micro_batch_size=2",
            "logging.eval_every_steps=2",
            f"logging.eval_prompt_count={PROMPTS}",
            f"logging.eval_clip={directory / 'no_clip_here'}",
            *overrides,
        ],
    )


class RecordingMetrics:
    def __init__(self):
        self.logged = []

    def log_values(self, step, values):
        self.logged.append((step, values))


class FakeTrainer:
    """What the hook reads of a Trainer: config, rank info, metrics (and engine, preparer)."""

    def __init__(self, config, info, engine=None, prepare=None):
        self.config, self.info = config, info
        self.engine, self.prepare = engine, prepare
        self.metrics = RecordingMetrics()


class StubScorer:
    """Records the pixel value of each image (the generator writes the prompt index)."""

    def __init__(self):
        self.fail = False
        self.seen = []

    def to(self, device):
        return self

    def evaluate(self, pictures, prompts, specs, files=None):
        from apex_dist.evaluation.evaluator import ImageResult

        if self.fail:
            raise RuntimeError("the scorer broke")
        self.seen += [picture.getpixel((0, 0))[0] for picture in pictures]
        return [
            ImageResult(file, prompt, spec.tag, clip_score=20.0, correct=index % 2 == 0)
            for index, (file, prompt, spec) in enumerate(zip(files, prompts, specs, strict=True))
        ]


def _session(rank: int, port: int, directory: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    )
    directory = Path(directory)
    try:
        import torch.distributed as dist

        from apex_dist.distributed.runtime import RankInfo
        from apex_dist.evaluation.training import PeriodicEvaluation

        dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
        info = RankInfo(rank, WORLD_SIZE, rank, torch.device("cpu"))
        trainer = FakeTrainer(evaluation_config(directory), info)
        calls = []

        def generate(indices):
            calls.append(list(indices))
            if rank == 1:
                time.sleep(SLOW_RANK_DELAY)
            return torch.tensor(indices, dtype=torch.uint8)[:, None, None, None].expand(
                -1, 3, IMAGE_SIDE, IMAGE_SIDE
            )

        result = {}
        scorer = StubScorer() if rank == 0 else None
        evaluation = PeriodicEvaluation(trainer, scorer=scorer, generate=generate)
        # 1. uneven shares, rank 1 slower
        summary = evaluation.run(2)
        result["calls"] = list(calls)
        result["summary"] = summary
        result["seen"] = scorer.seen if scorer else None
        result["logged"] = trainer.metrics.logged
        # 2. the scorer fails on rank 0: every rank raises at the same point
        if scorer:
            scorer.fail = True
        try:
            evaluation.run(4)
            result["failure"] = None
        except RuntimeError as error:
            result["failure"] = str(error)
        # 3. a missing snapshot at start (rank 0 loads): every rank raises
        try:
            PeriodicEvaluation(trainer, generate=generate)
            result["start_failure"] = None
        except RuntimeError as error:
            result["start_failure"] = str(error)
        dist.barrier()  # both ranks are still in step
        (directory / f"result_{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    except BaseException:
        (directory / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_generate_shares_rank_zero_scores_and_failures_end_both(tmp_path):
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_session, args=(rank, port, str(tmp_path)))
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(SESSION_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
    errors = [path.read_text() for path in sorted(tmp_path.glob("error_*.txt"))]
    assert not errors, "\n".join(errors)
    assert [process.exitcode for process in processes] == [0, 0]
    first, second = (json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in (0, 1))
    # shares 0, 2, 4 and 1, 3; the shorter one repeats its last prompt: equal calls and sizes
    assert first["calls"] == [[0, 2], [4]]
    assert second["calls"] == [[1, 3], [3]]
    assert first["seen"] == [0, 1, 2, 3, 4]  # gathered in prompt order
    assert second["summary"] is None
    summary = first["summary"]
    assert summary["images"] == PROMPTS and summary["clip_score"] == 20.0
    assert first["logged"][0][0] == 2 and first["logged"][0][1]["eval/clip_score"] == 20.0
    assert "eval/geneval" in first["logged"][0][1]
    assert (tmp_path / "evaluation" / "step_00000002" / "results.json").is_file()
    assert "failed on rank 0: the scorer broke" in first["failure"]
    assert "evaluation at step 4 failed on rank 0" in second["failure"]
    assert "logging.eval_clip" in first["start_failure"]
    assert "could not be loaded on rank 0" in second["start_failure"]


def test_config_requires_clip_and_an_image_model(tmp_path):
    with pytest.raises(ConfigError, match="logging.eval_every_steps=5 needs logging.eval_clip"):
        evaluation_config(tmp_path, "logging.eval_every_steps=5", "logging.eval_clip=null")
    with pytest.raises(ConfigError, match="model.preset toy-mlp generates 2-D points"):
        load_config(
            None, ["model.preset=toy-mlp", "logging.eval_every_steps=5", "logging.eval_clip=/m"]
        )
    with pytest.raises(ConfigError, match="eval_prompt_count must be >= 1"):
        evaluation_config(tmp_path, "logging.eval_prompt_count=0")


class FakeEngine:
    """The engine's sampling interface over a plain module."""

    def __init__(self, module):
        self.module = module

    def inference_model(self):
        from apex_dist.distributed.engine import VelocityModelAdapter

        return VelocityModelAdapter(self.module, torch.float32)

    @contextlib.contextmanager
    def evaluation(self):
        with torch.no_grad():
            yield


def test_the_student_path_on_one_process_with_tiny_snapshots(tmp_path):
    from tiny_evaluation import write_clip_snapshot, write_detector_snapshot

    from apex_dist.data.prepare import BatchPreparer
    from apex_dist.distributed.runtime import RankInfo
    from apex_dist.evaluation.training import EVALUATION_SEED_OFFSET, PeriodicEvaluation
    from apex_dist.models.loading import load_pretrained_transformer
    from apex_dist.models.tiny import write_tiny_snapshot

    snapshot = write_tiny_snapshot(tmp_path / "qwen")
    config = evaluation_config(
        tmp_path / "run",
        f"model.pretrained={snapshot}",
        "data.resolution=32",
        f"logging.eval_clip={write_clip_snapshot(tmp_path / 'clip')}",
        f"logging.eval_detector={write_detector_snapshot(tmp_path / 'detector')}",
        "logging.eval_prompt_count=3",
    )
    info = RankInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    engine = FakeEngine(
        load_pretrained_transformer(snapshot, init_context=torch.device("cpu")).eval()
    )
    trainer = FakeTrainer(config, info, engine, BatchPreparer(config, info.device, 0))
    evaluation = PeriodicEvaluation(trainer)
    images = evaluation.student_images([0, 1, 2])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    assert images.float().std() > 0
    # an image depends on its prompt index only (its noise seed), not on its batch
    alone = evaluation.student_images([1])
    assert (alone[0].int() - images[1].int()).abs().max() <= 1
    assert config.train.seed + EVALUATION_SEED_OFFSET > config.train.seed
    summary = evaluation.run(0)
    assert summary["images"] == 3
    assert set(summary["tasks"]) == {"single_object", "two_object", "counting"}
    (step, values), *_ = trainer.metrics.logged
    assert step == 0 and set(values) >= {"eval/clip_score", "eval/geneval", "eval/counting"}
    report = json.loads(
        (tmp_path / "run" / "evaluation" / "step_00000000" / "results.json").read_text()
    )
    assert [image["prompt"] for image in report["images"]] == [
        spec.prompt for spec in evaluation.specs
    ]
