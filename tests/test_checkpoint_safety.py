"""Checkpoint and run safety in one process (no process group): loading never runs code, the
rank state is JSON, `latest` stays inside the run, one run per directory, checkpoints of an
earlier run are never mixed or silently overwritten, leftovers are cleaned, pruning keeps the
published checkpoint, and the watchdog's judge names the right rank.

The 2-rank counterparts (DeepSpeed's own files, agreement between ranks, a real SIGSTOP) are in
tests/test_run_faults.py.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
import torch

from apex_dist.config import ConfigError, load_config, save_config
from apex_dist.distributed import checkpoint as checkpoint_module
from apex_dist.distributed.checkpoint import (
    CheckpointManager,
    ExistingCheckpointsError,
    ResumeRefusedError,
    encode_rank_state,
    nonfinite_tensors,
    rng_state,
    set_rng_state,
)
from apex_dist.distributed.run_lock import (
    LOCK_FILE,
    RunLock,
    RunLockedError,
    process_start_time,
)
from apex_dist.distributed.runtime import RankInfo
from apex_dist.distributed.safe_loading import (
    UnsafeCheckpointError,
    check_loadable,
    safe_torch_load,
)
from apex_dist.distributed.watchdog import PeerView, judge

ONE_RANK = RankInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class WritesMarker:
    """Unpickling this object writes a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def hostile_file(path: Path, marker: Path, legit: object = None) -> Path:
    torch.save({"legit": legit, "payload": WritesMarker(marker)}, path)
    return path


def run_config(output_dir: Path, *overrides: str):
    return load_config(None, [f"train.output_dir={output_dir}", *overrides])


def fake_checkpoint(config, step: int, world_size: int = 1) -> Path:
    """A tag directory with what the resume checks read: config.yaml and rank states."""
    tag = Path(config.train.output_dir) / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    save_config(config, tag / "config.yaml")
    for rank in range(world_size):
        state = {
            "format": checkpoint_module.RANK_STATE_FORMAT,
            "step": step,
            "world_size": world_size,
            "rank": rank,
            "rng": rng_state(torch.device("cpu")),
            "data": {"batches": step},
        }
        (tag / f"rank_state_{rank:05d}.json").write_text(encode_rank_state(state))
    return tag


# --------------------------------------------------------------------------------------------
# case 1: loading never runs code


def test_a_hostile_pickle_is_refused_naming_the_file_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = hostile_file(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        check_loadable(path)
    assert str(path) in str(refused.value) and "exec" in str(refused.value)
    with pytest.raises(UnsafeCheckpointError) as refused:
        safe_torch_load(path)
    assert str(path) in str(refused.value)
    assert not marker.exists()


def test_the_deepspeed_allowlist_loads_its_objects_and_nothing_else(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "loss_scaler": LossScaler(1.0),
        "dynamic": DynamicLossScaler(
            init_scale=2.0**16,
            scale_window=1000,
            min_scale=1.0,
            delayed_shift=2,
            consecutive_hysteresis=False,
        ),
        "zero_stage": ZeroStageEnum.weights,
        "slices": {"w": fragment_address(numel=4, start=8)},
        "tensor": torch.arange(4.0),
    }
    torch.save(state, tmp_path / "states.pt")
    loaded = safe_torch_load(tmp_path / "states.pt")
    assert loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["dynamic"].cur_scale == 2.0**16
    assert loaded["zero_stage"] is ZeroStageEnum.weights
    assert loaded["slices"]["w"] == fragment_address(numel=4, start=8)
    assert torch.equal(loaded["tensor"], torch.arange(4.0))
    # another DeepSpeed class is not on the list
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    torch.save({"config": DeepSpeedZeroConfig()}, tmp_path / "other.pt")
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(tmp_path / "other.pt")


def test_a_pickled_rank_state_of_an_earlier_version_is_not_loaded(tmp_path):
    config = run_config(tmp_path / "run", "checkpoint.resume=latest")
    tag = fake_checkpoint(config, 2)
    (tag / "rank_state_00000.json").unlink()
    marker = tmp_path / "marker"
    hostile_file(tag / "rank_state_00000.pt", marker)
    (tag.parent / "latest").write_text(tag.name)
    manager = CheckpointManager(config, ONE_RANK)
    with pytest.raises(ResumeRefusedError, match="pickle"):
        manager.prepare_run()
    manager.close()
    assert not marker.exists()


def test_rank_state_is_json_and_restores_every_generator(tmp_path):
    random.seed(1)
    numpy.random.seed(2)
    torch.manual_seed(3)
    random.random(), numpy.random.normal(), torch.randn(3)  # gauss caches in use
    state = {"format": checkpoint_module.RANK_STATE_FORMAT, "step": 5, "world_size": 1, "rank": 0}
    state["rng"] = rng_state(torch.device("cpu"))
    state["data"] = {"batches": 5, "positions": [{"chunk": 1, "pending": {"a": [1, 2]}}]}
    text = encode_rank_state(state)
    expected = (random.random(), numpy.random.normal(), torch.randn(3))
    random.seed(9), numpy.random.seed(9), torch.manual_seed(9)
    set_rng_state(json.loads(text)["rng"], torch.device("cpu"))
    assert (random.random(), numpy.random.normal()) == expected[:2]
    assert torch.equal(torch.randn(3), expected[2])
    with pytest.raises(TypeError, match="data"):
        encode_rank_state({**state, "data": {"window": (1, 2)}})  # a tuple comes back a list


# --------------------------------------------------------------------------------------------
# case 2: `latest` stays inside the run


@pytest.mark.parametrize(
    "written", ["../other/checkpoints/step_00000002", "/tmp", "step_00000002/..", "notes"]
)
def test_latest_may_only_name_a_checkpoint_of_this_run(tmp_path, written):
    other = run_config(tmp_path / "other")
    fake_checkpoint(other, 2)
    config = run_config(tmp_path / "run", "checkpoint.resume=latest")
    fake_checkpoint(config, 2)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(written + "\n")
    manager = CheckpointManager(config, ONE_RANK)
    with pytest.raises(ResumeRefusedError, match="not a checkpoint of this run") as refused:
        manager.prepare_run()
    manager.close()
    assert "latest" in str(refused.value)


def test_latest_naming_a_symlink_out_of_the_run_is_refused(tmp_path):
    other = run_config(tmp_path / "other")
    outside = fake_checkpoint(other, 7)
    config = run_config(tmp_path / "run", "checkpoint.resume=latest")
    fake_checkpoint(config, 2)
    (tmp_path / "run" / "checkpoints" / "step_00000007").symlink_to(outside)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000007\n")
    manager = CheckpointManager(config, ONE_RANK)
    with pytest.raises(ResumeRefusedError, match="not a checkpoint of this run"):
        manager.prepare_run()
    manager.close()


def test_a_good_latest_is_followed_and_a_missing_one_falls_back_to_the_newest(tmp_path):
    config = run_config(tmp_path / "run", "checkpoint.resume=latest")
    fake_checkpoint(config, 2)
    fake_checkpoint(config, 4)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "latest").write_text("step_00000002\n")
    manager = CheckpointManager(config, ONE_RANK)
    assert manager.prepare_run() == checkpoints / "step_00000002"
    manager.close()
    (checkpoints / "latest").unlink()
    assert manager.prepare_run() == checkpoints / "step_00000004"
    manager.close()


# --------------------------------------------------------------------------------------------
# case 5: one run per directory; an earlier run's checkpoints are never silently overwritten


HOLD_LOCK = """
import sys, time
from apex_dist.distributed.run_lock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_naming_the_owner_and_a_dead_owner_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as refused:
            RunLock.acquire(tmp_path)
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "another run" in message
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, explained and taken over
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_is_stale_and_another_host_is_refused_with_what_to_do(tmp_path, caplog):
    me = os.getpid()
    lock_file = tmp_path / LOCK_FILE
    recorded = {"format": "apex_dist.run_lock/1", "host": socket.gethostname(), "pid": me}
    # this pid, but a process started at another time: the pid was reused
    lock_file.write_text(json.dumps({**recorded, "process_start": process_start_time(me) - 1}))
    with caplog.at_level("WARNING", logger="apex_dist"):
        RunLock.acquire(tmp_path).release()
    assert "no longer running" in caplog.text
    lock_file.write_text(json.dumps({**recorded, "host": "node-17", "pid": 4242}))
    with pytest.raises(RunLockedError) as refused:
        RunLock.acquire(tmp_path)
    assert "node-17" in str(refused.value) and str(lock_file) in str(refused.value)
    assert "delete" in str(refused.value)


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_incarnation(tmp_path, monkeypatch):
    lock_file = tmp_path / LOCK_FILE
    owner = {"format": "apex_dist.run_lock/1", "host": "node-3", "pid": 4242}
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock_file.write_text(json.dumps({**owner, "slurm_job": "777", "slurm_restart": 1}))
    with pytest.raises(RunLockedError, match="node-3"):  # the same incarnation: refused
        RunLock.acquire(tmp_path)
    lock_file.write_text(json.dumps({**owner, "slurm_job": "778", "slurm_restart": 0}))
    with pytest.raises(RunLockedError):  # another job
        RunLock.acquire(tmp_path)
    lock_file.write_text(json.dumps({**owner, "slurm_job": "777", "slurm_restart": 0}))
    RunLock.acquire(tmp_path).release()
    assert not lock_file.exists()


def test_a_fresh_run_refuses_a_directory_with_checkpoints_unless_told(tmp_path):
    config = run_config(tmp_path / "run")
    old = fake_checkpoint(config, 6)
    (old.parent / "latest").write_text(old.name)
    before = sorted(path.name for path in old.iterdir())
    manager = CheckpointManager(config, ONE_RANK)
    with pytest.raises(ExistingCheckpointsError) as refused:
        manager.prepare_run()
    manager.close()
    message = str(refused.value)
    assert "step_00000006" in message and "checkpoint.resume=latest" in message
    assert "checkpoint.overwrite=true" in message
    assert sorted(path.name for path in old.iterdir()) == before
    # resume from another run's checkpoint into this directory: refused the same way
    other = fake_checkpoint(run_config(tmp_path / "other"), 3)
    manager = CheckpointManager(
        run_config(tmp_path / "run", f"checkpoint.resume={other}"), ONE_RANK
    )
    with pytest.raises(ExistingCheckpointsError):
        manager.prepare_run()
    manager.close()
    # overwrite: the earlier checkpoints are deleted at start, before anything else happens
    manager = CheckpointManager(run_config(tmp_path / "run", "checkpoint.overwrite=true"), ONE_RANK)
    assert manager.prepare_run() is None
    manager.close()
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="checkpoint.overwrite"):
        run_config(tmp_path / "run", "checkpoint.overwrite=true", "checkpoint.resume=latest")


# --------------------------------------------------------------------------------------------
# cases 6 and 7: leftovers of failed saves, pruning, non-finite weights


def test_the_next_start_cleans_this_runs_incomplete_saves(tmp_path):
    config = run_config(tmp_path / "run", "checkpoint.resume=latest")
    fake_checkpoint(config, 2)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "latest").write_text("step_00000002\n")
    leftover = checkpoints / ".incomplete_step_00000004"
    leftover.mkdir()
    (leftover / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 4096)
    # a checkpoint renamed aside for replacement whose replacement never came: put back
    fake_checkpoint(config, 3).rename(checkpoints / ".replaced_step_00000003")
    manager = CheckpointManager(config, ONE_RANK)
    assert manager.prepare_run() == checkpoints / "step_00000002"
    manager.close()
    assert not leftover.exists()
    assert (checkpoints / "step_00000003" / "config.yaml").is_file()
    assert not (checkpoints / ".replaced_step_00000003").exists()


def test_pruning_keeps_the_published_checkpoint_after_a_rollback(tmp_path):
    """Resumed from step 1 while step 5 (an abandoned continuation) exists: publishing step 3
    with keep_last=1 removes step 1, keeps step 3 and leaves step 5 alone."""
    config = run_config(tmp_path / "run", "checkpoint.keep_last=1")
    for step in (1, 5):
        fake_checkpoint(config, step)
    checkpoints = tmp_path / "run" / "checkpoints"
    temporary = checkpoints / ".incomplete_step_00000003"
    temporary.mkdir()
    CheckpointManager(config, ONE_RANK)._publish(
        temporary, checkpoints / "step_00000003", "step_00000003"
    )
    assert sorted(path.name for path in checkpoints.glob("step_*")) == [
        "step_00000003",
        "step_00000005",
    ]
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"


def test_nonfinite_tensors_are_named():
    named = [("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")])), ("c", torch.empty(0))]
    named.append(("d", torch.tensor([float("-inf")])))
    assert nonfinite_tensors(named) == ["b", "d"]


# --------------------------------------------------------------------------------------------
# case 8: the watchdog's judge


def _judge(now, peers, last_progress=0.0, last_publish=None, rank=0, verdict=None):
    return judge(
        now=now,
        timeout=10.0,
        interval=1.0,
        rank=rank,
        step=7,
        phase="training",
        last_progress=last_progress,
        last_publish=now if last_publish is None else last_publish,
        peers=peers,
        verdict=verdict,
    )


def test_judge_names_a_silent_rank_its_step_and_nothing_while_all_is_well():
    alive = PeerView(1, last_change=99.5, beat=90, step=7, phase="training", seen=True)
    assert _judge(100.0, [alive], last_progress=95.0) is None
    silent = PeerView(2, last_change=85.0, beat=40, step=6, phase="saving", seen=True)
    reason = _judge(100.0, [alive, silent], last_progress=95.0)
    assert "rank 2" in reason and "step 6" in reason and "rank 1" not in reason
    # this rank's loop stalled first, but rank 2 missed beats: rank 2 is named, not this one
    missing = PeerView(2, last_change=95.0, beat=40, step=6, phase="training", seen=True)
    assert "rank 2 " in _judge(100.0, [alive, missing], last_progress=89.0)
    # a stopped (finished) rank is not a silent one
    finished = PeerView(3, last_change=0.0, seen=True, stopped=True)
    assert _judge(100.0, [alive, finished], last_progress=95.0) is None


def test_judge_names_ranks_that_fell_behind_a_stalled_filesystem_and_rank_0s_verdict():
    ahead = PeerView(1, last_change=99.9, beat=5, step=8, phase="training", seen=True)
    reason = _judge(100.0, [ahead], last_progress=80.0)
    assert "rank 0 (step 7" in reason and "fell behind" in reason
    assert "stalled" in _judge(100.0, [], last_progress=99.0, last_publish=85.0)
    # rank 1 waits two intervals for rank 0's verdict, then reports its own stall
    rank0 = PeerView(0, last_change=99.9, beat=5, step=7, phase="training", seen=True)
    assert _judge(100.0, [rank0], last_progress=89.0, rank=1) is None
    assert "rank 1 made no progress" in _judge(100.0, [rank0], last_progress=87.0, rank=1)
    reason = _judge(100.0, [rank0], rank=1, last_progress=99.0, verdict="rank 3 stopped")
    assert reason == "rank 0 ended the run: rank 3 stopped"


def test_watchdog_options_are_validated():
    with pytest.raises(ConfigError, match="train.watchdog_seconds"):
        load_config(None, ["train.watchdog_seconds=-1"])
    assert load_config(None, ["train.watchdog_seconds=0"]).train.watchdog_seconds == 0


def test_the_lock_holder_writes_the_lock_complete(tmp_path):
    lock = RunLock.acquire(tmp_path)
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert owner["process_start"] == process_start_time(os.getpid())
    assert time.strptime(owner["started"][:19], "%Y-%m-%dT%H:%M:%S")
    lock.release()
    assert list(tmp_path.iterdir()) == []
