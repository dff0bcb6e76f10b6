"""Faults of a run on 2 CPU ranks (gloo): hostile checkpoint files, a foreign lock and a fresh
start over checkpoints, a rank whose weights turn non-finite, a full disk on one rank during a
save, a resume with new optimizer settings, a changed world size with the advice followed, a
rank stopped by SIGSTOP, and a run whose steps go non-finite through the launcher.

Like tests/test_engine.py, one spawned session runs several trainers one after another so that
DeepSpeed's start-up is paid once; each rank records what happened (the error type and message
of every refusal) and the tests assert on both ranks' records.
"""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from test_engine import TinyLatentStream, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# Seconds a session may take (DeepSpeed's first start on a fresh machine builds a comm op).
SESSION_TIMEOUT = 600
# The watchdog timeout of the SIGSTOP test, and the slack allowed on top of it for the verdict
# to be written and the process to end on a loaded 2-core machine.
WATCHDOG_TEST_SECONDS = 12.0
WATCHDOG_SLACK_SECONDS = 15.0


class WritesMarker:
    """Unpickling this object writes a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


# --------------------------------------------------------------------------------------------
# spawning


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, scenario: str, directory: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    try:
        result = SCENARIOS[scenario](rank, Path(directory))
        with open(Path(directory) / f"result_{scenario}_{rank}.pkl", "wb") as handle:
            pickle.dump(result, handle)
    except BaseException:
        (Path(directory) / f"error_{scenario}_{rank}.txt").write_text(traceback.format_exc())
        raise


def _start(scenario: str, directory: Path, world_size: int) -> list:
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_entry, args=(rank, world_size, port, scenario, str(directory)))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    return processes


def _spawn(scenario: str, directory: Path, world_size: int = 2) -> list:
    """Run `scenario` on `world_size` ranks; return each rank's result."""
    processes = _start(scenario, directory, world_size)
    for process in processes:
        process.join(SESSION_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
    errors = sorted(directory.glob(f"error_{scenario}_*.txt"))
    assert not errors, "\n".join(path.read_text() for path in errors)
    assert all(process.exitcode == 0 for process in processes), [p.exitcode for p in processes]
    results = []
    for rank in range(world_size):
        with open(directory / f"result_{scenario}_{rank}.pkl", "rb") as handle:
            results.append(pickle.load(handle))
    return results


def _trainer(config):
    from apex_dist.distributed.runtime import init_distributed
    from apex_dist.trainer import Trainer

    return Trainer(config, init_distributed(), stream_factory=TinyLatentStream)


def _attempt(function) -> tuple[str, str] | None:
    """None when `function` returns; else the error's type name and message."""
    try:
        function()
        return None
    except Exception as error:
        return (type(error).__name__, str(error))


def _barrier() -> None:
    torch.distributed.barrier()


def _latest(run: Path) -> str | None:
    latest = run / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _entries(run: Path) -> list[str]:
    """`latest` and the directories of the checkpoints directory (DeepSpeed also copies its
    recovery scripts zero_to_*.py there)."""
    return sorted(
        path.name
        for path in (run / "checkpoints").iterdir()
        if path.is_dir() or path.name == "latest"
    )


# --------------------------------------------------------------------------------------------
# scenarios (run inside the spawned ranks)


def scenario_faults(rank: int, directory: Path) -> dict:
    from apex_dist.distributed.engine import NonFiniteTrainingError  # noqa: F401 (importable)

    result = {}
    run = directory / "run"
    trainer = _trainer(tiny_config(run, "train.steps=2"))
    trainer.train()
    good = run / "checkpoints" / "step_00000002"
    result["globals"] = sorted(
        {
            name
            for path in good.glob("*.pt")
            for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        }
    )

    # case 1: a hostile pickle in each file a resume reads, in turn; the resume's load refuses
    hostile_files = {
        "model states of rank 1": "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "optimizer states of rank 0": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "EMA of rank 1": "ema_rank_00001.pt",
    }
    result["hostile"], result["marker_written"] = {}, {}
    for index, (what, name) in enumerate(hostile_files.items()):
        crafted = directory / f"hostile_{index}" / "checkpoints" / "step_00000002"
        marker = directory / f"marker_{index}"
        if rank == 0:
            shutil.copytree(good, crafted)
            (crafted.parent / "latest").write_text("step_00000002\n")
            state = torch.load(crafted / name, weights_only=False)  # our own file: trusted
            state["payload"] = WritesMarker(marker)
            torch.save(state, crafted / name)
        _barrier()
        result["hostile"][what] = (
            str(crafted / name),
            _attempt(lambda crafted=crafted: trainer.engine.load(trainer.checkpoints, crafted)),
        )
        _barrier()
        result["marker_written"][what] = marker.exists()
    trainer.close()
    # the same through a resuming trainer
    config = tiny_config(directory / "hostile_1", "checkpoint.resume=latest")
    result["hostile_resume"] = _attempt(lambda: _trainer(config))
    result["marker_written"]["resume"] = (directory / "marker_1").exists()

    # case 5: a live run holds the lock (this test's process, on this host)
    lock = run / "run.lock"
    if rank == 0:
        from apex_dist.distributed.run_lock import process_start_time

        owner = {
            "format": "apex_dist.run_lock/1",
            "host": socket.gethostname(),
            "pid": os.getppid(),
            "process_start": process_start_time(os.getppid()),
            "started": "2026-01-01T00:00:00",
            "command": "pytest",
        }
        import json

        lock.write_text(json.dumps(owner))
    _barrier()
    result["locked"] = _attempt(lambda: _trainer(tiny_config(run, "checkpoint.resume=latest")))
    _barrier()
    if rank == 0:
        lock.unlink(missing_ok=True)
    _barrier()
    # a fresh start over the checkpoints of the run: refused, nothing touched
    before = {path.name: path.stat().st_mtime_ns for path in good.iterdir()}
    result["fresh_over_existing"] = _attempt(lambda: _trainer(tiny_config(run)))
    result["files_untouched"] = before == {p.name: p.stat().st_mtime_ns for p in good.iterdir()}
    _barrier()

    # case 6: at step 3 rank 1's partition of a weight becomes nan and rank 0's EMA inf
    config = tiny_config(
        run,
        "train.steps=6",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=1",
        "checkpoint.resume=latest",
    )
    trainer = _trainer(config)
    original = trainer.engine.train_step

    def poisoning_step(*arguments, **named):
        step_result = original(*arguments, **named)
        if trainer.step + 1 == 3:
            with torch.no_grad():
                if rank == 1:
                    parameter = dict(trainer.engine.module.named_parameters())["img_in.weight"]
                    parameter.ds_tensor[0] = float("nan")
                else:
                    trainer.engine.shadows["ema"].tensors["proj_out.weight"][0] = float("inf")
        return step_result

    trainer.engine.train_step = poisoning_step
    result["nonfinite"] = _attempt(trainer.train)
    _barrier()
    result["nonfinite_latest"] = _latest(run)
    result["nonfinite_entries"] = _entries(run)
    trainer.close()
    _barrier()

    # case 7: the disk is full on rank 1 while it writes its part of step 4
    trainer = _trainer(tiny_config(run, "train.steps=4", "checkpoint.resume=latest"))
    real_save = torch.save

    def full_disk_save(value, file, *arguments, **named):
        if "step_00000004" in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_save(value, file, *arguments, **named)

    if rank == 1:
        torch.save = full_disk_save
    try:
        result["disk_full"] = _attempt(trainer.train)
    finally:
        torch.save = real_save
    _barrier()  # rank 0 removes the incomplete save after raising has been agreed
    result["disk_full_latest"] = _latest(run)
    result["disk_full_entries"] = _entries(run)
    trainer.close()
    _barrier()

    # the next start cleans a leftover save and resumes with this run's optimizer settings
    leftover = run / "checkpoints" / ".incomplete_step_00000009"
    if rank == 0:
        leftover.mkdir()
        (leftover / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 4096)
    _barrier()
    trainer = _trainer(
        tiny_config(
            run,
            "train.steps=3",
            "checkpoint.resume=latest",
            "optimizer.lr=5.0e-4",
            "optimizer.schedule=constant",
            "optimizer.warmup_steps=0",
            "optimizer.betas=[0.8, 0.95]",
            "optimizer.eps=1.0e-6",
            "optimizer.weight_decay=0.01",
            "optimizer.grad_clip=0.5",
        )
    )
    result["leftover_after_start"] = leftover.exists()
    result["resumed_at"] = trainer.step
    group = trainer.engine.scheduler.optimizer.param_groups[0]
    result["optimizer_after_resume"] = {
        "lr": group["lr"],
        "betas": tuple(group["betas"]),
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "grad_clip": trainer.engine.deepspeed.optimizer.clip_grad,
    }
    summary = trainer.train()
    result["after_resume_losses"] = [entry["loss"] for entry in summary.history]
    result["lr_after_step"] = trainer.engine.scheduler.get_last_lr()[0]
    result["final_latest"] = _latest(run)
    trainer.close()

    # resuming a run that already reached train.steps saves nothing again
    finished = run / "checkpoints" / "step_00000003"
    before = {path.name: path.stat().st_mtime_ns for path in finished.iterdir()}
    trainer = _trainer(tiny_config(run, "train.steps=3", "checkpoint.resume=latest"))
    summary = trainer.train()
    _barrier()
    result["finished_resume"] = {
        "steps_done": summary.steps_done,
        "untouched": before == {p.name: p.stat().st_mtime_ns for p in finished.iterdir()},
        "entries": _entries(run),
    }
    trainer.close()
    return result


def scenario_one_rank(rank: int, directory: Path) -> dict:
    """The 2-rank checkpoint of scenario_faults, resumed on 1 rank: refused; then its advice."""
    import deepspeed

    from apex_dist.export.deepspeed_checkpoint import DeepSpeedCheckpoint

    result = {}
    run = directory / "run"
    result["refused"] = _attempt(lambda: _trainer(tiny_config(run, "checkpoint.resume=latest")))
    message = result["refused"][1] if result["refused"] else ""
    found = re.search(
        r"(python tools/convert_checkpoint\.py .+?), then train with (.+?) \(", message
    )
    result["advice_found"] = found is not None
    if found is None:
        return result
    export = directory / "export"
    new_run = directory / "continued"
    command = found.group(1).replace("<export>", str(export)).split()
    command[0] = sys.executable
    converted = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    result["convert"] = (converted.returncode, converted.stderr[-2000:])
    overrides = (
        found.group(2)
        .replace("<export>", str(export))
        .replace("<a new directory>", str(new_run))
        .split()
    )
    trainer = _trainer(tiny_config(new_run, "train.steps=1", *overrides))
    checkpoint = DeepSpeedCheckpoint.open(run)
    result["source_tag"] = checkpoint.tag
    matches = {}
    for name, parameter in trainer.engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter]):
            matches[name] = torch.equal(parameter.data.float(), checkpoint.parameters[name].read())
    result["weights_match"] = matches
    summary = trainer.train()
    result["continued_losses"] = [entry["loss"] for entry in summary.history]
    trainer.close()
    return result


def scenario_watchdog(rank: int, directory: Path) -> dict:
    """Trains the toy model until the test stops a rank; never returns normally."""
    from apex_dist.config import load_config
    from apex_dist.distributed.runtime import init_distributed
    from apex_dist.trainer import Trainer

    config = load_config(
        ROOT / "configs" / "toy.yaml",
        [
            f"train.output_dir={directory / 'watched'}",
            "train.steps=1000000",
            "train.micro_batch_size=16",
            "model.toy.hidden_size=16",
            "checkpoint.every_steps=0",
            "checkpoint.resume=null",
            "logging.every_steps=100000",
            "logging.sample_every_steps=0",
            f"train.watchdog_seconds={WATCHDOG_TEST_SECONDS}",
        ],
    )
    Trainer(config, init_distributed()).train()
    return {}


SCENARIOS = {
    "faults": scenario_faults,
    "one_rank": scenario_one_rank,
    "watchdog": scenario_watchdog,
}


# --------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults")
    return directory, _spawn("faults", directory)


def test_deepspeed_pickles_only_the_allowlisted_classes(fault_runs):
    from apex_dist.distributed.safe_loading import deepspeed_safe_globals

    _, (result, _) = fault_runs
    allowed = {f"{kind.__module__}.{kind.__name__}" for kind in deepspeed_safe_globals()}
    # ZeRO-3 fp32 here; ZeRO-2 adds fragment_address and fp16 DynamicLossScaler (module doc)
    assert set(result["globals"]) == allowed - {
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    }


def test_hostile_checkpoint_files_are_refused_on_every_rank_and_never_run(fault_runs):
    _, results = fault_runs
    for what, owner in (
        ("model states of rank 1", 1),
        ("optimizer states of rank 0", 0),
        ("EMA of rank 1", 1),
    ):
        for rank, result in enumerate(results):
            path, refused = result["hostile"][what]
            assert refused is not None, (what, rank)
            if rank == owner:
                assert refused[0] == "UnsafeCheckpointError" and path in refused[1], refused
            else:
                assert f"rank(s) {owner} failed" in refused[1], refused
            assert not result["marker_written"][what], what
    for result in results:
        assert result["hostile_resume"] is not None
        assert not result["marker_written"]["resume"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in results[0]["hostile_resume"][1]


def test_a_second_run_and_a_fresh_start_over_checkpoints_are_refused_on_every_rank(fault_runs):
    _, (first, second) = fault_runs
    kind, message = first["locked"]
    assert kind == "RunLockedError" and f"pid {os.getpid()}" in message, message
    assert second["locked"][0] == "OtherRankError"
    kind, message = first["fresh_over_existing"]
    assert kind == "ExistingCheckpointsError" and "checkpoint.overwrite=true" in message
    assert second["fresh_over_existing"][0] == "OtherRankError"
    assert first["files_untouched"]


def test_nonfinite_weights_are_never_published(fault_runs):
    _, results = fault_runs
    for rank, result in enumerate(results):
        kind, message = result["nonfinite"]
        assert kind == "NonFiniteWeightsError", message
        assert "step 3" in message and "rank(s) 0, 1" in message
        assert "step_00000002" in message  # the last good checkpoint, named
        assert ("img_in.weight" if rank == 1 else "ema:proj_out.weight") in message
        # keep_last=1: the refused save pruned nothing; latest never moved
        assert result["nonfinite_latest"] == "step_00000002"
        assert result["nonfinite_entries"] == ["latest", "step_00000002"]


def test_a_full_disk_on_one_rank_ends_every_rank_and_keeps_the_last_checkpoint(fault_runs):
    _, (first, second) = fault_runs
    kind, message = second["disk_full"]
    assert kind == "CheckpointWriteError"
    assert ".incomplete_step_00000004" in message and "No space left on device" in message
    assert "step_00000002 is intact" in message
    kind, message = first["disk_full"]
    assert kind == "CheckpointWriteError" and "rank(s) 1 could not write" in message
    for result in (first, second):
        assert result["disk_full_latest"] == "step_00000002"
        assert result["disk_full_entries"] == ["latest", "step_00000002"]
        # the next start removed a leftover incomplete save and resumed from step 2
        assert not result["leftover_after_start"]
        assert result["resumed_at"] == 2


def test_a_resume_applies_this_runs_optimizer_settings(fault_runs):
    _, results = fault_runs
    for result in results:
        assert result["optimizer_after_resume"] == {
            "lr": pytest.approx(5.0e-4),
            "betas": (0.8, 0.95),
            "eps": 1.0e-6,
            "weight_decay": 0.01,
            "grad_clip": 0.5,
        }
        assert result["lr_after_step"] == pytest.approx(5.0e-4)
        assert all(math.isfinite(loss) for loss in result["after_resume_losses"])
        assert result["final_latest"] == "step_00000003"


def test_resuming_a_finished_run_saves_nothing_again(fault_runs):
    _, results = fault_runs
    for result in results:
        assert result["finished_resume"] == {
            "steps_done": 3,
            "untouched": True,
            "entries": ["latest", "step_00000003"],
        }


def test_a_changed_world_size_is_refused_with_advice_that_works(fault_runs):
    directory, _ = fault_runs
    (result,) = _spawn("one_rank", directory, world_size=1)
    kind, message = result["refused"]
    assert kind == "ResumeRefusedError"
    assert "saved by 2 rank(s)" in message and "this run has 1" in message
    assert "on 2 rank(s)" in message
    assert result["advice_found"], message
    assert result["convert"][0] == 0, result["convert"][1]
    assert result["source_tag"] == "step_00000003"
    mismatched = [name for name, equal in result["weights_match"].items() if not equal]
    assert not mismatched and result["weights_match"], mismatched
    assert len(result["continued_losses"]) == 1 and math.isfinite(result["continued_losses"][0])


def test_a_stopped_rank_is_named_and_ends_the_run(tmp_path, capfd, record_property):
    from apex_dist.distributed.watchdog import WATCHDOG_EXIT_CODE

    processes = _start("watchdog", tmp_path, world_size=2)
    heartbeat = tmp_path / "watched" / ".watchdog" / "rank_00001.json"
    try:
        deadline = time.monotonic() + SESSION_TIMEOUT
        while time.monotonic() < deadline:
            text = heartbeat.read_text() if heartbeat.is_file() else ""
            if '"step": ' in text and int(re.search(r'"step": (\d+)', text).group(1)) >= 3:
                break
            assert all(process.is_alive() for process in processes), "a rank died early"
            time.sleep(0.2)
        else:
            pytest.fail("rank 1 never reported step 3 through the watchdog heartbeat")
        os.kill(processes[1].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        processes[0].join(WATCHDOG_TEST_SECONDS + WATCHDOG_SLACK_SECONDS)
        waited = time.monotonic() - stopped_at
        record_property("seconds_from_sigstop_to_exit", round(waited, 1))
        assert not processes[0].is_alive(), "rank 0 still waits for the stopped rank"
        assert processes[0].exitcode == WATCHDOG_EXIT_CODE
        assert waited <= WATCHDOG_TEST_SECONDS + WATCHDOG_SLACK_SECONDS
    finally:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGCONT)
                process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
    captured = capfd.readouterr()
    verdict = [
        line for line in captured.err.splitlines() if "[rank 0]" in line and "watchdog" in line
    ]
    assert verdict, captured.err[-3000:]
    assert "rank 1 (no heartbeat" in verdict[0] and "last at step" in verdict[0]
    assert "stopped responding" in verdict[0]


def test_steps_that_stay_nonfinite_end_the_launcher_with_exit_1_naming_the_step(tmp_path):
    output = tmp_path / "run"
    finished = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launcher" / "run.py"),
            "--config",
            str(ROOT / "configs" / "toy.yaml"),
            f"train.output_dir={output}",
            # the first step throws the weights so far that every later loss overflows
            "optimizer.lr=1.0e30",
            "train.steps=20",
            "train.micro_batch_size=16",
            "model.toy.hidden_size=16",
            "logging.sample_every_steps=0",
            "checkpoint.every_steps=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SESSION_TIMEOUT,
    )
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert "NonFiniteTrainingError" in finished.stderr
    assert "3 optimizer steps in a row" in finished.stderr and "last at step 4" in finished.stderr
    assert not (output / "checkpoints" / "latest").exists()
