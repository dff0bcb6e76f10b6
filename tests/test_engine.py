"""The engine and trainer on 2 CPU ranks (gloo): ZeRO-3 full and LoRA, ZeRO-2, EMA partitions,
resume equivalence, SIGTERM, a run killed during a save, non-finite steps.

Each `_spawn` starts one 2-rank session; a session runs several trainers one after another in
the same process group, so that the expensive start-up is shared between assertions.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import pickle
import signal
import socket
import traceback
from pathlib import Path

import pytest
import torch

from apex_dist.config import load_config

WORLD_SIZE = 2
# Seconds a 2-rank session may take before the test fails (the first DeepSpeed start on a fresh
# machine JIT-builds a comm op, 40-50 s).
SESSION_TIMEOUT = 420
# The tiny Qwen-Image preset: 16 input channels per packed token, 32 text features.
TINY_CHANNELS, TINY_TEXT_FEATURES, TINY_TEXT_TOKENS = 16, 32, 3
TINY_IMAGE_SHAPE = (1, 2, 2)


class TinyLatentStream:
    """Random packed latents and text features for qwen-image-tiny; batch b of rank r is drawn
    from a generator seeded by (seed, r, b), so the position is one integer."""

    def __init__(self, config, rank, world_size, micro_batch_size, seed):
        self.rank, self.world_size, self.rows, self.seed = rank, world_size, micro_batch_size, seed
        self.batches = 0

    def state_dict(self):
        return {"batches": self.batches, "rank": self.rank}

    def load_state_dict(self, state):
        assert state["rank"] == self.rank
        self.batches = state["batches"]

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(
                self.seed * 1_000_003 + self.rank * 7919 + self.batches
            )
            tokens = math.prod(TINY_IMAGE_SHAPE)
            mask = torch.ones(self.rows, TINY_TEXT_TOKENS, dtype=torch.bool)
            mask[0, -1] = False  # one padded row
            batch = {
                "key": [f"r{self.rank}-b{self.batches}-{row}" for row in range(self.rows)],
                "latents": torch.randn(self.rows, tokens, TINY_CHANNELS, generator=generator),
                "text": torch.randn(
                    self.rows, TINY_TEXT_TOKENS, TINY_TEXT_FEATURES, generator=generator
                ),
                "text_mask": mask,
                "neg_text": torch.randn(
                    1, TINY_TEXT_TOKENS, TINY_TEXT_FEATURES, generator=generator
                ),
                "neg_text_mask": torch.ones(1, TINY_TEXT_TOKENS, dtype=torch.bool),
                "image_shape": TINY_IMAGE_SHAPE,
            }
            self.batches += 1
            yield batch


def tiny_config(output_dir: Path, *overrides: str):
    base = [
        "model.preset=qwen-image-tiny",
        "method.objective=apex_v0",
        "method.guidance.ratio=0.5",
        "method.reference.mode=ema",
        "method.reference.ema_decay=0.9",
        "train.micro_batch_size=4",
        "train.steps=4",
        "optimizer.lr=1.0e-3",
        "optimizer.warmup_steps=2",
        "optimizer.schedule=cosine",
        f"train.output_dir={output_dir}",
        "parallel.zero_stage=3",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=1",
        "logging.every_steps=1",
    ]
    return load_config(None, [*base, *overrides])


# --------------------------------------------------------------------------------------------
# spawning


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, port: int, scenario: str, directory: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    try:
        result = _scenario(scenario)(rank, Path(directory))
        with open(Path(directory) / f"result_{scenario}_{rank}.pkl", "wb") as handle:
            pickle.dump(result, handle)
    except BaseException:
        (Path(directory) / f"error_{scenario}_{rank}.txt").write_text(traceback.format_exc())
        raise


def _scenario(name: str):
    """A scenario of this file by name, or of another test module as "module.function"."""
    if "." in name:
        module, function = name.rsplit(".", 1)
        return getattr(importlib.import_module(module), function)
    return SCENARIOS[name]


def _spawn(scenario: str, directory: Path, expect_crash: bool = False) -> list:
    """Run `scenario` on 2 ranks; return each rank's result."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_entry, args=(rank, port, scenario, str(directory)))
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    processes[0].join(SESSION_TIMEOUT)
    if expect_crash:
        for process in processes[1:]:  # left waiting at a barrier by the crashed rank 0
            process.join(5)
    for process in processes:
        process.join(SESSION_TIMEOUT if not expect_crash else 1)
        if process.is_alive():
            process.kill()
            process.join()
    errors = sorted(directory.glob(f"error_{scenario}_*.txt"))
    if expect_crash:
        return [process.exitcode for process in processes]
    assert not errors, "\n".join(path.read_text() for path in errors)
    assert all(process.exitcode == 0 for process in processes), [p.exitcode for p in processes]
    results = []
    for rank in range(WORLD_SIZE):
        with open(directory / f"result_{scenario}_{rank}.pkl", "rb") as handle:
            results.append(pickle.load(handle))
    return results


def _trainer(config):
    from apex_dist.distributed.runtime import init_distributed
    from apex_dist.trainer import Trainer

    return Trainer(config, init_distributed(), stream_factory=TinyLatentStream)


def _losses(summary):
    return [(entry["step"], entry["loss"], entry["keys"]) for entry in summary.history]


def _reported_losses(trainer) -> list:
    """The loss of every report the trainer's metrics logger makes, as it makes them."""
    reported = []
    record = trainer.metrics.record

    def recording(step, metrics):
        report = record(step, metrics)
        reported.append((step, None if report is None else report.get("loss")))
        return report

    trainer.metrics.record = recording
    return reported


# --------------------------------------------------------------------------------------------
# scenarios (run inside the spawned ranks)


def scenario_full_zero3(rank: int, directory: Path) -> dict:
    """Uninterrupted run; a run stopped by SIGTERM; its resume killed during a save."""
    import deepspeed

    from apex_dist.distributed import checkpoint as checkpoint_module

    result = {}
    # 1. uninterrupted, with gradient accumulation
    trainer = _trainer(tiny_config(directory / "full", "train.gradient_accumulation_steps=2"))
    module = trainer.engine.module
    weights = [p for n, p in module.named_parameters() if n.endswith("img_in.weight")]
    result["partitioned"] = all(
        p.ds_tensor.numel() < p.ds_numel and p.data.numel() == 0
        for p in module.parameters()
        if p.ds_numel >= WORLD_SIZE
    )
    result["repaired_e2_equals_e1"] = _gathered_equal(
        module.time_text_embed_2.parameters(), module.time_text_embed.parameters()
    )
    summary = trainer.train()
    result["full"] = _losses(summary)
    # the EMA swapped in is what ZeRO gathers; the training weights come back bit for bit
    shadow = trainer.engine.shadows["ema"]
    name = "img_in.weight"
    parameter = weights[0]
    before = parameter.ds_tensor.clone()
    gathered_ema = [torch.empty_like(shadow.tensors[name]) for _ in range(WORLD_SIZE)]
    torch.distributed.all_gather(gathered_ema, shadow.tensors[name])
    full_ema = torch.cat(gathered_ema)[: parameter.ds_numel].view(parameter.ds_shape)
    with (
        shadow.swapped_in(trainer.engine.release_gathered),
        deepspeed.zero.GatheredParameters([parameter]),
    ):
        result["ema_swapped_in"] = torch.equal(parameter.data.float(), full_ema)
    result["weights_restored"] = torch.equal(parameter.ds_tensor, before)
    with deepspeed.zero.GatheredParameters([parameter]):
        result["ema_not_weights"] = not torch.equal(parameter.data.float(), full_ema)
    trainer.close()

    # 2. SIGTERM to rank 1 only, during step 2: both ranks save step 2 and stop
    trainer = _trainer(tiny_config(directory / "stopped", "train.gradient_accumulation_steps=2"))
    original = trainer.engine.train_step

    def signalled_step(*arguments, **named):
        step_result = original(*arguments, **named)
        if rank == 1 and trainer.step == 1:  # inside step 2 (step counts done steps)
            os.kill(os.getpid(), signal.SIGTERM)
        return step_result

    trainer.engine.train_step = signalled_step
    summary = trainer.train()
    result["stopped"] = (summary.steps_done, summary.stopped_by, str(summary.last_checkpoint))
    result["stopped_losses"] = _losses(summary)
    trainer.close()

    # 3. resume it, and die (rank 0) in the middle of the save at step 4
    config = tiny_config(
        directory / "stopped",
        "train.gradient_accumulation_steps=2",
        "checkpoint.resume=latest",
    )
    trainer = _trainer(config)
    result["resumed_at"] = trainer.step

    def die_before_publishing(self, temporary, final, tag):
        os._exit(17)  # like a SIGKILL: nothing after this runs

    checkpoint_module.CheckpointManager._publish = die_before_publishing
    with open(directory / f"result_full_zero3_{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)
    trainer.train()  # rank 0 never returns; rank 1 waits at the barrier until killed
    return result


def _gathered_equal(first, second) -> bool:
    import deepspeed

    for one, other in zip(first, second, strict=True):
        with deepspeed.zero.GatheredParameters([one, other]):
            if not torch.equal(one.data, other.data):
                return False
    return True


def scenario_resume_after_kill(rank: int, directory: Path) -> dict:
    config = tiny_config(
        directory / "stopped", "train.gradient_accumulation_steps=2", "checkpoint.resume=latest"
    )
    trainer = _trainer(config)
    result = {"resumed_at": trainer.step}
    summary = trainer.train()
    result["resumed_losses"] = _losses(summary)
    trainer.close()
    # a changed model is refused with the list of differences
    from apex_dist.distributed.checkpoint import ResumeRefusedError

    try:
        _trainer(
            tiny_config(
                directory / "stopped",
                "train.gradient_accumulation_steps=2",
                "checkpoint.resume=latest",
                "method.condition_shift.scale=-1.0",
            )
        )
        result["refused"] = None
    except ResumeRefusedError as error:
        result["refused"] = str(error)
    return result


def scenario_lora_and_zero2(rank: int, directory: Path) -> dict:
    import deepspeed

    result = {}
    lora = (
        "model.lora.enabled=true",
        "model.lora.rank=4",
        "method.reference.mode=frozen_base",
        "train.steps=2",
        "parallel.activation_checkpointing=1",
    )
    trainer = _trainer(tiny_config(directory / "lora", *lora))
    module = trainer.engine.module
    frozen = next(p for n, p in module.named_parameters() if n.endswith("img_in.weight"))
    adapter = next(p for n, p in module.named_parameters() if "lora_B" in n)
    with deepspeed.zero.GatheredParameters([frozen, adapter]):
        frozen_before, adapter_before = frozen.data.clone(), adapter.data.clone()
    result["lora_reported"] = _reported_losses(trainer)
    summary = trainer.train()
    with deepspeed.zero.GatheredParameters([frozen, adapter]):
        result["lora_base_unchanged"] = torch.equal(frozen.data, frozen_before)
        result["lora_adapter_trained"] = not torch.equal(adapter.data, adapter_before)
    result["lora_losses"] = _losses(summary)
    trainer.close()
    trainer = _trainer(
        tiny_config(
            directory / "lora",
            *lora[:-2],
            "train.steps=3",
            "parallel.activation_checkpointing=1",
            "checkpoint.resume=latest",
        )
    )
    result["lora_resumed_at"] = trainer.step
    result["lora_resumed_losses"] = _losses(trainer.train())
    trainer.close()

    # ZeRO-2, full fine-tuning, online reference; a nan loss on rank 1 at step 2 is skipped on
    # both ranks; two in a row stop the run
    from apex_dist.distributed.engine import NonFiniteTrainingError

    config = tiny_config(
        directory / "zero2",
        "parallel.zero_stage=2",
        "method.reference.mode=online",
        "train.steps=5",
        "train.max_nonfinite_steps=2",
        "checkpoint.every_steps=0",
    )
    trainer = _trainer(config)
    objective = trainer.engine.objective
    poisoned_steps = {2, 4, 5}

    def poisoned(model, batch, reference=None):
        loss, terms = objective(model, batch, reference)
        if rank == 1 and trainer.step + 1 in poisoned_steps:
            loss = loss * float("nan")
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        return loss, terms

    trainer.engine.objective = poisoned
    parameter = next(p for n, p in trainer.engine.module.named_parameters() if "img_in" in n)
    snapshots = []
    original = trainer.engine.train_step

    def recording_step(*arguments, **named):
        step_result = original(*arguments, **named)
        snapshots.append((step_result.applied, parameter.data.clone()))
        return step_result

    trainer.engine.train_step = recording_step
    result["zero2_reported"] = _reported_losses(trainer)
    try:
        trainer.train()
        result["zero2_stopped"] = None
    except NonFiniteTrainingError as error:
        result["zero2_stopped"] = str(error)
    result["zero2_losses"] = [(entry["step"], entry["loss"]) for entry in trainer.history]
    result["zero2_applied"] = [applied for applied, _ in snapshots]
    result["zero2_skip_kept_weights"] = torch.equal(snapshots[1][1], snapshots[0][1])
    result["zero2_step_changed_weights"] = not torch.equal(snapshots[2][1], snapshots[1][1])
    # a run that starts from given weights (as a student from its teacher): the model, and the
    # optimizer's own copy that the first step starts from, hold them
    state = {
        name: value.clone() * 0.5 for name, value in trainer.engine.module.state_dict().items()
    }
    trainer.close()
    from apex_dist.distributed.runtime import init_distributed
    from apex_dist.trainer import Trainer

    config = tiny_config(
        directory / "initial", "parallel.zero_stage=2", "train.steps=1", "checkpoint.every_steps=0"
    )
    trainer = Trainer(config, init_distributed(), TinyLatentStream, initial_state=state)
    parameters = dict(trainer.engine.module.named_parameters())
    result["initial_loaded"] = all(torch.equal(parameters[n], state[n]) for n in parameters)
    trainer.train()
    result["initial_first_step"] = max(
        float((parameters[name] - state[name]).abs().max()) for name in parameters
    )
    trainer.close()
    config = tiny_config(directory / "refused", "parallel.zero_stage=2", "train.steps=1")
    try:
        Trainer(
            config,
            init_distributed(),
            TinyLatentStream,
            initial_state={"img_in.weight": torch.zeros(1)},
        )
        result["initial_refused"] = None
    except ValueError as error:
        result["initial_refused"] = str(error)
    return result


SCENARIOS = {
    "full_zero3": scenario_full_zero3,
    "resume_after_kill": scenario_resume_after_kill,
    "lora_and_zero2": scenario_lora_and_zero2,
}


# --------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zero3")
    exit_codes = _spawn("full_zero3", directory, expect_crash=True)
    with open(directory / "result_full_zero3_0.pkl", "rb") as handle:
        first = pickle.load(handle)
    return directory, exit_codes, first


def test_zero3_full_finetuning_partitions_and_trains(zero3_runs):
    directory, _, result = zero3_runs
    assert result["partitioned"], "a ZeRO-3 rank holds a whole parameter"
    assert result["repaired_e2_equals_e1"], "E2 must start as a copy of E1 under zero.Init"
    losses = [loss for _, loss, _ in result["full"]]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    # keep_last=1: only the final checkpoint remains, named in `latest`
    checkpoints = directory / "full" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004"]
    tag = checkpoints / "step_00000004"
    assert (tag / "config.yaml").is_file()
    for rank in range(WORLD_SIZE):
        ema = torch.load(tag / f"ema_rank_{rank:05d}.pt", weights_only=True)
        assert ema["format"] == "apex_dist.ema/1"
        assert ema["zero_stage"] == 3 and ema["world_size"] == WORLD_SIZE
        assert all(tensor.dim() == 1 for tensor in ema["tensors"].values())
        assert "img_in.weight" in ema["tensors"]


def test_ema_is_partition_local_and_swaps_in_exactly(zero3_runs):
    _, _, result = zero3_runs
    assert result["ema_swapped_in"], "ZeRO gathered other weights than the EMA swapped in"
    assert result["weights_restored"], "training weights not restored bit for bit"
    assert result["ema_not_weights"], "the EMA equals the weights: it was never averaged"


def test_sigterm_saves_on_every_rank_and_stops(zero3_runs):
    _, _, result = zero3_runs
    steps_done, stopped_by, checkpoint = result["stopped"]
    assert steps_done == 2 and stopped_by.startswith("signal")
    assert checkpoint.endswith("step_00000002")
    assert result["resumed_at"] == 2


def test_killed_during_save_resumes_from_previous_complete_checkpoint(zero3_runs, tmp_path):
    directory, exit_codes, first = zero3_runs
    assert exit_codes[0] == 17, exit_codes
    checkpoints = directory / "stopped" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    assert (checkpoints / ".incomplete_step_00000004").is_dir()
    (result, _) = _spawn("resume_after_kill", directory)
    assert result["resumed_at"] == 2
    # resume equivalence: stopped at 2 + resumed 3..4 == uninterrupted 1..4, losses and keys
    uninterrupted = first["full"]
    combined = first["stopped_losses"] + result["resumed_losses"]
    assert [step for step, _, _ in combined] == [1, 2, 3, 4]
    for (step, loss, keys), (_, expected_loss, expected_keys) in zip(
        combined, uninterrupted, strict=True
    ):
        assert keys == expected_keys, step
        assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-7), step
    assert not (checkpoints / ".incomplete_step_00000004").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert "method.condition_shift.scale" in result["refused"]
    assert "allow_config_changes" in result["refused"]


@pytest.fixture(scope="module")
def lora_and_zero2_runs(tmp_path_factory):
    return _spawn("lora_and_zero2", tmp_path_factory.mktemp("lora_and_zero2"))


def test_lora_zero3_and_zero2_nonfinite_steps(lora_and_zero2_runs):
    result, other = lora_and_zero2_runs
    assert result["lora_base_unchanged"] and result["lora_adapter_trained"]
    assert all(math.isfinite(loss) for _, loss, _ in result["lora_losses"])
    assert result["lora_resumed_at"] == 2
    assert [step for step, _, _ in result["lora_resumed_losses"]] == [3]
    # step 2 poisoned on rank 1 only: skipped on both ranks, weights kept; steps 4, 5 in a row
    for rank_result in (result, other):
        assert rank_result["zero2_applied"] == [True, False, True, False]
        assert rank_result["zero2_skip_kept_weights"]
        assert rank_result["zero2_step_changed_weights"]
        assert "2 optimizer steps in a row" in rank_result["zero2_stopped"]


def test_a_run_starts_from_given_weights(lora_and_zero2_runs):
    for rank_result in lora_and_zero2_runs:
        assert rank_result["initial_loaded"]
        # one AdamW step of lr 5e-4 (warm-up) moves a weight by about 5e-4, from the given state
        assert 0 < rank_result["initial_first_step"] < 1e-2
        assert "does not fit" in rank_result["initial_refused"]
        assert "missing" in rank_result["initial_refused"]


def test_logged_losses_are_the_mean_over_ranks(lora_and_zero2_runs):
    """Every report (logging.every_steps=1) holds the mean of both ranks' losses, the same on
    both ranks; a step whose loss is nan on one rank reports the finite ones."""
    result, other = lora_and_zero2_runs
    assert result["lora_reported"] == other["lora_reported"]
    ranks = [{step: loss for step, loss, _ in r["lora_losses"]} for r in (result, other)]
    assert ranks[0] != ranks[1]  # the ranks train on different rows
    for step, reported in result["lora_reported"]:
        assert reported == pytest.approx((ranks[0][step] + ranks[1][step]) / 2, rel=1e-6)
    assert result["zero2_reported"] == other["zero2_reported"]
    zero2 = [dict(r["zero2_losses"]) for r in (result, other)]
    assert [math.isnan(zero2[1][step]) for step in (1, 2, 3, 4)] == [False, True, False, True]
    expected = {
        step: (zero2[0][step] + zero2[1][step]) / 2 if step in (1, 3) else zero2[0][step]
        for step in (1, 2, 3, 4)
    }
    assert dict(result["zero2_reported"]) == pytest.approx(expected, rel=1e-6)
