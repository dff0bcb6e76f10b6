"""One run at a time per output directory: a lock file that names its owner.

`<output_dir>/run.lock` holds JSON: {"format": "apex_dist.run_lock/1", "host", "pid",
"process_start" (the kernel's start time of the process, which tells a reused pid apart),
"started" (local time, ISO 8601), "command", "slurm_job" and "slurm_restart" (SLURM's job id and
restart count, when run under SLURM)}. Rank 0 takes it before anything is written to the
directory and removes it when the trainer closes (or, failing that, when the process exits).
It is created complete in one step (written under a temporary name, then hard-linked to
`run.lock`, which fails if the name exists, also on NFS), so no one ever reads a half-written
lock.

A lock found at start is
- held by a live process on this host: the start is refused, naming host, pid and start time;
- stale (this host, but its process is gone: killed, crashed, or a reused pid; or an earlier
  incarnation of this SLURM job, which SLURM restarted after a failure or preemption, possibly
  with rank 0 on another node): the log says so and the lock is taken over;
- held on another host by anything else: its process cannot be checked from here, so the start
  is refused with what to do (check that host; delete the file if the run there has ended);
- held by this very process (an earlier trainer of the process that was not closed): taken
  over.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from apex_dist.distributed.runtime import logger

LOCK_FILE = "run.lock"
LOCK_FORMAT = "apex_dist.run_lock/1"
# Seconds to wait for a lock file that cannot be parsed before calling it stale: a lock is
# created complete (module doc), so an unreadable one is damaged, not in the middle of a write;
# the wait only covers a filesystem that shows a new file before its content.
UNREADABLE_LOCK_GRACE_SECONDS = 2.0


class RunLockedError(RuntimeError):
    """The output directory is in use by another run (or its lock cannot be checked)."""


def process_start_time(pid: int) -> Optional[int]:
    """The kernel's start time of process `pid` in clock ticks since boot (/proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # after "pid (comm)", field 3 (state) comes first; starttime is field 22 of proc(5)
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, recorded_start: Optional[int]) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    current_start = process_start_time(pid)
    if recorded_start is not None and current_start is not None:
        return current_start == recorded_start
    return True


def this_process() -> dict[str, Any]:
    return {
        "format": LOCK_FORMAT,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": process_start_time(os.getpid()),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def _same_process(owner: dict, me: dict) -> bool:
    return (
        owner.get("host") == me["host"]
        and owner.get("pid") == me["pid"]
        and owner.get("process_start") == me["process_start"]
    )


def describe_owner(owner: dict) -> str:
    return (
        f"host {owner.get('host')!r}, pid {owner.get('pid')}, started {owner.get('started')} "
        f"({owner.get('command') or 'unknown command'})"
    )


class RunLock:
    """The lock of one output directory, held by this process (module doc)."""

    def __init__(self, path: Path, owner: dict[str, Any]):
        self.path = path
        self.owner = owner
        self.released = False

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> RunLock:
        """Take the lock of `directory` (created if needed) or raise RunLockedError."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        me = this_process()
        for _ in range(3):  # another starter may take over a stale lock at the same moment
            if _create(path, me):
                lock = cls(path, me)
                atexit.register(lock.release)
                return lock
            owner = _read_owner(path)
            if owner is None:
                continue  # released in the meantime
            reason = _stale_reason(owner, me)
            if reason is None:
                raise _locked_error(path, owner, me)
            logger.warning("taking over the lock %s: %s", path, reason)
            aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
        raise RunLockedError(
            f"could not take the lock {path}: other processes keep taking it; is another run "
            f"starting in {directory}?"
        )

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if self.released:
            return
        self.released = True
        owner = _read_owner(self.path, wait=False)
        if owner is not None and _same_process(owner, self.owner):
            self.path.unlink(missing_ok=True)


def _create(path: Path, me: dict) -> bool:
    """Write the lock complete under a temporary name and link it into place; False if the
    lock exists."""
    temporary = path.with_name(f".{LOCK_FILE}.{me['pid']}.{time.monotonic_ns()}.tmp")
    temporary.write_text(json.dumps(me, indent=1) + "\n")
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then write
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as stream:
            stream.write(temporary.read_text())
        return True
    finally:
        temporary.unlink(missing_ok=True)


def _read_owner(path: Path, wait: bool = True) -> Optional[dict]:
    """The lock's content; {} when it cannot be parsed; None when there is no lock."""
    deadline = time.monotonic() + (UNREADABLE_LOCK_GRACE_SECONDS if wait else 0.0)
    while True:
        try:
            owner = json.loads(path.read_text())
            if isinstance(owner, dict):
                return owner
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.1)


def _stale_reason(owner: dict, me: dict) -> Optional[str]:
    """Why the lock no longer protects a running process, or None when it does (or may)."""
    if not owner or owner.get("format") != LOCK_FORMAT:
        return "the lock file is unreadable or not an apex_dist lock"
    if _same_process(owner, me):
        return "it was taken by this process earlier (a trainer that was not closed)"
    restart = owner.get("slurm_restart")
    if (
        me["slurm_job"] is not None
        and owner.get("slurm_job") == me["slurm_job"]
        and isinstance(restart, int)
        and restart < me["slurm_restart"]
    ):
        return (
            f"it was taken by an earlier incarnation of this SLURM job {me['slurm_job']} "
            f"(restart {restart}; this is restart {me['slurm_restart']}), which SLURM ended"
        )
    if owner.get("host") != me["host"]:
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or not process_alive(pid, owner.get("process_start")):
        return f"its owner ({describe_owner(owner)}) is no longer running on this host"
    return None


def _locked_error(path: Path, owner: dict, me: dict) -> RunLockedError:
    if owner.get("host") != me["host"]:
        return RunLockedError(
            f"{path.parent} is in use by a run on another host: {describe_owner(owner)}. Two "
            "runs in one output_dir would mix and delete each other's checkpoints. If that run "
            f"has ended (check on {owner.get('host')!r}), delete {path} and start again; "
            "otherwise choose another train.output_dir"
        )
    return RunLockedError(
        f"{path.parent} is in use by another run: {describe_owner(owner)}. Two runs in one "
        "output_dir would mix and delete each other's checkpoints: wait for it to end, stop it, "
        "or choose another train.output_dir"
    )
